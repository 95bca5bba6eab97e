"""A multi-turn chat through real loopback daemons: time to first token with prefix caching on and off.

Two copies of the same conversation run side by side through the same ring, turn by turn: one asks
the daemons to reuse and keep its prefixes (``prefix_cache: true``), the other opts out per request
(``prefix_cache: false``), so both meet the same machine load and warm-up; which copy goes first
alternates by turn. Each turn's prompt is the chat so far (a long system prompt, the earlier
questions and the model's answers, the new question), as the chat CLI and an OpenAI client send it.

At temperature 0 in fp32 both copies must produce the same answers token for token (the oracle:
the cache changes which KV is computed, never its values' meaning); the run reports any turn where
they differ. Figures: per turn the time to first token of each copy (the median over ``--repeats``
conversations), the prompt tokens the stages reused, and the hit rate over turns 2 onwards.

    python -m meshd.lab.multiturn --turns 6 --daemons 3 --max-tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from meshd.lab.testbed import LoopbackMesh

SYSTEM = (
    "You are a patient, precise assistant for people who run small computers at home: Raspberry Pi boards, "
    "Jetson modules, old laptops and routers. Answer in plain language and short paragraphs. When a question "
    "involves commands, give the exact command and say what it changes. When you are unsure, say so and say "
    "how the user could find out. Prefer solutions that keep working after a reboot and that do not need a "
    "cloud account. Mention the risk of data loss before any step that could cause it, and suggest a backup "
    "first. Keep units explicit (MB, GB, Mbit/s, watts, degrees Celsius). If the user's plan has a simpler "
    "alternative, mention it briefly after answering the question they asked."
)
QUESTIONS = [
    "My Raspberry Pi 4 keeps rebooting when I plug in a USB disk. What could cause that?",
    "How can I check whether the power supply is the problem?",
    "The disk is formatted as NTFS. Should I reformat it for use with Linux?",
    "How do I mount it automatically at boot?",
    "What is a sensible way to back up that disk to another machine on my network?",
    "Can you summarise the whole plan in five short steps?",
    "Which of these steps is the riskiest, and why?",
    "How would the plan change on a Jetson Nano?",
]


def stream_turn(url: str, messages: list[dict], max_tokens: int, mode: str, cache: bool) -> dict:
    """One streamed chat completion: seconds to the first content delta, the answer and meshd's statistics."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "mode": mode,
        "prefix_cache": cache,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    t0 = time.perf_counter()
    first, text, stats, usage = None, [], None, {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"the daemon failed the turn: {chunk['error']}")
            for choice in chunk.get("choices", []):
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    first = first if first is not None else time.perf_counter() - t0
                    text.append(delta)
            stats = chunk.get("meshd") or stats
            usage = chunk.get("usage") or usage
    if first is None or stats is None:
        raise RuntimeError("the stream ended without text or without meshd's statistics")
    return {"ttft": first, "text": "".join(text), "stats": stats, "prompt_tokens": usage.get("prompt_tokens")}


def conversation(url: str, turns: int, max_tokens: int, mode: str, number: int = 1) -> list[dict]:
    """One conversation in both copies, turn by turn; per turn both copies' results. Conversations of
    another ``number`` start with another first token, so no repeat reuses an earlier one's prefixes."""
    system = f"Conversation {number}. {SYSTEM}"
    chats = {True: [{"role": "system", "content": system}], False: [{"role": "system", "content": system}]}
    out = []
    for t in range(turns):
        q = QUESTIONS[t % len(QUESTIONS)]
        row = {"turn": t + 1}
        for cache in (t % 2 == 0, t % 2 == 1):  # alternate which copy goes first
            chats[cache].append({"role": "user", "content": q})
            res = stream_turn(url, chats[cache], max_tokens, mode, cache)
            chats[cache].append({"role": "assistant", "content": res["text"]})
            row["on" if cache else "off"] = res
        out.append(row)
    return out


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="meshd-multiturn-"))
    extra = ["--prefix-cache-size", args.cache_size]
    with LoopbackMesh(work, args.daemons, model=args.model, dtype=args.dtype, threads=args.threads, extra=extra) as m:
        m.wait_plan(list(range(args.daemons)), args.daemons, timeout=300, progress=print)
        url = m.url(0)
        # warm-up with a first turn's shape (not kept): the first long prefill of a fresh daemon is slower
        warm = [{"role": "system", "content": f"Warm-up. {SYSTEM}"}, {"role": "user", "content": QUESTIONS[0]}]
        stream_turn(url, warm, args.max_tokens, args.mode, False)
        runs = [conversation(url, args.turns, args.max_tokens, args.mode, i + 1) for i in range(args.repeats)]
    turns = []
    mismatches = []
    for t in range(args.turns):
        rows = [r[t] for r in runs]
        on = [x["on"] for x in rows]
        off = [x["off"] for x in rows]
        for i, x in enumerate(rows):
            if x["on"]["stats"]["token_ids"] != x["off"]["stats"]["token_ids"]:
                mismatches.append({"repeat": i, "turn": t + 1})
        ttft_on = statistics.median(x["ttft"] for x in on)
        ttft_off = statistics.median(x["ttft"] for x in off)
        turns.append(
            {
                "turn": t + 1,
                "prompt_tokens": on[0]["prompt_tokens"],
                "prefix_hit": on[0]["stats"]["prefix_hit"],
                "ttft_on_ms": round(ttft_on * 1e3, 1),
                "ttft_off_ms": round(ttft_off * 1e3, 1),
                "speedup": round(ttft_off / ttft_on, 2),
            }
        )
    later = [r[t]["on"] for r in runs for t in range(1, args.turns)]
    hit_requests = sum(1 for x in later if x["stats"]["prefix_hit"] > 0)
    reused = sum(x["stats"]["prefix_hit"] for x in later)
    prompted = sum(x["prompt_tokens"] or 0 for x in later)
    return {
        "command": " ".join(["python -m meshd.lab.multiturn", *sys.argv[1:]]),
        "daemons": args.daemons,
        "model": args.model,
        "dtype": args.dtype,
        "mode": args.mode,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "turns": turns,
        "hit_rate_requests": round(hit_requests / max(1, len(later)), 3),
        "hit_rate_tokens": round(reused / max(1, prompted), 3),
        "answers_equal": not mismatches,
        "mismatches": mismatches,
        "workdir": str(work),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.multiturn", description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48, help="answer length per turn")
    p.add_argument("--repeats", type=int, default=1, help="conversations per copy; figures are medians")
    p.add_argument("--mode", default="flow")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per daemon")
    p.add_argument("--cache-size", default="256MiB", help="each daemon's --prefix-cache-size")
    p.add_argument("--workdir", default=None, help="daemons' state and logs (default: a new temporary directory)")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    if not 1 <= args.turns <= len(QUESTIONS):
        p.error(f"--turns: 1 to {len(QUESTIONS)}")
    report = run(args)
    print(f"{'turn':>4} {'prompt':>6} {'reused':>6} {'ttft off ms':>11} {'ttft on ms':>10} {'speedup':>7}")
    for t in report["turns"]:
        print(
            f"{t['turn']:>4} {t['prompt_tokens'] or '?':>6} {t['prefix_hit']:>6} {t['ttft_off_ms']:>11} "
            f"{t['ttft_on_ms']:>10} {t['speedup']:>7}"
        )
    rate, tokens, equal = report["hit_rate_requests"], report["hit_rate_tokens"], report["answers_equal"]
    print(
        f"hit rate (turns 2+): {rate:.0%} of requests, {tokens:.0%} of prompt tokens reused; "
        f"answers equal with caching on and off: {equal}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["answers_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
