"""Issue 13: where `spec` loses time against `ar` on given prompts, in thread CPU time per phase (wall
time with ``--threads N`` above 1).

Wraps the target's forwards, the drafter parts' ``draft``/``accept`` and the budget's calls with
``time.thread_time`` counters (other jobs on a shared machine do not count), runs ``ar`` and ``spec``
interleaved and prints each phase's seconds and the difference spec - ar per prompt.

    PYTHONPATH=. python tools/issue13/profile_rounds.py --ids 81 95 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from meshd.lab.bench import EVERYDAY
from meshd.serve.local import LocalModel
from models import engine
from models.budget import CostCurve, DraftPrior, TreeBudget

CLOCK = defaultdict(float)
COUNT = defaultdict(int)
_STACK: list[str] = []
NOW = [time.thread_time]  # --threads N > 1: wall time (the team's other threads do the work too)


def timed(name: str, fn):
    """``fn`` with its thread CPU time added to CLOCK[name] (exclusive of nested timed calls)."""

    def wrapper(*a, **kw):
        t = NOW[0]()
        _STACK.append(name)
        try:
            return fn(*a, **kw)
        finally:
            _STACK.pop()
            dt = NOW[0]() - t
            CLOCK[name] += dt
            COUNT[name] += 1
            if _STACK:
                CLOCK[_STACK[-1]] -= dt

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", type=int, nargs="+", required=True, help="question ids of --questions")
    ap.add_argument("--questions", default=str(EVERYDAY), help="a question file (default: the everyday set)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--drafter", default="auto")
    ap.add_argument("--prior-wait", type=int, default=0, help="start spec with a prior of this wait (rounds)")
    ap.add_argument("--no-cheap", action="store_true", help="no n-gram rounds while the budget backs off")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; above 1 the clock is wall time")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.threads > 1:
        NOW[0] = time.perf_counter
    local = LocalModel("default", "auto", "auto")
    curve = CostCurve(local.curve)
    drafter = local.drafter(a.drafter)
    t = local.target
    t.forward_one = timed("target.forward", t.forward_one)
    t.logits = timed("target.logits", t.logits)
    t.logits_by_row = timed("target.logits_by_row", t.logits_by_row)
    for p in getattr(drafter, "parts", [drafter]):
        p.draft = timed(f"{p.name}.draft", p.draft)
        p.accept = timed(f"{p.name}.accept", p.accept)
        if hasattr(p, "_sync"):
            p._sync = timed(f"{p.name}.catch_up", p._sync)
    engine.verify_tree = timed("verify_tree(rest)", engine.verify_tree)
    engine.prefill = timed("prefill(rest)", engine.prefill)
    qs = {json.loads(line)["question_id"]: json.loads(line) for line in Path(a.questions).read_text().splitlines()}
    for qid in a.ids:
        prompt = local.encode(qs[qid]["turns"][0])
        per: dict[str, dict[str, float]] = {}
        meta = {}
        for r in range(a.repeats):
            for m in ["ar", "spec"] if r % 2 == 0 else ["spec", "ar"]:
                CLOCK.clear()
                COUNT.clear()
                prior = DraftPrior()
                prior.wait = a.prior_wait
                budget = TreeBudget(curve, prior=prior, cheap=not a.no_cheap) if m == "spec" else None
                t0 = NOW[0]()
                res = engine.generate(
                    t,
                    prompt,
                    max_new_tokens=a.max_tokens,
                    mode=m,
                    drafter=drafter if m == "spec" else None,
                    eos_ids=local.eos,
                    budget=budget,
                )
                total = NOW[0]() - t0
                clock = dict(CLOCK)
                clock["other"] = total - sum(CLOCK.values())
                clock["total"] = total
                if m not in per or total < per[m]["total"]:
                    per[m] = clock
                    meta[m] = (
                        res.stats.new_tokens,
                        res.stats.rounds,
                        budget.plain_rounds if budget else 0,
                        res.stats.per_round,
                        dict(COUNT),
                        res.stats.verified_nodes,
                        res.stats.accepted_drafts,
                        res.token_ids,
                    )
        print(
            f"q{qid} prompt {len(prompt)} tok, {meta['ar'][0]} new; spec rounds {meta['spec'][1]}, "
            f"plain {meta['spec'][2]}, per round {meta['spec'][3]}, verified nodes {meta['spec'][5]}, "
            f"accepted {meta['spec'][6]}, same {meta['spec'][7] == meta['ar'][7]}"
        )
        print(f"   spec/ar (cpu) {per['ar']['total'] / per['spec']['total']:.3f}")
        for k in sorted(
            set(per["ar"]) | set(per["spec"]), key=lambda k: -abs(per["spec"].get(k, 0) - per["ar"].get(k, 0))
        ):
            ar_s, sp_s = per["ar"].get(k, 0.0), per["spec"].get(k, 0.0)
            print(
                f"   {k:<24} ar {ar_s * 1e3:8.1f} ms  spec {sp_s * 1e3:8.1f} ms  diff {(sp_s - ar_s) * 1e3:+8.1f} ms"
                f"  calls {meta['spec'][4].get(k, '')}"
            )


if __name__ == "__main__":
    main()
