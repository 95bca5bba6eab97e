"""While the budget backs off the drafter, its cheap part (n-gram lookup) still drafts every round, and a
prior carried across requests can start a request backed off; the output stays plain greedy decoding's."""

from __future__ import annotations

import math

import pytest
import torch
from support import CURVES, assert_matches_greedy, chat_ids, greedy_reference, prompts

from models.budget import MAX_LOSS, CostCurve, DraftPrior, TreeBudget
from models.drafters import MergedDrafter, NGramDrafter, cheap_part, likeliest_first, load_drafter
from models.engine import generate
from models.source import ModelSource
from models.stage import Stage
from models.tree import Tree


class _Part:
    """A drafter part that proposes the greedy continuation (p = 1, ``depth`` deep) once ``start`` tokens
    are out, and nothing before; ``start=None``: never. Records the context length of every call."""

    def __init__(self, name: str, want: list[int], prompt_len: int, start: int | None, cheap: bool):
        self.name, self.cheap = name, cheap
        self.want, self.prompt_len, self.start = want, prompt_len, start
        self.contexts: list[int] = []

    def reset(self, prompt: list[int]) -> None:
        self.contexts = []

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        pass

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        self.contexts.append(len(context))
        tree, node = Tree.root(context[-1]), 0
        done = len(context) - self.prompt_len
        if self.start is not None and done >= self.start:
            for tok in self.want[done : done + depth]:
                node = tree.add(node, tok, 0.0)
        return tree


def test_cheap_part_is_the_lookup_of_a_merged_drafter_only():
    head = _Part("head", [], 0, None, cheap=False)
    ngram = NGramDrafter()
    assert cheap_part(MergedDrafter([head, ngram])) is ngram
    assert cheap_part(ngram) is None  # alone, backing it off means not drafting
    assert cheap_part(MergedDrafter([NGramDrafter(), NGramDrafter()])) is None
    assert cheap_part(head) is None and cheap_part(None) is None


def _setup(tiny_dir, start_cheap: int | None, start_head: int | None):
    target = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = [5, 9, 2, 7, 1, 3]
    want, gaps = greedy_reference(target, prompt, 40, set())
    head = _Part("head", want, len(prompt), start_head, cheap=False)
    lookup = _Part("lookup", want, len(prompt), start_cheap, cheap=True)
    return target, prompt, want, gaps, head, lookup, MergedDrafter([head, lookup])


def test_the_cheap_part_speculates_while_the_rest_is_backed_off(tiny_dir):
    """The head never drafts anything (backed off after round 1, probed with doubling waits); the lookup
    finds the continuation from token 8 on and is verified in the rounds between the head's probes."""
    target, prompt, want, gaps, head, lookup, drafter = _setup(tiny_dir, start_cheap=8, start_head=None)
    budget = TreeBudget(CURVES["steep"])
    res = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=budget, depth=4)
    assert_matches_greedy(res.token_ids, want, gaps)
    assert len(lookup.contexts) == res.stats.rounds  # every round: merged into full drafts, alone otherwise
    assert len(head.contexts) == res.stats.rounds - budget.plain_rounds  # not called while backed off
    first = next(i for i, n in enumerate(res.stats.per_round) if n > 1)  # the first round that accepted drafts
    at = len(prompt) + 1 + sum(res.stats.per_round[:first])  # its context length
    assert at in lookup.contexts and at not in head.contexts  # the lookup alone, the head backed off

    off = TreeBudget(CURVES["steep"], cheap=False)  # the same without the cheap rounds: the lookup waits too
    target, prompt, want, gaps, head, lookup, drafter = _setup(tiny_dir, start_cheap=8, start_head=None)
    res_off = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=off, depth=4)
    assert_matches_greedy(res_off.token_ids, want, gaps)
    assert lookup.contexts == head.contexts and res_off.stats.rounds > res.stats.rounds
    # the records count the trees of the root alone: at least every backed-off round; ar's every tree
    assert res_off.stats.plain_trees >= off.plain_rounds > 0 and res.stats.plain_trees < res_off.stats.plain_trees
    ar = generate(target, prompt, max_new_tokens=8, mode="ar")
    assert ar.stats.plain_trees == ar.stats.trees == 7


def test_a_prior_of_failed_requests_starts_the_next_backed_off_and_learns_from_it(tiny_dir):
    prior = DraftPrior(probe_after=2)
    prior.record(False)
    prior.record(False)  # wait 4
    target, prompt, want, gaps, head, _lookup, drafter = _setup(tiny_dir, start_cheap=None, start_head=None)
    budget = TreeBudget(CURVES["steep"], prior=prior)
    res = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=budget, depth=4)
    assert_matches_greedy(res.token_ids, want, gaps)
    # the first token comes from the prefill; rounds 1-4 are plain, round 5 the first full draft
    assert head.contexts[0] == len(prompt) + 1 + 4
    # its probes (rounds 5, 14, 31) failed too: the wait it reached (32) halved is the next request's
    assert prior.wait == 16

    # drafts that pay (the head proposes the continuation at once): the prior lets the next request draft at once
    target, prompt, want, gaps, head, _lookup, drafter = _setup(tiny_dir, start_cheap=None, start_head=0)
    res = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=TreeBudget(CURVES["flat"], prior=prior))
    assert_matches_greedy(res.token_ids, want, gaps)
    assert head.contexts[0] == len(prompt) + 1 + 16 and max(res.stats.per_round) > 1
    assert prior.wait == 0


