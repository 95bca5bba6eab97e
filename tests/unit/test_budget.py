"""The tree budget: the verified tree's size comes from the cost curve, the acceptance seen and the load."""

from __future__ import annotations

import math

import pytest

from models.budget import CostCurve, TreeBudget
from models.tree import Tree

FLAT = CostCurve({1: 1.0, 64: 1.1})  # a GPU-like stage: 64 rows cost about what one does
STEEP = CostCurve({1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4, 16: 4.0, 64: 13.0})  # a CPU-like stage


def chain_tree(probs: list[float], width: int = 4) -> Tree:
    """A root, then at each level one likely child (prob p) and ``width - 1`` unlikely siblings."""
    t = Tree.root(0)
    node, score = 0, 0.0
    for depth, p in enumerate(probs, start=1):
        for j in range(1, width):
            t.add(node, 100 * depth + j, score + math.log((1 - p) / width))
        score += math.log(p)
        node = t.add(node, depth, score)
    return t


def test_flat_curves_verify_big_trees_steep_ones_small():
    tree = chain_tree([0.8] * 12)
    flat, steep = TreeBudget(FLAT, alpha=1.0).choose(tree), TreeBudget(STEEP, alpha=1.0).choose(tree)
    assert flat > 3 * steep >= 3, (flat, steep)
    assert flat >= 30  # on a flat curve even the 5 %-likely siblings pay for themselves


def test_poor_drafts_fall_back_to_plain_decoding():
    tree = chain_tree([0.05] * 6, width=1)
    assert TreeBudget(STEEP, alpha=1.0).choose(tree) == 0
    assert TreeBudget(FLAT, alpha=1.0).choose(tree) > 0  # nearly free rows: even poor guesses are worth a look


def test_observed_acceptance_moves_the_choice():
    tree = chain_tree([0.7] * 10)
    b = TreeBudget(STEEP)
    before = b.choose(tree)
    for _ in range(10):  # drafts turn out twice as good as they claim
        b.observe(predicted=1.0, accepted=2)
    grown = b.choose(tree)
    for _ in range(30):  # then nothing is ever accepted
        b.observe(predicted=2.0, accepted=0)
    assert grown > before >= 1 and b.choose(tree) < before, (before, grown, b.choose(tree))


@pytest.mark.parametrize("curve", [STEEP, CostCurve({1: 1.0, 16: 1.1, 64: 4.0})])
def test_productive_load_shrinks_trees(curve):
    """FASER: a node is worth its row only while it yields more than the rows other requests put through the
    same forwards; eight plain-decoding requests (a token per row) leave room only for the likeliest nodes."""
    tree = chain_tree([0.8] * 12)
    b = TreeBudget(curve, alpha=1.0)
    idle = b.choose(tree)
    loaded = b.choose(tree, load_rows=8, load_gain=8.0)
    busier = b.choose(tree, load_rows=32, load_gain=32.0)
    assert idle > loaded >= busier, (idle, loaded, busier)


def test_draft_overhead_counts_against_the_tree():
    tree = chain_tree([0.6] * 12)
    b = TreeBudget(STEEP, alpha=1.0)
    assert b.choose(tree, overhead=5.0) > b.choose(tree, overhead=0.0)  # a fixed cost per round favours bigger rounds


# ---- the drafting gate: never much slower than plain decoding ---------------------------------------
# The CPU curve measured for the embedded model (ms; docs/draft-head.md), and a draft that costs a third of a row.
CPU = CostCurve({1: 21.7, 4: 21.7, 8: 25.5, 16: 35.2, 32: 47.5, 64: 81.6})
DRAFT_MS = 7.0


def simulate(b: TreeBudget, accepted_of, n_tokens: int, probs: list[float]) -> tuple[float, list[bool]]:
    """Drive the budget as the engine does for ``n_tokens`` tokens; return the model time spent
    (ms: draft overhead + verification forwards) and whether each round drafted.
    ``accepted_of(tree)``: how many of the verified tree's drafted tokens the target accepts."""
    spent, drafted, done = 0.0, [], 0
    while done < n_tokens:
        if b.draft_now():
            tree = chain_tree(probs).best(b.choose(chain_tree(probs), overhead=DRAFT_MS))
            acc = accepted_of(tree)
            b.observe(b.expected(tree), acc)
            b.record_draft(rows=len(tree), tokens=acc + 1, overhead=DRAFT_MS)
            spent += DRAFT_MS + CPU(len(tree))
            done += acc + 1
            drafted.append(True)
        else:
            b.record_plain()
            spent += CPU(1)
            done += 1
            drafted.append(False)
    return spent, drafted


