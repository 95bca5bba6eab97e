"""The tree type: ordering, segmentation, selection, merging, masks."""

from __future__ import annotations

import math
import random

import pytest
import torch

from models.tree import Tree, add_level, frontier, grow_tree, split_segments


def random_tree(n: int, seed: int) -> Tree:
    rng = random.Random(seed)
    t = Tree.root(0)
    for _ in range(n):
        p = rng.randrange(len(t))
        t.add(p, rng.randrange(100), t.scores[p] + math.log(rng.uniform(0.05, 1.0)))
    return t


def test_score_order_puts_parents_first_and_segments_are_closed():
    for seed in range(20):
        t = random_tree(60, seed)
        order = t.score_order()
        pos = {node: i for i, node in enumerate(order)}
        assert all(pos[t.parents[i]] < pos[i] for i in range(1, len(t)))
        segs = split_segments(order, 4)
        assert [len(s) for s in segs] == [16, 15, 15, 15]
        seen: set[int] = set()
        for seg in segs:
            for node in seg:
                assert node == 0 or t.parents[node] in seen | set(seg)
            seen |= set(seg)
        # the earliest segment holds the likeliest nodes
        assert min(t.scores[i] for i in segs[0]) >= max(t.scores[i] for i in segs[-1])


def test_equal_scores_still_parent_first():
    t = Tree.root(1)
    a = t.add(0, 2, 0.0)
    b = t.add(a, 3, 0.0)
    t.add(b, 4, 0.0)
    assert t.score_order() == [0, 1, 2, 3]


def test_best_select_and_reroot():
    t = random_tree(40, 3)
    b = t.best(10)
    assert len(b) == 11
    kept = t.score_order()[:11]
    assert sorted(t.scores[i] for i in kept) == sorted(b.scores)
    sub, old = t.select([0, *t.subtree(t.children(0)[0])])
    assert old[0] == 0 and sub.tokens == [t.tokens[o] for o in old]
    child = t.children(0)[0]
    r, idx = t.reroot(child)
    assert r.tokens[0] == t.tokens[child] and len(r) == len(t.subtree(child)) and idx[0] == child
    # reroot does this very subtraction (one float64 operation per node), so the scores match exactly
    assert all(r.scores[i] == t.scores[o] - t.scores[child] for i, o in enumerate(idx))


def test_merge_by_token_path():
    t = Tree.root(5)
    a = t.add(0, 6, -0.1)
    t.add(a, 7, -0.5)
    new = Tree.root(6)  # re-draft from node a (token 6)
    x = new.add(0, 7, -0.2)  # same path as the existing 6->7: merged, better score kept
    new.add(x, 8, -0.3)  # new node under it
    new.add(0, 9, -1.0)
    where = t.merge(new, at=a)
    assert where[0] == a and where[1] == 2 and len(t) == 5
    assert t.path_tokens(3) == [5, 6, 7, 8] and t.path_tokens(4) == [5, 6, 9]
    assert math.isclose(t.scores[2], -0.3)


def test_ancestor_mask_and_positions():
    t = Tree.root(1)
    a = t.add(0, 2, -1)
    t.add(a, 3, -2)
    t.add(0, 4, -1.5)
    m = t.ancestor_mask()
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, False, False, True],
    ]
    assert t.positions(10).tolist() == [10, 11, 12, 11]
    assert t.ancestor_mask(rows=[2], cols=[0, 1]).tolist() == [[True, True]]
    assert Tree.from_parents(t.tokens, t.parents, t.scores).parents == t.parents


def test_grow_tree_is_eagle2_like():
    # a drafter that always proposes tokens 0..k-1 with decreasing probability
    def expand(tree, nodes, k):
        return [[(j, math.log(0.5 ** (j + 1))) for j in range(k)] for _ in nodes]

    t = grow_tree(99, expand, top_k=3, depth=4, max_nodes=1000)
    assert len(t) == 1 + 3 + 9 * 3  # root, first level 3, then 3 frontier nodes x 3 children per level
    assert max(t.depth) == 4
    best = t.best(5)
    assert best.tokens[:2] == [99, 0] and len(best) == 6
    assert torch.equal(best.ancestor_mask().diagonal(), torch.ones(6, dtype=torch.bool))


