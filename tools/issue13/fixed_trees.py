"""Issue 13: what a drafting round costs and yields on this CPU, with the tree size fixed.

Every round drafts (the budget never backs off) and verifies exactly N drafted nodes (0: the draft is
made and thrown away, only the root is verified), for each N of ``--nodes``; ``ar`` alongside. Prints
per setting the wall time per round and per token (prefill excluded; the best of ``--repeats`` passes,
settings interleaved within each pass: with 2 threads the kernels' second thread does half the work,
which the calling thread's CPU time would not count) and the tokens per round,
so the price of a round's parts can be read off: N=0 against ``ar`` is the drafting overhead, N=1
against N=0 the first verified row, and so on. Whether ``spec`` can beat ``ar`` on a device follows:
a round of N nodes pays when its tokens per round exceed its cost in plain rounds.

    PYTHONPATH=. python tools/issue13/fixed_trees.py [--threads 2] [--weights auto] [--drafters eagle,auto]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from meshd.lab.bench import EVERYDAY
from meshd.serve.local import LocalModel
from models import engine
from models.budget import CostCurve, TreeBudget
from models.tree import Tree


class FixedBudget(TreeBudget):
    """Draft every round and verify ``n`` nodes of each draft, whatever they are worth."""

    def __init__(self, n: int):
        super().__init__(CostCurve({1: 1.0, 64: 2.0}), back_off=False)
        self.n = n

    def choose(self, tree: Tree, overhead: float = 0.0, cost=None, load_rows: int = 0, load_gain: float = 0.0) -> int:
        return self.n

    def keep_hint(self) -> int:
        return max(self.n, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--drafters", default="eagle,auto")
    ap.add_argument("--nodes", default="0,1,2,3")
    ap.add_argument("--prompts", type=int, default=12, help="the first N everyday prompts")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2, help="each setting's best pass counts")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    local = LocalModel("default", "auto", a.weights)
    target = local.target
    qs = [json.loads(line) for line in EVERYDAY.read_text().splitlines()][: a.prompts]
    prompts = [local.encode(q["turns"][0]) for q in qs]
    n = len(prompts)
    print(f"threads {a.threads}, weights {target.weights}, {n} everyday prompts x {a.max_tokens} tokens, T=0")

    def run(mode: str, drafter, n: int | None) -> tuple[float, float, float]:
        sec, toks, rounds = 0.0, 0, 0
        for p in prompts:
            t0 = time.perf_counter()
            if mode == "ar":
                g = engine.generate(target, p, max_new_tokens=a.max_tokens, mode="ar", eos_ids=local.eos)
            else:  # N=0: one level of the draft is enough to pay its fixed costs
                g = engine.generate(
                    target,
                    p,
                    max_new_tokens=a.max_tokens,
                    mode="spec",
                    drafter=drafter,
                    eos_ids=local.eos,
                    top_k=8 if n else 1,
                    depth=max(1, n),
                    budget=FixedBudget(n),
                )
            sec += time.perf_counter() - t0 - g.stats.prefill_seconds
            toks += g.stats.new_tokens
            rounds += g.stats.rounds
        return sec / rounds * 1e3, sec / toks * 1e3, toks / rounds

    settings = [("ar", None, None)] + [
        (name, local.drafter(name), n) for name in a.drafters.split(",") for n in map(int, a.nodes.split(","))
    ]
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(a.repeats):
        for name, drafter, n in settings:
            key = "ar" if n is None else f"{name} N={n}"
            got = run("ar" if n is None else "spec", drafter, n)
            if key not in best or got[0] < best[key][0]:
                best[key] = got
    ar_round = best["ar"][0]
    print("| setting | ms/round | ms/token | tokens/round | round in plain rounds |")
    print("|---|---|---|---|---|")
    for key, (per_round, per_token, tpr) in best.items():
        print(f"| {key} | {per_round:.2f} | {per_token:.2f} | {tpr:.3f} | {per_round / ar_round:.2f} |")


if __name__ == "__main__":
    main()
