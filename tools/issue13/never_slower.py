"""Issue 13, "never slower than plain decoding": `ar` against `spec` on one device, per prompt, A/B.

Three modes per prompt, interleaved in one process (their order rotates every repeat): `ar`,
`spec` as it is (the budget backs off drafts that do not pay), and `spec-always` (the same budget
told to draft every round: the behaviour before the backoff). The machine is shared, so each mode's
time on a prompt is the best of ``--repeats`` runs, and the figures are ratios within one run.

    PYTHONPATH=. python tools/issue13/never_slower.py --prompts 24 --repeats 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from meshd.lab.bench import EVERYDAY, spread_over_categories
from meshd.serve.local import LocalModel
from models.budget import CostCurve, TreeBudget
from models.engine import generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--drafter", default="auto")
    ap.add_argument("--weights", default="auto", help="as meshd bench --weights (auto: native int4/int8 here)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, weights {a.weights}, {a.max_tokens} new tokens, T=0, best of {a.repeats}", flush=True)
    local = LocalModel("default", "auto", a.weights)
    curve = CostCurve(local.curve)
    drafter = local.drafter(a.drafter)
    qs = spread_over_categories([json.loads(line) for line in EVERYDAY.read_text().splitlines()], a.prompts)
    modes = {
        "ar": lambda: None,
        "spec": lambda: TreeBudget(curve),
        "spec-always": lambda: TreeBudget(curve, back_off=False),
    }
    rows = []
    t0 = time.perf_counter()
    for qi, q in enumerate(qs):
        prompt = local.encode(q["turns"][0])
        best: dict[str, dict] = {}
        names = list(modes)
        for r in range(a.repeats):
            k = (qi + r) % len(names)
            for m in names[k:] + names[:k]:
                budget = modes[m]()
                res = generate(
                    local.target,
                    prompt,
                    max_new_tokens=a.max_tokens,
                    mode="ar" if m == "ar" else "spec",
                    drafter=None if m == "ar" else drafter,
                    eos_ids=local.eos,
                    budget=budget,
                )
                st = res.stats
                rec = {
                    "seconds": st.seconds,
                    "tokens": st.new_tokens,
                    "ids": res.token_ids,
                    "draft_seconds": st.draft_seconds,
                    "rounds": st.rounds,
                    "plain_rounds": budget.plain_rounds if budget else st.rounds,
                }
                if m not in best or rec["seconds"] < best[m]["seconds"]:
                    best[m] = rec
        same = all(best[m]["ids"] == best["ar"]["ids"] for m in best)
        row = {
            "question_id": q["question_id"],
            "category": q["category"],
            "tokens": best["ar"]["tokens"],
            "same_output": same,
            **{f"{m}_s": round(best[m]["seconds"], 4) for m in names},
            "spec_over_ar": round(best["ar"]["seconds"] / best["spec"]["seconds"], 4),
            "always_over_ar": round(best["ar"]["seconds"] / best["spec-always"]["seconds"], 4),
            "spec_draft_share": round(best["spec"]["draft_seconds"] / best["spec"]["seconds"], 3),
            "always_draft_share": round(best["spec-always"]["draft_seconds"] / best["spec-always"]["seconds"], 3),
            "spec_rounds": best["spec"]["rounds"],
            "spec_plain_rounds": best["spec"]["plain_rounds"],
            "always_rounds": best["spec-always"]["rounds"],
        }
        rows.append(row)
        print(
            f"q{row['question_id']:<3} {row['category']:<10} {row['tokens']:3d} tok  spec/ar {row['spec_over_ar']:.3f}"
            f"  always/ar {row['always_over_ar']:.3f}  plain {row['spec_plain_rounds']}/{row['spec_rounds']}"
            f"  draft share {row['spec_draft_share']:.2f}/{row['always_draft_share']:.2f}  same {same}"
            f"  [{time.perf_counter() - t0:.0f}s]",
            flush=True,
        )
    for key in ("spec_over_ar", "always_over_ar"):
        v = [r[key] for r in rows]
        print(
            f"{key}: mean {statistics.mean(v):.3f}  median {statistics.median(v):.3f}  worst {min(v):.3f}"
            f"  best {max(v):.3f}  more than 5 % slower: {sum(x < 0.95 for x in v)}/{len(v)}"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
