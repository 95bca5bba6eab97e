"""The decoding oracle: speculative output equals plain greedy decoding of the same model.

The only allowed difference is at a first divergence where plain greedy's top-2 logits are a
near-tie (:func:`near_tie`: within what rounding may move them, so batched tree verification may
break the tie the other way); the check asserts exactly that condition and compares nothing after it.
"""

from __future__ import annotations

import pytest
import torch
from support import CURVES, assert_matches_greedy, chat_ids, greedy_reference, make_tiny_checkpoint, prompts

from models.budget import CostCurve, TreeBudget
from models.drafters import NGramDrafter, load_drafter
from models.engine import generate
from models.source import ModelSource
from models.stage import Stage
from models.tree import Tree


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


class _LateDrafter:
    """Drafts nothing until ``start`` tokens are out, then the greedy continuation itself (p = 1): a
    drafter that does not pay for its own cost, then one that does."""

    def __init__(self, want: list[int], prompt_len: int, start: int):
        self.want, self.prompt_len, self.start = want, prompt_len, start
        self.calls, self.rows = 0, 0

    def reset(self, prompt: list[int]) -> None:
        self.calls, self.rows = 0, 0

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self.rows += 0 if hidden is None else hidden.shape[0]

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        self.calls += 1
        # plain rounds too hand the drafter the target's features: one per position before the root
        assert self.rows == len(context) - 1, (self.rows, len(context))
        tree, node = Tree.root(context[-1]), 0
        done = len(context) - self.prompt_len
        if done >= self.start:
            for tok in self.want[done : done + depth]:
                node = tree.add(node, tok, 0.0)
        return tree


def test_spec_stops_drafting_while_drafts_do_not_pay_and_resumes_when_a_probe_does(tiny_dir):
    """The budget backs off a drafter whose drafts cost time and yield nothing (plain rounds, no drafter
    call), probes it again with doubling waits, and drafts every round again once a probe pays;
    the output is plain greedy decoding's throughout."""
    target = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = [5, 9, 2, 7, 1, 3]
    want, gaps = greedy_reference(target, prompt, 48, set())
    drafter = _LateDrafter(want, len(prompt), start=20)
    budget = TreeBudget(CURVES["steep"])
    said = []  # what the budget answered each round it was asked (the last token's round does not ask)
    ask = budget.drafting
    budget.drafting = lambda: said.append(ask()) or said[-1]
    res = generate(target, prompt, max_new_tokens=48, drafter=drafter, budget=budget, depth=6)
    assert_matches_greedy(res.token_ids, want, gaps)
    assert budget.plain_rounds >= 14  # of the first 20 tokens' rounds, at most 6 drafted (2, 4, 8, 16 waits)
    assert drafter.calls == sum(said) and budget.plain_rounds == said.count(False)  # plain rounds call no drafter
    # every round asks but the answer's last token's, when a round starts one token before the end: where the
    # drafted rounds land (they follow measured times) decides whether one does
    assert res.stats.rounds - len(said) in (0, 1)
    assert max(res.stats.per_round) > 1  # a probe paid: drafting resumed and its drafts were accepted


@pytest.fixture(scope="module")
def embedded_references(embedded, embedded_tokenizer):
    """Eight everyday prompts (one per category) with their plain greedy continuations."""
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


def test_no_row_is_verified_past_the_answers_end(tiny_dir, monkeypatch):
    """A drafter that knows the answer drafts it past its end token and past the length limit (as the n-gram
    table drafts the chat template after an answer's last full stop); those nodes are never verified, and
    the output is still greedy decoding's."""
    import models.engine as engine

    target = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = [5, 9, 2, 7, 1, 3]
    want, _ = greedy_reference(target, prompt, 30, set())
    end = next(i for i in range(10, 30) if want.index(want[i]) == i)  # a token not seen before position i
    verified: list[tuple[Tree, int]] = []  # each verified tree, and the tokens emitted before its round
    real = engine.verify_tree

    def recording(target, cache, tree, base, *args, **kwargs):
        verified.append((tree, base + 1 - len(prompt)))
        return real(target, cache, tree, base, *args, **kwargs)

    monkeypatch.setattr(engine, "verify_tree", recording)
    for limit, stop in ((30, [want[end]]), (end - 2, [])):
        verified.clear()
        budget = TreeBudget(CURVES["flat"], back_off=False)  # rows nearly free: every drafted node verified
        drafter = _LateDrafter(want, len(prompt), start=0)
        res = generate(target, prompt, max_new_tokens=limit, drafter=drafter, eos_ids=stop, budget=budget, depth=6)
        assert res.token_ids == want[: end + 1 if stop else limit]
        for tree, emitted in verified:
            assert not set(tree.tokens[1:]) & set(stop)
            assert max(tree.depth) < limit - emitted  # no node for the last token the length allows, or after
        assert max(res.stats.per_round) > 1
