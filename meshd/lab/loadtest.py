"""Load test against running daemons: Poisson arrivals from several originators, streamed answers.

Why streamed: time to first token and per-token latency are what a user feels, and only the SSE
stream shows them. Per-token latency is (last content chunk - first) / (tokens - 1), because one
chunk may carry several accepted tokens; the first content chunk normally carries the one token the
prefill decides, in every mode, so the measure treats the modes alike. Its p95 over a handful of requests is
the slowest request's mean. The gap p95 (``gap_p95``) is the other view: the 95th percentile of the
pauses between consecutive content chunks over every request, the stutter a reader sees; each
request's chunk times are kept in the row (``per_request``) so either can be recomputed.

The daemon's own figures (rounds, verified nodes) come in the final chunk's ``meshd`` field, so the
test also shows the adaptive speculation at work: verified nodes per round should fall as the arrival
rate rises (FASER's load term) and recover when the ring is idle again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence

import aiohttp


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival offsets (s) of a Poisson process of ``rate`` requests/s, the same for a seed."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no data (a rate where every request failed)."""
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def per_token_latency(first: float | None, last: float | None, tokens: int) -> float:
    """(last - first) / (tokens - 1) between the first and last content's arrival (NaN under two tokens)."""
    return (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else math.nan


async def one_request(session, url: str, body: dict, start_at: float, api_key: str | None = None) -> dict:
    """Send one streamed chat request at ``start_at`` (loop time); return its timings and the daemon's stats."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    t0 = loop.time()
    first = last = None
    chunks: list[float] = []  # arrival of each content chunk, seconds after the request was sent
    stats: dict = {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.post(url + "/v1/chat/completions", json=body | {"stream": True}, headers=headers) as resp:
            if resp.status != 200:
                return {"ok": False, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}", "start": t0}
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[5:])
                if "meshd" in msg:
                    stats = msg["meshd"]
                if any(c.get("delta", {}).get("content") for c in msg.get("choices", [])):
                    now = loop.time()
                    first = now if first is None else first
                    last = now
                    chunks.append(round(now - t0, 4))
    except Exception as exc:  # a failed request is a data point of the load test, not its end
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "start": t0}
    end = loop.time()
    tokens = int(stats.get("new_tokens", 0))
    return {
        "ok": True,
        "start": t0,
        "end": end,
        "ttft": (first - t0) if first is not None else math.nan,
        "tpot": per_token_latency(first, last, tokens),
        "tokens": tokens,
        "rounds": int(stats.get("rounds", 0)),
        "verified_nodes": int(stats.get("verified_nodes", 0)),
        "chunks": chunks,
    }


def chunk_gaps(chunks: Sequence[float]) -> list[float]:
    """The pauses between consecutive content chunks of one stream (seconds)."""
    return [b - a for a, b in itertools.pairwise(chunks)]


def summarize_load(results: list[dict], rate: float, mode: str) -> dict:
    """One row of the load table: the requests of one rate and mode (``one_request``'s results)."""
    done = [r for r in results if r["ok"]]
    span = (max(r["end"] for r in done) - min(r["start"] for r in results)) if done else math.nan
    toks, rounds = sum(r["tokens"] for r in done), sum(r["rounds"] for r in done)
    return {
        "rate": rate,
        "mode": mode,
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "tokens": toks,
        "throughput": toks / span if done and span > 0 else 0.0,
        "ttft_p50": percentile([r["ttft"] for r in done], 50),
        "ttft_p95": percentile([r["ttft"] for r in done], 95),
        "tpot_p50": percentile([r["tpot"] for r in done], 50),
        "tpot_p95": percentile([r["tpot"] for r in done], 95),
        "mean_accepted": toks / rounds if rounds else 0.0,
        "nodes_per_round": sum(r["verified_nodes"] for r in done) / rounds if rounds else 0.0,
        "gap_p95": percentile([g for r in done for g in chunk_gaps(r.get("chunks", []))], 95),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
        # each request: when it was sent (after the rate's first), which originator, its figures, its chunk times
        "per_request": [
            {k: r[k] for k in ("originator", "ttft", "tpot", "tokens", "rounds", "verified_nodes", "chunks") if k in r}
            | {"start": r["start"] - min(x["start"] for x in results), "ok": r["ok"]}
            for r in results
        ],
    }


async def _tagged(originator: int, request) -> dict:
    """``request``'s result, marked with the index of the originator (URL) it went to."""
    return await request | {"originator": originator}


async def run_rate(
    urls: list[str],
    model: str,
    prompts: list[str],
    *,
    rate: float,
    n: int,
    mode: str,
    max_tokens: int,
    temperature: float,
    seed: int,
    api_key: str | None = None,
) -> dict:
    """``n`` requests at Poisson times, round robin over ``urls`` (the originators); one summary row."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [
            _tagged(
                i % len(urls),
                one_request(
                    session,
                    urls[i % len(urls)],
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                        "max_tokens": max_tokens,
                        "temperature": temperature,
                        "seed": seed + i,
                        "mode": mode,
                    },
                    t0 + at,
                    api_key,
                ),
            )
            for i, at in enumerate(poisson_arrivals(n, rate, seed))
        ]
        results = await asyncio.gather(*tasks)
    return summarize_load(results, rate, mode)


def run(
    urls: list[str],
    model: str,
    prompts: list[str],
    rates: Sequence[float],
    modes: Sequence[str],
    *,
    n: int,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Every rate, and per rate every mode in turn (interleaved, so drift hits the modes alike)."""
    rows = []
    for rate in rates:
        for mode in modes:
            t = time.perf_counter()
            row = asyncio.run(
                run_rate(
                    urls,
                    model,
                    prompts,
                    rate=rate,
                    n=n,
                    mode=mode,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    seed=seed,
                )
            )
            rows.append(row)
            if progress:
                progress(
                    f"load {rate:g} req/s {mode:<5}: {row['completed']}/{row['requests']} done, "
                    f"{row['throughput']:.1f} tok/s, TTFT p50 {row['ttft_p50']:.2f}s, "
                    f"per-token p50 {row['tpot_p50'] * 1e3:.0f} ms, {row['nodes_per_round']:.1f} nodes/round "
                    f"({time.perf_counter() - t:.0f}s)"
                )
    return rows


def load_table(rows: list[dict]) -> str:
    """The markdown table of ``summarize_load`` rows."""
    lines = [
        "| rate req/s | mode | done | throughput tok/s | TTFT p50 / p95 s | per-token p50 / p95 ms | "
        "gap p95 ms | tokens/round | nodes/round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rate']:g} | {r['mode']} | {r['completed']}/{r['requests']} | {r['throughput']:.2f} | "
        f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['tpot_p50'] * 1e3:.0f} / {r['tpot_p95'] * 1e3:.0f} | "
        f"{r.get('gap_p95', math.nan) * 1e3:.0f} | {r['mean_accepted']:.2f} | {r['nodes_per_round']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)
