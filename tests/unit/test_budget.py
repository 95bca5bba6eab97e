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
