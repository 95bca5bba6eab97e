"""Issue 13, "never slower than plain decoding": `ar` against `spec` on one device, per prompt, A/B.

Modes per prompt, interleaved in one process (their order rotates every repeat), ``--modes`` of:
`ar`; `spec` as it is (the budget backs off drafts that do not pay; while it does, the n-gram part
still drafts every round); `spec-prior` (the same with a :class:`~models.budget.DraftPrior` carried
across prompts: every repeat of a prompt starts from what the earlier prompts left, and the first
repeat's verdict is what the next prompt sees, so a prompt never learns from its own runs);
`spec-capped` (`spec-prior` with the loss cap ``meshd generate`` uses, ``max_loss``);
`spec-nocheap` (backoff without the n-gram rounds: the budget of the session before the prior);
`spec-always` (the budget told to draft every round: the behaviour before the backoff);
`spec-uncoupled` (`spec-capped` with deterministic top-k drafts at ``--temperature`` > 0: drafting before
the head ranked with the target's noise, models/drafters.py ``couple``). Sampled runs (``--temperature``)
seed every request alike, so every mode writes the same text.

Times are the calling thread's CPU time (``time.thread_time``; torch runs on this thread with
``--threads 1``), which other jobs on a shared machine disturb far less than wall time; wall-time
ratios are printed as well. Each mode's time on a prompt is the best of ``--repeats`` runs.

    PYTHONPATH=. python tools/issue13/never_slower.py --prompts 24 --repeats 3 --max-tokens 64
    PYTHONPATH=. python tools/issue13/never_slower.py --questions PATH/TO/spec_bench/question.jsonl --prompts 26
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from meshd.lab.bench import EVERYDAY, question_file, spread_over_categories
from meshd.serve.local import LocalModel
from models import engine
from models.budget import MAX_LOSS, CostCurve, DraftPrior, TreeBudget
from models.drafters import couple
from models.verify import Sampling
from training.prompts import load_questions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--drafter", default="auto")
    ap.add_argument("--weights", default="auto", help="as meshd bench --weights (auto: native int4/int8 here)")
    ap.add_argument("--modes", default="ar,spec,spec-prior,spec-nocheap")
    ap.add_argument(
        "--questions",
        default="everyday",
        help="everyday (the project's own prompts) or a Spec-Bench question.jsonl (its held-out split is used)",
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="sampled runs: every request seeded with 0")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sampling = Sampling(a.temperature)
    print(
        f"threads {a.threads}, weights {a.weights}, {a.max_tokens} new tokens, T={a.temperature:g},"
        f" best of {a.repeats}",
        flush=True,
    )
    local = LocalModel("default", "auto", a.weights)
    curve = CostCurve(local.curve)
    drafter = local.drafter(a.drafter)
    path = question_file(a.questions)
    questions = load_questions(path, held_out_only=path != EVERYDAY)  # Spec-Bench: the split never trained on
    qs = spread_over_categories(questions, a.prompts)
    priors: dict[str, DraftPrior] = {}  # the mode's prior as the earlier prompts left it
    factories = {
        "ar": lambda pr: None,
        "spec": lambda pr: TreeBudget(curve),
        "spec-prior": lambda pr: TreeBudget(curve, prior=pr),
        "spec-capped": lambda pr: TreeBudget(curve, prior=pr, max_loss=MAX_LOSS),
        "spec-nocheap": lambda pr: TreeBudget(curve, cheap=False),
        "spec-always": lambda pr: TreeBudget(curve, back_off=False),
        "spec-uncoupled": lambda pr: TreeBudget(curve, prior=pr, max_loss=MAX_LOSS),
    }
    names = a.modes.split(",")
    if names[0] != "ar" or any(m not in factories for m in names):
        raise SystemExit(f"--modes: 'ar' first, then any of {sorted(factories)}")
    rows = []
    t0 = time.perf_counter()
    for qi, q in enumerate(qs):
        prompt = local.encode(q["turns"][0])
        best: dict[str, dict] = {}
        after: dict[str, DraftPrior] = {}
        for r in range(a.repeats):
            k = (qi + r) % len(names)
            for m in names[k:] + names[:k]:
                prior = priors.setdefault(m, DraftPrior()).copy()
                budget = factories[m](prior)
                wait = prior.wait
                engine.couple = (lambda *_: None) if m == "spec-uncoupled" else couple
                c0, w0 = time.thread_time(), time.perf_counter()
                res = engine.generate(
                    local.target,
                    prompt,
                    max_new_tokens=a.max_tokens,
                    mode="ar" if m == "ar" else "spec",
                    drafter=None if m == "ar" else drafter,
                    eos_ids=local.eos,
                    budget=budget,
                    sampling=sampling,
                    seed=0,
                )
                cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
                engine.couple = couple
                after.setdefault(m, prior)  # the first repeat's verdict goes on to the next prompt
                st = res.stats
                rec = {
                    "cpu": cpu,
                    "wall": wall,
                    "tokens": st.new_tokens,
                    "ids": res.token_ids,
                    "draft_seconds": st.draft_seconds,
                    "rounds": st.rounds,
                    "plain_rounds": budget.plain_rounds if budget else st.rounds,
                    "accepted": st.accepted_drafts,
                    "wait": wait,
                }
                if m not in best or rec["cpu"] < best[m]["cpu"]:
                    best[m] = {**rec, "wall": min(wall, best.get(m, rec)["wall"])}
                else:
                    best[m]["wall"] = min(wall, best[m]["wall"])
        priors.update(after)
        differ = [m for m in best if best[m]["ids"] != best["ar"]["ids"]]
        row = {
            "question_id": q["question_id"],
            "category": q["category"],
            "prompt_tokens": len(prompt),
            "tokens": best["ar"]["tokens"],
            "differ_from_ar": differ,
            **{f"{m}_cpu": round(best[m]["cpu"], 4) for m in names},
            **{f"{m}_wall": round(best[m]["wall"], 4) for m in names},
            **{f"{m}_over_ar": round(best["ar"]["cpu"] / best[m]["cpu"], 4) for m in names[1:]},
            **{f"{m}_over_ar_wall": round(best["ar"]["wall"] / best[m]["wall"], 4) for m in names[1:]},
            **{f"{m}_draft_share": round(best[m]["draft_seconds"] / best[m]["wall"], 3) for m in names[1:]},
            **{f"{m}_plain_rounds": f"{best[m]['plain_rounds']}/{best[m]['rounds']}" for m in names[1:]},
            **{f"{m}_accepted": best[m]["accepted"] for m in names[1:]},
            **{f"{m}_tokens": best[m]["tokens"] for m in names[1:]},
            # seconds per new token (prefill included) against ar's: the fair figure where a float near-tie
            # made the mode's greedy text, and so its length, differ from ar's
            **{
                f"{m}_over_ar_per_token": round(
                    (best["ar"]["cpu"] / best["ar"]["tokens"]) / (best[m]["cpu"] / best[m]["tokens"]), 4
                )
                for m in names[1:]
            },
            "prior_wait": best.get("spec-prior", {}).get("wait"),
        }
        rows.append(row)
        ratios = "  ".join(f"{m} {row[f'{m}_over_ar']:.3f} ({row[f'{m}_plain_rounds']})" for m in names[1:])
        print(
            f"q{row['question_id']:<3} {row['category']:<10} {row['tokens']:3d} tok  {ratios}"
            f"  prior wait {row['prior_wait']}  differ {','.join(differ) or '-'}  [{time.perf_counter() - t0:.0f}s]",
            flush=True,
        )
    for m in names[1:]:
        for key in (f"{m}_over_ar", f"{m}_over_ar_per_token", f"{m}_over_ar_wall"):
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