def on_chain(tree: Tree) -> int:
    """Accepted tokens when the target always follows the likely child (tokens 1, 2, 3, ...)."""
    node, n = 0, 0
    while True:
        kids = [c for c in range(len(tree)) if tree.parents[c] == node and tree.tokens[c] == n + 1]
        if not kids:
            return n
        node, n = kids[0], n + 1


def test_a_drafter_that_is_always_wrong_converges_to_plain_decoding_and_keeps_probing():
    b = TreeBudget(CPU)
    spent, drafted = simulate(b, lambda tree: 0, 2000, [0.8] * 8)  # confident, and never right
    plain = 2000 * CPU(1)
    assert spent <= 1.02 * plain, spent / plain  # within 2 % of plain decoding over a long answer
    short, _ = simulate(TreeBudget(CPU), lambda tree: 0, 64, [0.8] * 8)
    assert short <= 1.06 * 64 * CPU(1), short / (64 * CPU(1))  # and within 6 % over 64 tokens
    late = drafted[len(drafted) // 2 :]
    assert 2 <= sum(late) <= len(late) // 20, sum(late)  # it still probes, ever more rarely
    gaps = [i for i, d in enumerate(drafted) if d]
    assert all(b2 - a2 >= a1 - a0 for a0, a1, a2, b2 in zip(gaps, gaps[1:], gaps[1:], gaps[2:])), gaps[:10]


def test_a_perfect_drafter_keeps_drafting():
    b = TreeBudget(CPU)
    spent, drafted = simulate(b, on_chain, 500, [0.9] * 8)
    assert all(drafted)
    assert spent < 0.5 * 500 * CPU(1), spent / (500 * CPU(1))


def test_probing_turns_drafting_back_on_when_drafts_start_paying():
    b = TreeBudget(CPU)
    _, wrong = simulate(b, lambda tree: 0, 300, [0.8] * 8)
    assert not b.drafting and sum(wrong[-64:]) <= 2
    _, then = simulate(b, on_chain, 300, [0.8] * 8)  # the text turns predictable (say, copying)
    first = then.index(True)
    assert first <= b.probe_max and all(then[first:]), then[:80]


def test_a_draft_that_costs_more_than_it_yields_is_turned_off():
    """Drafts accepted at a steady one token a round, but drafting costs as much as a forward: off."""
    b = TreeBudget(CPU)
    for _ in range(3):
        b.record_draft(rows=4, tokens=2, overhead=CPU(1) * 1.2)
    assert not b.drafting and not b.draft_now()
    b = TreeBudget(CPU)
    for _ in range(3):  # the same acceptance with a cheap draft pays
        b.record_draft(rows=4, tokens=2, overhead=1.0)
    assert b.drafting and b.draft_now()


def test_measured_verification_time_rescales_a_curve_in_other_units():
    """A curve measured on a machine three times busier (or in other units) weighs a draft's wall-clock
    seconds by the verification times actually measured: the same draft is judged the same way."""
    right, stale = TreeBudget(CPU), TreeBudget(CostCurve({t: 3 * s for t, s in CPU.to_dict().items()}))
    for b, unit in ((right, 1.0), (stale, 3.0)):
        for _ in range(5):
            b.record_plain(seconds=CPU(1))  # what verifying one row really takes, in the curve's units / unit
            assert b.curve_units(CPU(1)) == pytest.approx(unit * CPU(1))
    for _ in range(3):  # a draft costing 1.2 forwards, for one extra token a round in 8 rows
        for b in (right, stale):
            b.record_draft(rows=8, tokens=2, overhead=1.2 * CPU(1), seconds=CPU(8))
    assert right.drafting == stale.drafting is False
    uncalibrated = TreeBudget(CostCurve({t: 3 * s for t, s in CPU.to_dict().items()}))
    for _ in range(3):  # without measured seconds the stale curve makes the draft look three times cheaper
        uncalibrated.record_draft(rows=8, tokens=2, overhead=1.2 * CPU(1))
    assert uncalibrated.drafting
