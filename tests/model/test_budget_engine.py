"""The engine consults the budget's drafting gate: drafts that never pay give way to plain decoding
(probed again now and then), drafts that do are kept, and the output is greedy decoding's either way."""

from __future__ import annotations

import math

import pytest
from support import CURVES, assert_matches_greedy, greedy_reference

from models.budget import TreeBudget
from models.engine import generate
from models.source import ModelSource
from models.stage import Stage
from models.tree import Tree

N = 96


class OracleDrafter:
    """Drafts a confident chain from a known greedy continuation: the right tokens, or always wrong ones."""

    name = "oracle"

    def __init__(self, prompt: list[int], continuation: list[int], vocab: int, wrong: bool):
        self.n_prompt, self.continuation, self.vocab, self.wrong = len(prompt), continuation, vocab, wrong

    def reset(self, prompt: list[int]) -> None:
        pass

    def accept(self, context: list[int], hidden) -> None:
        pass

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        done = len(context) - self.n_prompt
        tree, node = Tree.root(context[-1]), 0
        for i, tok in enumerate(self.continuation[done : done + depth], start=1):
            node = tree.add(node, (tok + 1) % self.vocab if self.wrong else tok, i * math.log(0.9))
        return tree


@pytest.fixture(scope="module")
def target_and_reference(tiny_dir):
    target = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = [5, 9, 13, 2, 7, 1, 30, 22]
    want, gaps = greedy_reference(target, prompt, N, set())
    return target, prompt, want, gaps


@pytest.mark.parametrize("curve", list(CURVES))
def test_always_wrong_drafts_give_way_to_plain_decoding_and_are_probed(target_and_reference, curve):
    target, prompt, want, gaps = target_and_reference
    drafter = OracleDrafter(prompt, want, target.cfg.vocab_size, wrong=True)
    res = generate(target, prompt, max_new_tokens=N, drafter=drafter, budget=TreeBudget(CURVES[curve]))
    assert_matches_greedy(res.token_ids, want, gaps)
    st = res.stats
    assert st.accepted_drafts == 0 and st.rounds == N - 1  # the first token comes from the prefill
    assert 2 <= st.drafted_rounds <= 6, st.drafted_rounds  # the first round, then probes 4, 8, 16, 32, ... apart
    assert st.verified_nodes <= N + 8 * st.drafted_rounds  # plain rounds verify the root alone


@pytest.mark.parametrize("curve", list(CURVES))
def test_right_drafts_keep_drafting(target_and_reference, curve):
    target, prompt, want, gaps = target_and_reference
    drafter = OracleDrafter(prompt, want, target.cfg.vocab_size, wrong=False)
    res = generate(target, prompt, max_new_tokens=N, drafter=drafter, budget=TreeBudget(CURVES[curve]))
    assert_matches_greedy(res.token_ids, want, gaps)
    st = res.stats
    assert st.drafted_rounds == st.rounds and st.mean_accepted >= 3.0, (st.drafted_rounds, st.rounds)
