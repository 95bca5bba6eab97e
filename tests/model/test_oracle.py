"""The decoding oracle: speculative output equals plain greedy decoding of the same model.

The only allowed difference is at a first divergence where plain greedy's top-2 logits are a
near-tie (:func:`near_tie`: within what rounding may move them, so batched tree verification may
break the tie the other way); the check asserts exactly that condition and compares nothing after it.
"""

from __future__ import annotations

import pytest
import torch
from support import forward_terms, make_tiny_checkpoint, prompts, rounding_tolerance

from models.budget import CostCurve, TreeBudget
from models.drafters import NGramDrafter, load_drafter
from models.engine import generate
from models.source import ModelSource
from models.stage import Stage


def near_tie(stage: Stage, context: int, top: float) -> float:
    """The top-2 logit gap under which another batch shape may pick the other token: speculative
    decoding computes the same logits in tree-sized batches (and the mesh in slices), so each of
    the two may move by the rounding bound of a forward over ``context`` keys."""
    return 2 * rounding_tolerance(stage.dtype, forward_terms(stage.cfg, context, n_layers=stage.n_layers), abs(top))


def greedy_reference(stage: Stage, prompt: list[int], n: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Token-by-token greedy decoding, recording at every step the top-2 logit gap in units of
    :func:`near_tie` (below 1: a near-tie)."""
    cache = stage.new_cache()
    h = stage.forward_one(stage.embed(prompt), cache, torch.arange(len(prompt)))[-1:]
    out, gaps = [], []
    while len(out) < n:
        logits = stage.logits(h)[0]
        top2 = logits.topk(2).values
        # counted at the longest context of the run (prompt + n), where the bound is largest
        gaps.append(float(top2[0] - top2[1]) / near_tie(stage, len(prompt) + n, float(top2[0])))
        out.append(int(logits.argmax()))
        if out[-1] in eos:
            break
        h = stage.forward_one(stage.embed([out[-1]]), cache, torch.tensor([len(prompt) + len(out) - 1]))
    return out, gaps


def assert_matches_greedy(got: list[int], want: list[int], gaps: list[float]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert gaps[i] < 1.0, f"diverged at token {i} ({g} != {w}) with a top-2 gap of {gaps[i]:.3g} near-ties"
            return
    assert len(got) == len(want), f"lengths differ without a divergence: {len(got)} vs {len(want)}"


# steep CPU-like and flat GPU-like cost curves must both stay exact
CURVES = {"steep": CostCurve({1: 1.0, 8: 1.6, 64: 6.0}), "flat": CostCurve({1: 1.0, 64: 1.05})}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drafter_kind", ["ngram", "model-early-exit", "model-separate"])
@pytest.mark.parametrize("curve", list(CURVES))
def test_tiny_spec_equals_greedy(tmp_path_factory, seed, drafter_kind, curve):
    root = tmp_path_factory.mktemp(f"oracle{seed}")
    target_dir = make_tiny_checkpoint(root / "target", seed=seed)
    target = Stage.load(ModelSource.resolve(target_dir), dtype="fp32")
    if drafter_kind == "ngram":
        drafter = NGramDrafter()
    elif drafter_kind == "model-early-exit":
        drafter = load_drafter(f"model:{target_dir}@2", target)
    else:
        drafter = load_drafter(f"model:{make_tiny_checkpoint(root / 'draft', seed=seed + 100)}", target)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        prompt = torch.randint(0, 64, (12,), generator=g).tolist()
        want, gaps = greedy_reference(target, prompt, 48, set())
        res = generate(target, prompt, max_new_tokens=48, drafter=drafter, budget=TreeBudget(CURVES[curve]))
        assert_matches_greedy(res.token_ids, want, gaps)
        assert res.stats.new_tokens == 48 and res.stats.rounds <= 48


def test_tiny_ar_and_eos(tiny_dir):
    target = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = [1, 2, 3, 4]
    want, _ = greedy_reference(target, prompt, 20, set())
    eos = want[7]
    res = generate(target, prompt, max_new_tokens=20, mode="ar", eos_ids=[eos])
    assert res.token_ids == want[: want.index(eos) + 1] and res.finish_reason == "stop"
    res = generate(target, prompt, max_new_tokens=20, drafter=NGramDrafter(), eos_ids=[eos])
    assert res.token_ids == want[: want.index(eos) + 1] and res.finish_reason == "stop"


def chat_ids(tok, question: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def embedded_references(embedded, embedded_tokenizer):
    """Eight Spec-Bench prompts (one per category) with their plain greedy continuations."""
    eos = set(embedded.cfg.eos_token_ids)
    questions = prompts(1, categories=8)
    assert len(questions) == 8
    out = []
    for q in questions:
        prompt = chat_ids(embedded_tokenizer, q["turns"][0])
        out.append((prompt, *greedy_reference(embedded, prompt, 64, eos)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)  # 8 prompts x 64 tokens of the real model; ~2 min on a quiet 2-core box
@pytest.mark.parametrize(("drafter_spec", "depth"), [("ngram", 8), ("model:default@6", 3)])
def test_embedded_spec_equals_greedy(embedded, embedded_references, drafter_spec, depth):
    drafter = load_drafter(drafter_spec, embedded)
    eos = sorted(embedded.cfg.eos_token_ids)
    accepted = []
    for prompt, want, gaps in embedded_references:
        res = generate(
            embedded,
            prompt,
            max_new_tokens=64,
            drafter=drafter,
            eos_ids=eos,
            depth=depth,
            budget=TreeBudget(CostCurve({1: 1.0, 8: 1.3, 64: 3.0})),
        )
        assert_matches_greedy(res.token_ids, want, gaps)
        accepted.append(res.stats.mean_accepted)
    assert sum(accepted) / len(accepted) > 1.0  # the drafter was actually used, not bypassed