@pytest.mark.parametrize("seed", range(20))
def test_grow_tree_keep_prunes_only_what_best_would_drop(seed):
    """With ``keep=n`` the draft stops expanding hopeless nodes, and best(n) is unchanged."""

    def expand(tree, nodes, k):  # a deterministic pseudo-random distribution per path
        out = []
        for u in nodes:
            rng = random.Random(hash((seed, tuple(tree.path_tokens(u)))))
            ps = sorted((rng.random() ** 3 for _ in range(k)), reverse=True)
            out.append([(j, math.log(p / (1.0 + sum(ps)))) for j, p in enumerate(ps)])
        return out

    full = grow_tree(7, expand, top_k=4, depth=8, max_nodes=10_000)
    for n in (1, 4, 8, 16):
        pruned = grow_tree(7, expand, top_k=4, depth=8, max_nodes=10_000, keep=n)
        assert len(pruned) <= len(full)
        paths = lambda t: sorted(tuple(t.path_tokens(i)) for i in range(len(t)))  # noqa: E731
        assert paths(pruned.best(n)) == paths(full.best(n))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("keep", [None, 6])
def test_growing_a_pool_one_level_is_drafting_it_one_level_deeper(seed, keep):
    """add_level below frontier() is grow_tree's own next level: a drafter that resumes gives the deeper draft."""

    def expand(tree, nodes, k):  # a deterministic pseudo-random distribution per path
        out = []
        for u in nodes:
            rng = random.Random(hash((seed, tuple(tree.path_tokens(u)))))
            ps = sorted((rng.random() ** 2 for _ in range(k + 1)), reverse=True)
            out.append([(j, math.log(p / (1.0 + sum(ps)))) for j, p in enumerate(ps)])
        return out

    for depth in range(1, 6):
        pool = grow_tree(7, expand, top_k=3, depth=depth, max_nodes=10_000, keep=keep)
        leaves = frontier(pool, 3, keep)
        add_level(pool, leaves, expand(pool, leaves, 3), 3, 10_000)
        want = grow_tree(7, expand, top_k=3, depth=depth + 1, max_nodes=10_000, keep=keep)
        assert (pool.tokens, pool.parents, pool.scores) == (want.tokens, want.parents, want.scores)
    assert frontier(Tree.root(7), 3) == [0]


def test_add_level_keeps_the_better_score_of_a_child_it_already_has():
    t = Tree.root(1)
    a = t.add(0, 5, math.log(0.5))
    new = add_level(t, [0], [[(5, math.log(0.8)), (6, math.log(0.1)), (7, -math.inf)]], top_k=3, max_nodes=10)
    assert len(new) == 1 and t.tokens[new[0]] == 6  # 5 was there already; -inf is never a candidate
    assert t.scores[a] == pytest.approx(math.log(0.8))
    assert add_level(t, [a], [[(8, 0.0), (9, 0.0)]], top_k=3, max_nodes=4) == [3]  # the node limit holds


def test_nodes_past_the_answers_end_are_cut_with_everything_below():
    """A node whose token ends the answer (an end token, or the last token the length allows) needs no row:
    its parent's row decides that token anyway, and nothing after it is emitted."""
    t = Tree.root(1)
    a = t.add(0, 2, -0.1)  # depth 1
    end = t.add(a, 99, -0.2)  # depth 2: an end token
    t.add(end, 3, -0.3)  # below it
    b = t.add(a, 4, -0.4)  # depth 2
    t.add(b, 5, -0.5)  # depth 3
    assert t.past_the_end({99}, left=10) == [False, False, True, True, False, False]
    assert t.past_the_end(set(), left=3) == [False, False, False, True, False, True]
    assert t.past_the_end({99}, left=1) == [False, True, True, True, True, True]
    cut = t.within({99}, left=3)
    assert cut.tokens == [1, 2, 4] and cut.parents == [-1, 0, 1]
    assert t.within(set(), left=10) is t  # nothing to cut: the same tree
