"""Slowloris against a daemon's file descriptors: more half-sent request heads than it can hold.

A daemon's sockets are finite (systemd's default soft limit is 1024 descriptors). Before the guard,
a connection that never finished its request head was kept for aiohttp's keep-alive (75 s here, an
hour before), so an attacker who opened as many as the daemon could hold took every descriptor:
``/health`` and the mesh websocket, which shares the port, could not even be accepted. Now each is
cut after ``header_timeout``, so the attacker has to keep opening connections and honest ones get
their turn within a few timeouts.

The daemon's app runs in a subprocess with a soft limit of 64 descriptors (the test process keeps
its own, so the attack and the probes are not limited by it).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from hostile_peers import CODEC, SECRET, hello

from peers.link import dial

ROOT = Path(__file__).resolve().parents[2]
HEADER_S = 1.0
FREE_FDS = 48  # descriptors left to the server subprocess for connections
ATTACKERS = 150  # more than it can hold, fewer than its listen backlog plus what it holds
BOUND_S = 20.0  # a few rounds of header_timeout plus asyncio's 1 s pause after EMFILE, on a loaded machine

SERVER = f"""
import asyncio, os, resource, sys
from aiohttp import web
from support import FakeRuntime
from hostile_peers import CODEC, SECRET, hello
from meshd.serve.api import create_app
from meshd.serve.guard import GuardSettings, RestGuard, runner_kwargs
from models.source import ModelSource
from peers.link import Link, HandshakeError, accept_handshake, add_mesh_route

async def accept(ws, request):
    try:
        auth = await accept_handshake(ws, "127.0.0.1", hello("victim"), SECRET, CODEC, timeout=2)
    except HandshakeError:
        return
    await Link(ws, auth, codec=CODEC, remote="peer", dialer=False).run(lambda *_: asyncio.sleep(0))

async def main():
    settings = GuardSettings(header_timeout={HEADER_S})
    app = create_app(FakeRuntime(ModelSource.resolve("default").load_tokenizer()), guard=RestGuard(settings))
    add_mesh_route(app, accept)
    kwargs = runner_kwargs(settings) if sys.argv[1] == "guarded" else {{}}
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **kwargs)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=512)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + {FREE_FDS}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def start_server(mode: str) -> tuple[subprocess.Popen, int]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/adversarial")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True
    )
    return proc, int(proc.stdout.readline())


def slowloris(port: int, n: int) -> list[socket.socket]:
    """``n`` connections, each with half a request head (the kernel's backlog accepts what the app does not)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(s)
    return socks


async def health_within(port: int, bound: float) -> float:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), bound)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    return time.monotonic() - t0


async def test_half_sent_heads_beyond_the_descriptor_limit_cannot_starve_health_or_the_mesh():
    proc, port = start_server("guarded")
    socks: list[socket.socket] = []
    try:
        await health_within(port, 5.0)  # up before the attack
        socks = await asyncio.to_thread(slowloris, port, ATTACKERS)
        waited = await health_within(port, BOUND_S)
        assert waited < BOUND_S
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as session:
            # The dialer's own 5 s timeout covers the handshake; retry while the server works through the backlog.
            while True:
                try:
                    link = await dial(session, "127.0.0.1", port, hello("peer"), SECRET, CODEC, timeout=5)
                    break
                except (OSError, asyncio.TimeoutError):
                    assert time.monotonic() - t0 < BOUND_S, "the mesh websocket was starved"
            assert link.peer.node_id == "victim"
            await link.close()
    finally:
        for s in socks:
            s.close()
        proc.kill()
        proc.wait()
