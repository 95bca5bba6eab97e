"""Slow clients cannot hold the daemon's sockets, and a stopping daemon finishes what it started.

Before the guard, aiohttp kept a connection that never finished its request head for its hour-long
keep-alive, a body could trickle in forever, and SIGTERM failed every request in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
from aiohttp import web
from support import FakeRuntime, free_port

from meshd.serve.api import create_app
from meshd.serve.guard import LINGER_S, GuardSettings, RestGuard, runner_kwargs

HEADER_S, BODY_S = 1.0, 1.0
SLACK_S = 3.0  # aiohttp's timers fire on the loop's next tick; a loaded 2-core machine adds scheduling delay


@contextlib.asynccontextmanager
async def daemon_like(rt, settings: GuardSettings):
    """The app served the way ``meshd serve`` serves it (the guard's runner arguments included)."""
    guard = RestGuard(settings)
    runner = web.AppRunner(
        create_app(rt, guard=guard), handle_signals=False, access_log=None, **runner_kwargs(settings)
    )
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, guard
    finally:
        await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> float:
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), within)  # EOF once the server closes the connection
    assert b"200 OK" not in data
    return time.monotonic() - t0


async def test_slow_headers_are_cut_off_and_health_keeps_answering(embedded_tokenizer):
    settings = GuardSettings(header_timeout=HEADER_S, body_timeout=BODY_S)
    async with daemon_like(FakeRuntime(embedded_tokenizer), settings) as (port, _):
        slow = []
        for _ in range(50):  # slowloris: open many connections, each with half a request head
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append((reader, writer))
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 1.0
        for _, writer in slow:
            writer.write(b"a")  # trickling bytes does not buy time
        waited = [await closed_by_server(reader, HEADER_S + SLACK_S) for reader, _ in slow]
        assert max(waited) <= HEADER_S + SLACK_S
        for _, writer in slow:
            writer.close()


async def test_an_idle_keep_alive_connection_is_closed(embedded_tokenizer):
    async with daemon_like(FakeRuntime(embedded_tokenizer), GuardSettings(header_timeout=HEADER_S)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await asyncio.wait_for(reader.read(), HEADER_S + SLACK_S)  # not an hour
        writer.close()


async def test_a_slow_body_gets_408_within_the_body_timeout(embedded_tokenizer):
    rt = FakeRuntime(embedded_tokenizer)
    async with daemon_like(rt, GuardSettings(header_timeout=30.0, body_timeout=BODY_S)) as (port, guard):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"messages": ')
        t0 = time.monotonic()
        reply = await asyncio.wait_for(reader.read(4096), BODY_S + SLACK_S)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert time.monotonic() - t0 <= BODY_S + SLACK_S
        assert guard.running == 0 and rt.submitted == []  # the slot is free again; nothing was generated
        await asyncio.wait_for(reader.read(), LINGER_S + SLACK_S)  # and the socket is not held for aiohttp's 10 s
        writer.close()


async def test_draining_finishes_requests_in_flight_and_refuses_new_ones(embedded_tokenizer):
    rt = FakeRuntime(embedded_tokenizer, delay=0.05)
    async with daemon_like(rt, GuardSettings()) as (port, guard), aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}

        async def stream() -> bytes:
            async with s.post(url, json=body) as r:
                assert r.status == 200
                return await r.read()

        running = asyncio.ensure_future(stream())
        while not rt.submitted:
            await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(guard.drain(10.0, rt.in_flight))
        await asyncio.sleep(0.05)
        async with s.post(url, json=body) as r:
            refused = await r.json()
            assert r.status == 503 and refused["error"]["code"] == "shutting_down" and r.headers["Retry-After"]
        assert await drain == 0  # nothing left when the drain returns
        text = (await running).decode()
        assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text  # finished, not failed
        assert rt.cancelled == []