def test_a_capped_request_starts_plain_and_drafts_once_its_books_allow(tiny_dir):
    """With ``max_loss`` (as `meshd generate` builds its budget; here a large share, so that a tiny model's
    sub-millisecond rounds earn the first draft soon on any machine) a request's first round is plain
    whatever the drafters offer (nothing measured, nothing to lose), drafts follow once the measured time
    allows, and the output stays greedy decoding's."""
    target, prompt, want, gaps, head, _lookup, drafter = _setup(tiny_dir, start_cheap=0, start_head=0)
    seconds = CostCurve({1: 1e-4, 64: 2e-4})  # a curve in seconds, as the books need: rows nearly free
    budget = TreeBudget(seconds, max_loss=0.5)
    res = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=budget, depth=4)
    assert_matches_greedy(res.token_ids, want, gaps)
    assert res.stats.per_round[0] == 1 and budget.capped_rounds >= 1
    assert head.contexts and head.contexts[0] > len(prompt) + 1  # not at the first round
    assert max(res.stats.per_round) > 1 and budget.allowance() > 0  # the drafts paid: credit in the books
    assert 0 < MAX_LOSS < 0.05  # what `meshd generate` and `serve` allow: "a few per cent" at worst


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_embedded_default_drafter_with_prior_and_cheap_rounds_equals_greedy(
    embedded, embedded_source, embedded_tokenizer
):
    """The real model with its default drafter (head + n-gram) and the one-device budget as `meshd generate`
    builds it (a CPU-like curve, backing off, cheap rounds, one prior across the requests): every text is
    plain greedy decoding's, and a prompt that asks for a copy still speculates whatever the prior says."""
    drafter = load_drafter("auto", embedded, source=embedded_source)
    eos = sorted(embedded.cfg.eos_token_ids)
    prior = DraftPrior()
    copy = "Repeat this sentence exactly, twice: the quick brown fox jumps over the lazy dog near the river bank."
    texts = [q["turns"][0] for q in prompts(1, categories=2)] + [copy]
    for text in texts:
        prompt = chat_ids(embedded_tokenizer, text)
        want, gaps = greedy_reference(embedded, prompt, 48, set(eos))
        budget = TreeBudget(CostCurve({1: 1.0, 2: 1.4, 8: 3.0, 64: 19.0}), prior=prior)
        res = generate(embedded, prompt, max_new_tokens=48, drafter=drafter, eos_ids=eos, budget=budget)
        assert_matches_greedy(res.token_ids, want, gaps)
    assert res.stats.accepted_drafts > 0 and res.stats.mean_accepted > 1.2, res.stats


def test_the_lookup_tells_its_likeliest_node_without_drafting():
    """NGramDrafter.best_first is the probability of the likeliest node its draft would hold (none scores
    higher), which lets the budget skip drafts that could not pay (TreeBudget.cheap_may_pay)."""
    ngram = NGramDrafter()
    context = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]  # "1 2 3" was followed by 4 and by 5
    ngram.reset(context[:-1])
    ngram.accept(context, None)
    tree = ngram.draft(context, top_k=4, depth=3, max_nodes=64)
    best = max(math.exp(s) for s in tree.scores[1:])
    assert ngram.best_first(context) == pytest.approx(best) == pytest.approx(0.9 * 1 / 2)
    assert ngram.best_first([7, 8, 9]) == 0.0  # nothing like it seen: the draft would be the root alone
    assert likeliest_first(MergedDrafter([NGramDrafter(), ngram]), context) == pytest.approx(best)


def test_a_cheap_part_that_says_nothing_can_pay_is_not_drafted(tiny_dir):
    """While the head is backed off, a cheap part whose likeliest node could not pay for a row is not asked to
    draft at all (it used to draft every round, ~0.1 ms a round on a 2-core CPU); the output stays greedy."""
    target, prompt, want, gaps, head, lookup, drafter = _setup(tiny_dir, start_cheap=8, start_head=None)
    lookup.best_first = lambda context: 0.01  # a weak lookup: on the steep curve nothing of it pays
    budget = TreeBudget(CURVES["steep"])
    res = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=budget, depth=4)
    assert_matches_greedy(res.token_ids, want, gaps)
    # asked only inside the full drafts (merged with the head's), never alone in the rounds between
    assert lookup.contexts == head.contexts and len(head.contexts) == res.stats.rounds - budget.plain_rounds
