"""Issue 13, "never slower": where `spec`'s extra time goes against `ar`, by kind of round.

Runs `ar` and `spec` (with a :class:`~models.budget.DraftPrior` carried across prompts, as `meshd serve`
keeps one) alternately per prompt, best of ``--repeats`` by wall time, and splits spec's rounds into
plain ones (the budget backs off the head), cheap ones (the n-gram part's tree verified alone), probes
(the first full draft after plain rounds) and full drafts. For each kind it prints rounds, tokens and the
time spent beyond what `ar` took for as many tokens (ar's decode time per token), so a kind that pays
shows a negative figure. What is left of the difference (the request's set-up, the prefill) is the rest.

    PYTHONPATH=. python tools/issue13/round_kinds.py --threads 2 --prompts 12

It wraps ``TreeBudget.drafting``/``choose_cheap``/``observe_round`` and ``models.engine.verify_tree`` to
tell the kinds apart; nothing else changes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meshd.lab.bench import EVERYDAY, question_file, spread_over_categories
from meshd.serve.local import LocalModel
from models import engine
from models.budget import CostCurve, DraftPrior, TreeBudget
from training.prompts import load_questions

KINDS = ("plain", "cheap", "probe", "full")
_log: list[tuple[str, int, float]] = []  # (kind, tokens, seconds) of the current request's rounds
_cheap = {"now": False}


def _instrument() -> None:
    observe, choose_cheap, verify = TreeBudget.observe_round, TreeBudget.choose_cheap, engine.verify_tree

    def observe_round(self, tokens, seconds, drafted):
        _log.append(("probe" if drafted and self.probe else "full" if drafted else "plain", tokens, seconds))
        return observe(self, tokens, seconds, drafted)

    def choose_cheap_(self, *a, **kw):
        n = choose_cheap(self, *a, **kw)
        _cheap["now"] = n > 0
        return n

    def verify_tree(target, cache, tree, *a, **kw):  # cheap rounds are not timed by the budget: time them here
        t = time.perf_counter()
        out = verify(target, cache, tree, *a, **kw)
        if _cheap["now"]:
            _log.append(("cheap", len(out[1]), time.perf_counter() - t))
            _cheap["now"] = False
        return out

    TreeBudget.observe_round, TreeBudget.choose_cheap, engine.verify_tree = observe_round, choose_cheap_, verify_tree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--questions", default="everyday", help="everyday, or a Spec-Bench question.jsonl (held-out)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _instrument()
    local = LocalModel("default", "auto", "auto")
    curve = CostCurve(local.curve)
    drafter = local.drafter("auto")
    path = question_file(a.questions)
    questions = load_questions(path, held_out_only=path != EVERYDAY)  # Spec-Bench: the split never trained on
    prior = DraftPrior()
    ratios = []
    print(
        f"threads {a.threads}, {a.max_tokens} new tokens, T=0, best of {a.repeats}; extra = beyond ar's time per token"
    )
    for q in spread_over_categories(questions, a.prompts):
        prompt = local.encode(q["turns"][0])
        best: dict[str, tuple] = {}
        verdict = None
        for r in range(a.repeats):
            for mode in ("ar", "spec") if r % 2 == 0 else ("spec", "ar"):
                _log.clear()
                budget = TreeBudget(curve, prior=prior.copy()) if mode == "spec" else None
                t0 = time.perf_counter()
                res = engine.generate(
                    local.target,
                    prompt,
                    max_new_tokens=a.max_tokens,
                    mode=mode,
                    drafter=drafter if mode == "spec" else None,
                    eos_ids=local.eos,
                    budget=budget,
                )
                wall = time.perf_counter() - t0
                if mode not in best or wall < best[mode][0]:
                    best[mode] = (wall, res.stats.new_tokens, list(_log), res.stats.prefill_seconds)
                if budget is not None and verdict is None:
                    verdict = budget  # the first repeat's verdict goes on to the next prompt
        prior.record(verdict.verdict, verdict._backoff, verdict._last_full)
        ar_wall, n, _, ar_prefill = best["ar"]
        spec_wall, _, rounds, spec_prefill = best["spec"]
        per_token = (ar_wall - ar_prefill) / n
        parts = []
        for kind in KINDS:
            mine = [(t, s) for k, t, s in rounds if k == kind]
            if mine:
                tokens, secs = sum(t for t, _ in mine), sum(s for _, s in mine)
                parts.append(f"{kind} {len(mine)}r/{tokens}t {1e3 * (secs - tokens * per_token):+.1f}ms")
        ratios.append(ar_wall / spec_wall)
        print(
            f"q{q['question_id']:<4} {q['category']:<14} {n:3d} tok  ar {1e3 * per_token:.2f} ms/tok  spec/ar "
            f"{ratios[-1]:.3f}  extra {1e3 * (spec_wall - ar_wall):+.1f}ms  prefill "
            f"{1e3 * (spec_prefill - ar_prefill):+.1f}ms  " + "  ".join(parts),
            flush=True,
        )
    print(
        f"spec/ar: mean {statistics.mean(ratios):.3f}  worst {min(ratios):.3f}  "
        f"more than 5 % slower: {sum(x < 0.95 for x in ratios)}/{len(ratios)}"
    )


if __name__ == "__main__":
    main()
