"""A soak test of real daemons: concurrent streaming clients, random cancels and bad requests, and a
stage killed and restarted every few minutes. A command, not a CI test (it is meant to run for 30+ minutes):

    python -m meshd.lab.soak --minutes 30 --clients 4 --kill-every 180 --out soak.json

Every request ends in exactly one bucket: completed, failed with a clear error (an HTTP error or an SSE
error event carrying OpenAI's error JSON), failed_connection (the daemon it talked to was killed), cancelled
by the client on purpose, bad request answered with a 4xx, or hung: no end within ``--hang-after``
seconds (the daemons' ``stall_timeout`` plus a margin). Hung must be 0. The report also gives the
resident memory of every daemon at start and at the end (after restarts: of the process then running).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from meshd.lab.testbed import LoopbackMesh

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain RAID 5 in three sentences.",
    "List ten fruits and one fact about each.",
    "Why is the sky blue?",
]
BAD_BODIES = [
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["' + b"x" * 200_000 + b'"]}',
    b'{"metadata": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b"{not json",
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def one_request(session: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    """One client request; returns its bucket."""
    if rng.random() < 0.1:
        async with session.post(url + "/v1/chat/completions", data=rng.choice(BAD_BODIES)) as r:
            await r.read()
            return "bad_request_answered" if 400 <= r.status < 500 else f"bad_request_got_{r.status}"
    body = {
        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
        "max_tokens": rng.choice([16, 64, 200]),
        "stream": True,
        "mode": rng.choice(["flow", "flow", "chunk", "ar"]),
    }
    cancel_after = rng.randint(1, 20) if rng.random() < 0.2 else None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            payload = await r.json(content_type=None)
            return "failed_clear" if "error" in payload else "failed_unclear"
        events = 0
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return "completed"
            if data.startswith(b'{"error"'):
                return "failed_clear"
            events += 1
            if cancel_after is not None and events >= cancel_after:
                return "cancelled"  # leaving the block closes the connection: the daemon cancels it
        return "failed_unclear"  # the stream ended without [DONE] or an error


async def client(mesh: LoopbackMesh, end: float, hang_after: float, seed: int, tally: Counter) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < end:
            url = mesh.url(rng.randrange(len(mesh.ports)))
            try:
                bucket = await asyncio.wait_for(one_request(session, url, rng), hang_after)
            except asyncio.TimeoutError:
                bucket = "hung"
            except aiohttp.ClientError:  # the daemon it talks to was killed (refused, cut mid-stream): known at once
                bucket = "failed_connection"
            tally[bucket] += 1
            await asyncio.sleep(rng.uniform(0.0, 0.5))


async def killer(mesh: LoopbackMesh, end: float, every: float, seed: int, log: list) -> None:
    rng = random.Random(seed)
    while time.monotonic() + every < end:
        await asyncio.sleep(every)
        victim = rng.randrange(len(mesh.ports))
        mesh.kill(victim)
        log.append({"t": round(time.monotonic(), 1), "killed": victim})
        await asyncio.sleep(rng.uniform(5, 20))
        mesh.restart(victim)
        log.append({"t": round(time.monotonic(), 1), "restarted": victim})


async def soak(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="meshd-soak-"))
    extra = ["--stall-timeout", str(args.stall_timeout)]
    with LoopbackMesh(workdir, 3, mdns=False, extra=extra) as mesh:
        await asyncio.to_thread(mesh.wait_plan, [0, 1, 2], 3, args.start_timeout)
        rss_start = [rss_kib(p.pid) for p in mesh.procs]
        tally: Counter = Counter()
        events: list = []
        end = time.monotonic() + args.minutes * 60
        hang_after = args.stall_timeout + 30
        tasks = [client(mesh, end, hang_after, args.seed + i, tally) for i in range(args.clients)]
        if args.kill_every > 0:
            tasks.append(killer(mesh, end, args.kill_every, args.seed, events))
        await asyncio.gather(*tasks)
        rss_end = [rss_kib(p.pid) for p in mesh.procs]
        return {
            "minutes": args.minutes,
            "clients": args.clients,
            "requests": dict(tally),
            "hung": tally.get("hung", 0),
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "kills": events,
            "logs": str(workdir),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=180.0, help="seconds between stage kills (0: never)")
    p.add_argument("--stall-timeout", type=float, default=20.0, help="the daemons' stall_timeout")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="daemon state and logs (default: a new temporary directory)")
    p.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = p.parse_args(argv)
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if report["hung"] else 0


if __name__ == "__main__":
    sys.exit(main())
