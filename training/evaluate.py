"""Held-out evaluation of a draft head: acceptance by exact replay, and speed through the real engine.

Acceptance is measured by replaying reference continuations: the walk of a (greedy or
sampled) verification accepts a drafted child iff it is the token the target emits
(models/verify.py), so simulating rounds against a recorded target rollout gives the same accepted
lengths as running the engine, at the cost of drafting only. Sampled rollouts are drawn with each prompt's
own position-keyed noise, and replayed with drafts ranked by that noise, as serving couples them
(:func:`models.drafters.couple`), and again with deterministic top-k drafts for comparison. The questions
are Spec-Bench's held-out split (``question_id % 4 == 0``, never trained on), read from the path given.

``python -m training.evaluate --head DIR --questions PATH --out eval.json``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.budget import CostCurve, TreeBudget
from models.drafters import Drafter, MergedDrafter, NGramDrafter, couple
from models.eagle import EagleDrafter, load_head
from models.engine import generate
from models.formats import WEIGHT_FORMATS
from models.profile import stage_cost_curve
from models.source import ModelSource
from models.stage import Stage
from models.text import encode_messages, stop_ids
from models.verify import Draws, Sampling
from training.log import log
from training.prompts import (
    EVERYDAY,
    SPEC_BENCH_ENV,
    held_out_questions,
    load_questions,
    read_spec_bench,
    spec_bench_path,
)
from training.rollouts import Rollout, batch_generate, features_label, rollout_draws, work_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def replay_rounds(
    drafter: Drafter,
    r: Rollout,
    *,
    top_k: int,
    depth: int,
    pool: int,
    nodes: int,
    noise: Draws | None = None,
    temperature: float = 0.0,
) -> list[int]:
    """Tokens emitted per round when verifying ``nodes`` best drafted nodes against rollout ``r``.

    Exact for greedy decoding, and for sampled decoding given the sampled continuation: a drafted child
    is accepted iff it is the token the target emits. ``noise``: the noise ``r`` was sampled with (at
    ``temperature``; :func:`training.rollouts.rollout_draws`), which the drafter then ranks with, as a
    serving request's coupled drafter does (:func:`models.drafters.couple`).
    """
    couple(drafter, noise, Sampling(temperature))
    try:
        return _replay(drafter, r, top_k=top_k, depth=depth, pool=pool, nodes=nodes)
    finally:
        couple(drafter, None, Sampling())


def _replay(drafter: Drafter, r: Rollout, *, top_k: int, depth: int, pool: int, nodes: int) -> list[int]:
    plen = r.prompt_len
    ctx = list(r.tokens[: plen + 1])
    drafter.reset(list(r.tokens[:plen]))
    drafter.accept(ctx, r.feats[:plen])
    per_round = []
    total = len(r.tokens)
    while len(ctx) < total:
        tree = drafter.draft(ctx, top_k=top_k, depth=depth, max_nodes=pool)
        tree = tree.best(nodes)
        node, a = 0, 0
        while len(ctx) + a < total:
            c = tree.child_with_token(node, r.tokens[len(ctx) + a])
            if c is None:
                break
            node, a = c, a + 1
        emitted = min(a + 1, total - len(ctx))
        base = len(ctx) - 1
        ctx = list(r.tokens[: len(ctx) + emitted])
        per_round.append(emitted)
        drafter.accept(ctx, r.feats[base : len(ctx) - 1])
    return per_round


def held_out_rollouts(
    stage: Stage,
    tok: PreTrainedTokenizerBase,
    questions: list[dict],
    *,
    max_new: int,
    temperature: float,
    seed: int,
    eos: Sequence[int],
    slots: int,
    cache: Path | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[Rollout]:
    """Reference continuations of held-out questions (cached on disk: evaluation, never training); sampled
    ones with each prompt's own noise (:func:`training.rollouts.rollout_draws` of ``seed`` and its key).

    ``stop`` (a time budget's test) cuts generation short: the rollouts finished by then are
    returned, and nothing is cached (the cache stands for all of ``questions``)."""
    if cache is not None and cache.is_file():
        saved = torch.load(str(cache), map_location="cpu", weights_only=False)
        return [Rollout(**d) for d in saved]
    prompts = [
        (str(q["question_id"]), encode_messages(tok, [{"role": "user", "content": q["turns"][0]}])) for q in questions
    ]
    rolls = batch_generate(
        stage,
        prompts,
        max_new=max_new,
        slots=slots,
        temperature=temperature,
        seed=seed,
        eos=eos,
        stop=stop,
        keyed_noise=temperature > 0,
    )
    order = {k: i for i, (k, _) in enumerate(prompts)}
    rolls.sort(key=lambda r: order[r.key])
    if cache is not None and len(rolls) == len(prompts):
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save([r.__dict__ for r in rolls], str(cache))
    return rolls


def held_out_cache(work: Path, questions: list[dict], max_new: int, temperature: float, numerics: str) -> Path:
    """Where :func:`held_out_rollouts` keeps the rollouts of exactly these questions and settings
    (``numerics``: the target's, :func:`training.rollouts.features_label`)."""
    ids = hashlib.sha256(json.dumps([[q["question_id"], q["turns"][0]] for q in questions]).encode()).hexdigest()[:8]
    keyed = "-keyed" if temperature > 0 else ""  # sampled with each prompt's noise (rollout_draws)
    return work / f"heldout-{ids}-{max_new}-t{temperature:g}{keyed}-{numerics}.pt"


DRAFT_SETTINGS = {
    "chain": dict(top_k=1, depth=8, pool=8, nodes=8),
    "tree16": dict(top_k=8, depth=8, pool=128, nodes=16),
    "tree32": dict(top_k=8, depth=8, pool=128, nodes=32),
    "tree64": dict(top_k=8, depth=10, pool=160, nodes=64),
    "tree128": dict(top_k=8, depth=12, pool=256, nodes=128),
}


def evaluate_acceptance(
    drafters: dict[str, Drafter],
    rolls: list[Rollout],
    categories: dict[str, str],
    settings: Sequence[str] = tuple(DRAFT_SETTINGS),
    deadline: float | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> dict:
    """Mean tokens per round, overall and per category, for each drafter x tree setting.

    ``rolls`` sampled at ``temperature`` > 0 with keyed noise of ``seed`` (:func:`held_out_rollouts`) are
    replayed with drafts coupled to that noise, as serving drafts them; ``seed`` None replays them
    uncoupled (a deterministic top-k drafter, for comparison).

    ``deadline`` (on ``time.perf_counter``, from a time budget) splits the time left evenly between
    the drafter x setting pairs still to run, each replaying rollouts until its share is spent (at
    least one) in the same order, so a cut report still has a figure for every pair, over the first
    rollouts (``rollouts`` says how many)."""
    out: dict = {}
    pairs = [(d, s) for d in drafters for s in settings]
    for i, (dname, sname) in enumerate(pairs):
        drafter = drafters[dname]
        per_cat: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        until = None if deadline is None else t0 + max(0.0, deadline - t0) / (len(pairs) - i)
        replayed = 0
        for r in rolls:
            if replayed and until is not None and time.perf_counter() >= until:
                break
            noise = rollout_draws(seed, r.key) if temperature > 0 and seed is not None else None
            rounds = replay_rounds(drafter, r, **DRAFT_SETTINGS[sname], noise=noise, temperature=temperature)
            per_cat.setdefault(categories[r.key], []).extend(rounds)
            replayed += 1
        allr = [x for v in per_cat.values() for x in v]
        out[f"{dname}/{sname}"] = {
            "mean_accepted": round(sum(allr) / max(len(allr), 1), 3),
            "rounds": len(allr),
            "rollouts": replayed,
            "draft_seconds": round(time.perf_counter() - t0, 2),
            "per_category": {c: round(sum(v) / len(v), 3) for c, v in sorted(per_cat.items())},
        }
        log(f"eval {dname}/{sname}: {out[f'{dname}/{sname}']['mean_accepted']}")
    return out


def engine_speed(
    target: Stage,
    source: ModelSource,
    tok: PreTrainedTokenizerBase,
    questions: list[dict],
    drafters: dict[str, Drafter],
    *,
    max_new: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Tokens/s and tokens/round through the real engine, modes interleaved per prompt (same machine, same run)."""
    curve = CostCurve(stage_cost_curve(source, target, with_lm_head=True))
    eos = stop_ids(tok, target.cfg)
    modes = {"ar": None, **drafters}
    keys = ("tokens", "seconds", "rounds", "verified", "round_tokens")
    acc: dict[str, dict] = {m: dict.fromkeys(keys, 0) for m in modes}
    for qi, q in enumerate(questions):
        prompt = encode_messages(tok, [{"role": "user", "content": q["turns"][0]}])
        for m, d in modes.items():
            res = generate(
                target,
                prompt,
                max_new_tokens=max_new,
                mode="ar" if d is None else "spec",
                drafter=d,
                sampling=Sampling(temperature),
                seed=seed + qi,
                eos_ids=eos,
                budget=None if d is None else TreeBudget(curve),
            )
            a = acc[m]
            a["tokens"] += res.stats.new_tokens
            a["seconds"] += res.stats.seconds
            a["rounds"] += res.stats.rounds
            a["round_tokens"] += sum(res.stats.per_round)
            a["verified"] += res.stats.verified_nodes
    out = {}
    for m, a in acc.items():
        out[m] = {
            "tokens_per_s": round(a["tokens"] / a["seconds"], 2),
            "mean_accepted": round(a["round_tokens"] / a["rounds"], 3),
            "mean_verified_nodes": round(a["verified"] / a["rounds"], 1) if m != "ar" else 1.0,
            "tokens": a["tokens"],
            "seconds": round(a["seconds"], 1),
        }
    base = out["ar"]["tokens_per_s"]
    for m in out:
        out[m]["speedup_vs_ar"] = round(out[m]["tokens_per_s"] / base, 3)
    return {
        "dtype": str(target.dtype),
        "questions": len(questions),
        "max_new": max_new,
        "temperature": temperature,
        "cost_curve_ms": {t: round(s * 1e3, 2) for t, s in curve.to_dict().items()},
        "modes": out,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m training.evaluate --head DIR --questions PATH``: held-out acceptance (replay) and
    engine speed; JSON to --out."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate")
    p.add_argument("--model", default="default")
    p.add_argument("--head", required=True)
    p.add_argument(
        "--questions",
        default=None,
        help=f"Spec-Bench question file, held-out split question_id %% 4 == 0 (default: ${SPEC_BENCH_ENV})",
    )
    p.add_argument(
        "--set",
        default="specbench",
        choices=["specbench", "everyday"],
        help="Spec-Bench's held-out split, or the project's everyday prompts (meshd/lab/prompts/everyday.jsonl, "
        "never trained on)",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--weights",
        default=None,
        choices=WEIGHT_FORMATS,
        help="how the target's weights are held (default: dense in --dtype); the rollouts and the head's features "
        "then come from those numerics, as when serving with them",
    )
    p.add_argument("--per-category", type=int, default=5)
    p.add_argument("--t1-per-category", type=int, default=2)
    p.add_argument("--speed-per-category", type=int, default=1)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--slots", type=int, default=48)
    p.add_argument("--work", default=None)
    p.add_argument("--drafters", default="eagle,ngram,eagle+ngram", help="which drafters' acceptance to replay")
    p.add_argument("--settings", default=",".join(DRAFT_SETTINGS), help="tree settings to replay")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.set == "everyday":
        questions = EVERYDAY
        if a.speed_per_category > 0:
            p.error("--set everyday replays acceptance only; pass --speed-per-category 0")
    else:
        questions = spec_bench_path(a.questions)
        if questions is None:
            p.error(f"the held-out questions are Spec-Bench's: pass --questions PATH or set {SPEC_BENCH_ENV}")
    try:
        read_spec_bench(questions)  # a missing file fails here, before the model loads
    except ValueError as e:
        p.error(str(e))

    def pick(per: int) -> list[dict]:
        if a.set == "everyday":
            return load_questions(questions, per_category=per)
        return held_out_questions(questions, per)

    torch.set_num_threads(os.cpu_count() or 1)
    src = ModelSource.resolve(a.model)
    work = work_dir(src.fingerprint, a.work)
    target = Stage.load(src, dtype=a.dtype, weights=a.weights)
    tok = src.load_tokenizer()
    eos = stop_ids(tok, target.cfg)
    numerics = features_label(target)
    head = load_head(a.head, target.cfg, src.fingerprint)
    eagle = EagleDrafter(head, target)
    drafters = {"eagle": eagle, "ngram": NGramDrafter(), "eagle+ngram": MergedDrafter([eagle.fresh(), NGramDrafter()])}
    report: dict = {"head": str(a.head), "dtype": str(target.dtype), "features": numerics, "set": a.set}
    for temp, per in ((0.0, a.per_category), (1.0, a.t1_per_category)):
        if per <= 0:
            continue
        qs = pick(per)
        cats = {str(q["question_id"]): q["category"] for q in qs}
        rolls = held_out_rollouts(
            target,
            tok,
            qs,
            max_new=a.max_new,
            temperature=temp,
            seed=0,
            eos=eos,
            slots=a.slots,
            cache=held_out_cache(work, qs, a.max_new, temp, numerics),
        )
        log(f"held-out rollouts T={temp:g}: {len(rolls)} prompts")
        chosen = {k: v for k, v in drafters.items() if k in a.drafters.split(",")}
        res = evaluate_acceptance(chosen, rolls, cats, settings=a.settings.split(","), temperature=temp, seed=0)
        report[f"acceptance_T{temp:g}"] = {"questions": len(qs), "results": res}
        if temp > 0:  # the same rollouts with deterministic top-k drafts: what coupling adds
            plain = evaluate_acceptance(chosen, rolls, cats, settings=a.settings.split(","), temperature=temp)
            report[f"acceptance_T{temp:g}"]["uncoupled"] = plain
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    if a.speed_per_category > 0:
        qs = held_out_questions(questions, a.speed_per_category)
        report["engine_speed_T0"] = engine_speed(
            target,
            src,
            tok,
            qs,
            {
                "ngram": NGramDrafter(),
                "eagle": eagle.fresh(),
                "eagle+ngram": MergedDrafter([eagle.fresh(), NGramDrafter()]),
            },
            max_new=a.max_new,
        )
        log(f"engine speed: {json.dumps(report['engine_speed_T0']['modes'])}")
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
