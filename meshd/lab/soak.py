"""A soak test of real daemons: concurrent streaming clients, random cancels and bad requests, and a
stage killed and restarted every few minutes. A command, not a CI test (it is meant to run for 30+ minutes):

    python -m meshd.lab.soak --minutes 30 --clients 4 --kill-every 180 --out soak.json

Every request ends in exactly one bucket:

- ``completed``: the stream ended with ``[DONE]`` and no error;
- ``failed_clear``: an HTTP error with OpenAI's error JSON, or an SSE error event (the message is
  tallied under ``errors``, so "clear" can be judged by reading them);
- ``failed_daemon_killed``: the connection broke, or was refused, while the daemon the client talked
  to was killed (or down, waiting for its restart) during the request: the client knows at once;
- ``failed_unclear``: the connection broke or the stream ended without ``[DONE]`` or an error although
  that daemon was not killed: a defect;
- ``cancelled``: the client hung up on purpose after a random number of events;
- ``bad_request_answered``: a malformed body answered with a 4xx (anything else is ``bad_request_got_N``);
- ``hung``: no byte from the daemon for ``--hang-after`` seconds (default: the daemons' ``stall_timeout``
  or the admission queue's 30 s, whichever is longer, plus 30 s), or no end within ``--max-request``
  seconds even though bytes trickle. The daemons promise an answer within those bounds
  (``meshd/serve/runtime.py: _fail_stalled``, ``meshd/serve/guard.py``), so hung must be 0.

The resident memory of every daemon is sampled every ``--rss-every`` seconds; the report gives each
daemon's RSS at start and at the end and, per process (a killed daemon's restart is a new process),
its first, last and peak sample, so growth within one process's life is visible.
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
from dataclasses import dataclass, field
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
ADMISSION_WAIT_S = 30.0  # guard.GuardSettings.queue_timeout: the longest a request may wait silently for a slot


class Hung(Exception):
    """No byte within the hang bound, or no end within the request bound."""


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Daemons:
    """Which daemon is up, and how many times each was killed: a broken connection is the kill's doing
    only if the daemon it went to was killed (or down) while the request ran."""

    mesh: LoopbackMesh
    kills: list[int] = field(default_factory=list)
    down: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.kills = [0] * len(self.mesh.ports)

    def killed_since(self, i: int, kills_before: int) -> bool:
        return i in self.down or self.kills[i] != kills_before


@dataclass
class Tally:
    buckets: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # message (first 120 chars) -> count
    unclear: list = field(default_factory=list)  # what each failed_unclear looked like (first 20)
    durations: dict = field(default_factory=dict)  # bucket -> longest seconds

    def add(self, bucket: str, seconds: float) -> None:
        self.buckets[bucket] += 1
        self.durations[bucket] = max(self.durations.get(bucket, 0.0), round(seconds, 1))


async def _within(aw, bound: float, what: str):
    try:
        return await asyncio.wait_for(aw, bound)
    except asyncio.TimeoutError:
        raise Hung(f"nothing for {bound:g} s while waiting for {what}") from None


async def one_request(
    session: aiohttp.ClientSession, url: str, rng: random.Random, hang_after: float, tally: Tally
) -> str:
    """One client request; returns its bucket (errors and surprises are noted in ``tally``)."""
    if rng.random() < 0.1:
        body = rng.choice(BAD_BODIES)
        async with await _within(session.post(url + "/v1/chat/completions", data=body), hang_after, "headers") as r:
            await _within(r.read(), hang_after, "the error body")
            return "bad_request_answered" if 400 <= r.status < 500 else f"bad_request_got_{r.status}"
    body = {
        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
        "max_tokens": rng.choice([16, 64, 200]),
        "stream": True,
        "mode": rng.choice(["flow", "flow", "chunk", "ar"]),
    }
    cancel_after = rng.randint(1, 20) if rng.random() < 0.2 else None
    async with await _within(session.post(url + "/v1/chat/completions", json=body), hang_after, "headers") as r:
        if r.status != 200:
            text = await _within(r.text(), hang_after, "the error body")
            try:
                payload = json.loads(text)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                tally.errors[f"HTTP {r.status}: {str(payload['error'].get('message'))[:120]}"] += 1
                return "failed_clear"
            tally.unclear.append(f"HTTP {r.status} without OpenAI's error JSON: {text[:200]}")
            return "failed_unclear"
        events = 0
        while True:
            line = await _within(r.content.readline(), hang_after, f"event {events + 1}")
            if not line:
                tally.unclear.append(f"stream ended after {events} events without [DONE] or an error")
                return "failed_unclear"
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return "completed"
            if data.startswith(b'{"error"'):
                tally.errors[f"SSE: {str(json.loads(data)['error'].get('message'))[:120]}"] += 1
                return "failed_clear"
            events += 1
            if cancel_after is not None and events >= cancel_after:
                return "cancelled"  # leaving the block closes the connection: the daemon cancels it


async def client(daemons: Daemons, end: float, hang_after: float, max_request: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < end:
            i = rng.randrange(len(daemons.mesh.ports))
            kills_before, t0 = daemons.kills[i], time.monotonic()
            try:
                bucket = await asyncio.wait_for(
                    one_request(session, daemons.mesh.url(i), rng, hang_after, tally), max_request
                )
            except (Hung, asyncio.TimeoutError) as exc:
                bucket = "hung"
                tally.unclear.append(f"hung on daemon {i}: {exc or f'no end within {max_request:g} s'}")
            except aiohttp.ClientError as exc:  # refused, or cut mid-stream
                if daemons.killed_since(i, kills_before):
                    bucket = "failed_daemon_killed"
                else:
                    bucket = "failed_unclear"
                    tally.unclear.append(f"daemon {i} (not killed): {exc!r}"[:300])
            tally.add(bucket, time.monotonic() - t0)
            # After a failure, a client waits a little longer (as a real one would), so a daemon that is down
            # for a while does not turn into thousands of instant refusals in the tally.
            await asyncio.sleep(rng.uniform(1.0, 3.0) if bucket.startswith("failed") else rng.uniform(0.0, 0.5))


async def killer(daemons: Daemons, end: float, every: float, seed: int, log: list, t0: float) -> None:
    """Kill a random daemon every ``every`` s (SIGKILL: no drain), restart it 5-20 s later, time its rejoin."""
    mesh, rng = daemons.mesh, random.Random(seed)
    while time.monotonic() + every < end:
        await asyncio.sleep(every)
        victim = rng.randrange(len(mesh.ports))
        pid = mesh.procs[victim].pid
        daemons.down.add(victim)
        daemons.kills[victim] += 1
        mesh.kill(victim)
        log.append({"t": round(time.monotonic() - t0, 1), "killed": victim, "pid": pid})
        print(f"[{time.monotonic() - t0:7.1f} s] killed daemon {victim} (pid {pid})", flush=True)
        await asyncio.sleep(rng.uniform(5, 20))
        mesh.restart(victim)
        log.append({"t": round(time.monotonic() - t0, 1), "restarted": victim, "pid": mesh.procs[victim].pid})
        try:
            await asyncio.to_thread(mesh.wait_plan, [victim], len(mesh.ports), every)
            rejoined = round(time.monotonic() - t0, 1)
            log.append({"t": rejoined, "plan_again": victim})
            print(f"[{rejoined:7.1f} s] daemon {victim} restarted; 3-stage plan committed again", flush=True)
        except (TimeoutError, RuntimeError) as exc:
            log.append({"t": round(time.monotonic() - t0, 1), "no_plan": victim, "why": str(exc)[:300]})
            print(f"daemon {victim}: no plan after restart: {exc}", flush=True)
        daemons.down.discard(victim)


async def sampler(daemons: Daemons, end: float, every: float, samples: dict, tally: Tally, t0: float) -> None:
    """RSS of every live daemon process, every ``every`` s, keyed by (daemon, pid); a progress line each time."""
    mesh = daemons.mesh
    while True:
        now = time.monotonic()
        line = []
        for i, proc in enumerate(mesh.procs):
            kib = rss_kib(proc.pid) if proc.poll() is None else None
            if kib is not None:
                samples.setdefault((i, proc.pid), []).append((round(now - t0, 1), kib))
            line.append(f"d{i} {kib / 1024:.0f} MiB" if kib else f"d{i} down")
        print(f"[{now - t0:7.1f} s] {', '.join(line)}; {dict(tally.buckets)}", flush=True)
        if now >= end:
            return
        await asyncio.sleep(min(every, max(end - now, 0.1)))


async def soak(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="meshd-soak-"))
    extra = ["--stall-timeout", str(args.stall_timeout)]
    hang_after = args.hang_after or max(args.stall_timeout, ADMISSION_WAIT_S) + 30
    with LoopbackMesh(workdir, 3, mdns=False, extra=extra) as mesh:
        print(f"daemons starting in {workdir} (logs node*.log)", flush=True)
        await asyncio.to_thread(mesh.wait_plan, [0, 1, 2], 3, args.start_timeout)
        daemons = Daemons(mesh)
        rss_start = [rss_kib(p.pid) for p in mesh.procs]
        tally, events, samples = Tally(), [], {}
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        tasks = [client(daemons, end, hang_after, args.max_request, args.seed + i, tally) for i in range(args.clients)]
        tasks.append(sampler(daemons, end, args.rss_every, samples, tally, t0))
        if args.kill_every > 0:
            tasks.append(killer(daemons, end, args.kill_every, args.seed, events, t0))
        await asyncio.gather(*tasks)
        rss_end = [rss_kib(p.pid) for p in mesh.procs]
        # Every request in flight at ``end`` finished (or timed out as hung) before gather returned.
        return {
            "minutes": args.minutes,
            "wall_minutes": round((time.monotonic() - t0) / 60, 1),
            "clients": args.clients,
            "stall_timeout_s": args.stall_timeout,
            "hang_after_s": hang_after,
            "max_request_s": args.max_request,
            "requests": dict(tally.buckets),
            "total": sum(tally.buckets.values()),
            "hung": tally.buckets.get("hung", 0),
            "failed_unclear": tally.buckets.get("failed_unclear", 0),
            "longest_s": tally.durations,
            "errors": dict(tally.errors.most_common()),
            "unclear": tally.unclear[:20],
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "rss_per_process": [
                {
                    "daemon": i,
                    "pid": pid,
                    "first": (s := samples[(i, pid)])[0],
                    "last": s[-1],
                    "peak_kib": max(k for _, k in s),
                    "samples": len(s),
                }
                for (i, pid) in samples
            ],
            "kills": events,
            "logs": str(workdir),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=180.0, help="seconds between stage kills (0: never)")
    p.add_argument("--stall-timeout", type=float, default=20.0, help="the daemons' stall_timeout")
    p.add_argument("--hang-after", type=float, default=None, help="seconds without a byte that make a request hung")
    p.add_argument("--max-request", type=float, default=600.0, help="seconds after which a request is hung anyway")
    p.add_argument("--rss-every", type=float, default=30.0, help="seconds between RSS samples (and progress lines)")
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
    return 1 if report["hung"] or report["failed_unclear"] else 0


if __name__ == "__main__":
    sys.exit(main())
