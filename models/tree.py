"""The one speculative tree type, and the operations every decoding mode shares.

Node 0 is the root: the last emitted token, whose KV the target has not computed yet.
Every other node is a drafted token with a parent pointer and a cumulative draft
log-probability. Parents always have smaller indices than their children, so index order
is a valid topological order and "ties broken by tree order" means "by index".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

# expand(tree, nodes, k) -> for each node, up to k (token, log-prob) proposals for its next token
Expand = Callable[["Tree", list[int], int], list[list[tuple[int, float]]]]


@dataclass
class Tree:
    tokens: list[int]
    parents: list[int]
    scores: list[float]
    depth: list[int]
    _children: list[list[int]] = field(default_factory=list, repr=False)

    @classmethod
    def root(cls, token: int) -> Tree:
        return cls([int(token)], [-1], [0.0], [0], [[]])

    @classmethod
    def from_parents(cls, tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float] | None = None) -> Tree:
        """Rebuild a tree from the wire form (tokens + parent pointers); parents must precede children."""
        t = cls.root(tokens[0])
        t.scores[0] = float(scores[0]) if scores is not None else 0.0
        for i in range(1, len(tokens)):
            p = int(parents[i])
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must precede their children")
            t.add(p, int(tokens[i]), float(scores[i]) if scores is not None else 0.0)
        return t

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.scores.append(float(score))
        self.depth.append(self.depth[parent] + 1)
        self._children.append([])
        self._children[parent].append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        return self._children[node]

    def child_with_token(self, node: int, token: int) -> int | None:
        for c in self._children[node]:
            if self.tokens[c] == token:
                return c
        return None

    def path(self, node: int) -> list[int]:
        """Root-to-node indices."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def path_tokens(self, node: int) -> list[int]:
        return [self.tokens[i] for i in self.path(node)]

    def subtree(self, node: int) -> list[int]:
        """``node`` and all its descendants, in index order."""
        keep = {node}
        for i in range(node + 1, len(self)):
            if self.parents[i] in keep:
                keep.add(i)
        return sorted(keep)

    # ---- ordering and selection --------------------------------------------------------
    def score_order(self) -> list[int]:
        """Nodes by descending cumulative score, ties by index (so every parent precedes its child)."""
        return sorted(range(len(self)), key=lambda i: (-self.scores[i], i))

    def best(self, n: int) -> Tree:
        """The root plus the ``n`` best-scoring drafted nodes (EAGLE-2 re-ranking).

        A child's score never exceeds its parent's, so the top of the score order is closed
        under ancestors and is itself a tree.
        """
        return self.select(self.score_order()[: n + 1])[0]

    def select(self, keep: Iterable[int]) -> tuple[Tree, list[int]]:
        """A new tree of the kept nodes (closed under ancestors, root included) in index order.

        Returns the tree and ``old_index`` for each new node, which is how caches and queued
        inputs are gathered after a prune.
        """
        old = sorted(set(keep))
        if not old or old[0] != 0:
            raise ValueError("the kept set must contain the root")
        remap = {o: n for n, o in enumerate(old)}
        t = Tree.root(self.tokens[0])
        t.scores[0] = self.scores[0]
        for o in old[1:]:
            p = self.parents[o]
            if p not in remap:
                raise ValueError(f"node {o} is kept but its parent {p} is not")
            t.add(remap[p], self.tokens[o], self.scores[o])
        return t, old

    def past_the_end(self, stop: Collection[int], left: int) -> list[bool]:
        """Per node, whether it is not worth a row in a round that may emit at most ``left`` more tokens and
        ends at any token of ``stop``: its token ends the answer (an end token, or the ``left``-th token), or
        an ancestor's did. Leaving such nodes out is lossless: a node's token is decided by its parent's row
        (emitted as the bonus token when the node is absent, under greedy decoding and sampling
        alike), and nothing after an answer's last token is emitted. Seen on copying prompts: the n-gram
        table drafts the chat template's ``<|im_end|>``, newline, ``<|im_start|>`` after an answer's last
        full stop, and a round verified three rows to emit one token."""
        out = [False] * len(self)
        for i in range(1, len(self)):
            out[i] = out[self.parents[i]] or self.tokens[i] in stop or self.depth[i] >= left
        return out

    def within(self, stop: Collection[int], left: int) -> Tree:
        """This tree without the nodes :meth:`past_the_end` (itself when there are none)."""
        dead = self.past_the_end(stop, left)
        if not any(dead):
            return self
        return self.select(i for i, d in enumerate(dead) if not d)[0]

    def reroot(self, node: int) -> tuple[Tree, list[int]]:
        """The subtree under ``node`` as a tree of its own (``node`` becomes the root)."""
        sub = self.subtree(node)
        remap = {o: n for n, o in enumerate(sub)}
        t = Tree.root(self.tokens[node])
        base = self.scores[node]
        for o in sub[1:]:
            t.add(remap[self.parents[o]], self.tokens[o], self.scores[o] - base)
        return t, sub

    def merge(self, other: Tree, at: int = 0) -> list[int]:
        """Graft ``other`` (whose root stands for node ``at``) into this tree, matching by token path.

        Returns this tree's index for each node of ``other``; nodes already present keep their
        index (and the better score), new ones are appended, so existing indices stay valid.
        """
        where = [at]
        base = self.scores[at]
        for i in range(1, len(other)):
            parent = where[other.parents[i]]
            score = base + other.scores[i]
            found = self.child_with_token(parent, other.tokens[i])
            if found is None:
                found = self.add(parent, other.tokens[i], score)
            else:
                self.scores[found] = max(self.scores[found], score)
            where.append(found)
        return where

    # ---- tensors for the target forward ------------------------------------------------
    def ancestor_mask(self, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None) -> torch.Tensor:
        """Bool (len(rows), len(cols)): True where column node is an ancestor of (or is) the row node."""
        rows = list(range(len(self))) if rows is None else list(rows)
        cols = list(range(len(self))) if cols is None else list(cols)
        col_at = {c: j for j, c in enumerate(cols)}
        m = torch.zeros(len(rows), len(cols), dtype=torch.bool)
        for r, node in enumerate(rows):
            while node >= 0:
                j = col_at.get(node)
                if j is not None:
                    m[r, j] = True
                node = self.parents[node]
        return m

    def positions(self, base: int, nodes: Sequence[int] | None = None) -> torch.Tensor:
        nodes = range(len(self)) if nodes is None else nodes
        return torch.tensor([base + self.depth[i] for i in nodes], dtype=torch.long)


def grow_tree(
    root_token: int, expand: Expand, *, top_k: int, depth: int, max_nodes: int, keep: int | None = None
) -> Tree:
    """EAGLE-2 style expansion: at each level expand the ``top_k`` best frontier nodes by cumulative
    log-prob, each into its ``top_k`` best children, until ``depth`` levels or ``max_nodes`` nodes.

    The result is a candidate pool; :meth:`Tree.best` keeps the nodes worth verifying. ``keep``
    is how many of them the caller expects to verify at most: a child never outscores its parent,
    so a frontier node scoring below the ``keep``-th best node so far can only have descendants
    that :meth:`Tree.best` would drop, and it is not expanded. On a CPU, where every draft level
    costs a few percent of a target forward, this stops the draft after the levels that matter.

    One level of it is :func:`add_level` below :func:`frontier`'s nodes, which is also how a drafter that
    keeps its state grows an earlier pool (``Drafter.extend``): the same rule, so growing a ``d``-level
    draft by one level gives what a ``d + 1``-level draft would have.
    """
    tree = Tree.root(root_token)
    nodes = [0]
    for _ in range(depth):
        new = add_level(tree, nodes, expand(tree, nodes, top_k), top_k, max_nodes)
        if not new:
            break
        nodes = next_frontier(tree, new, top_k, keep)
        if not nodes:
            break
    return tree


class Proposer(Protocol):
    """What :func:`draft_tree` needs of a drafter (every drafter in :mod:`models.drafters` is one)."""

    def start(self, context: list[int]) -> bool: ...

    def children(self, context: list[int], tree: Tree, nodes: list[int], k: int) -> list[list[tuple[int, float]]]: ...


def draft_tree(
    drafter: Proposer, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None
) -> Tree:
    """A drafter's whole draft at ``context``: ``drafter.start(context)`` opens it (False: nothing to draft
    from, the root alone), then :func:`grow_tree` asks ``drafter.children(context, tree, nodes, k)`` level by
    level. Every drafter drafts this way, so its :meth:`extend` (one level more below given leaves, through
    the same ``children``) gives what a deeper draft would have."""
    if not drafter.start(context):
        return Tree.root(context[-1])

    def expand(tree: Tree, nodes: list[int], k: int) -> list[list[tuple[int, float]]]:
        return drafter.children(context, tree, nodes, k)

    return grow_tree(context[-1], expand, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)


def add_level(
    tree: Tree, nodes: Sequence[int], proposals: Sequence[Sequence[tuple[int, float]]], top_k: int, max_nodes: int
) -> list[int]:
    """Add each node's ``top_k`` best proposed children (``proposals[i]`` for ``nodes[i]``: (token, log-prob)
    pairs) with cumulative scores, while the tree has fewer than ``max_nodes`` nodes. A child the tree
    already has (another drafter proposed it) keeps the better score, as in :meth:`Tree.merge`.
    Returns the nodes added."""
    new = []
    for node, props in zip(nodes, proposals):
        for tok, lp in props[:top_k]:
            if lp == -math.inf or len(tree) >= max_nodes:
                continue
            score = tree.scores[node] + lp
            have = tree.child_with_token(node, tok)
            if have is None:
                new.append(tree.add(node, tok, score))
            else:
                tree.scores[have] = max(tree.scores[have], score)
    return new


def next_frontier(tree: Tree, level: Sequence[int], top_k: int, keep: int | None = None) -> list[int]:
    """Which of a level's nodes grow the next level: the ``top_k`` best, less those that score at or below
    the ``keep``-th best node of the tree (see :func:`grow_tree`); best first."""
    out = sorted(level, key=lambda i: (-tree.scores[i], i))[:top_k]
    if keep is not None and len(tree) - 1 >= keep:
        cut = sorted(tree.scores[1:], reverse=True)[keep - 1]
        out = [i for i in out if tree.scores[i] > cut]
    return out


def frontier(tree: Tree, top_k: int, keep: int | None = None) -> list[int]:
    """The nodes a pool's next level grows from: :func:`next_frontier` of its deepest level (the root
    alone for a bare root). For a pool :func:`grow_tree` drafted, exactly the nodes its next level would
    have expanded; for a re-rooted pool, the deepest level that survived."""
    deepest = max(tree.depth)
    if deepest == 0:
        return [0]
    return next_frontier(tree, [i for i in range(len(tree)) if tree.depth[i] == deepest], top_k, keep)


NodePath = tuple[int, ...]  # a node's tokens below a draft's root


class DraftRows:
    """What a model drafter computed for the nodes of its latest draft, by token path below that draft's
    root, so that a later call can grow the pool (``Drafter.extend``) instead of drafting it again.

    ``anchor`` is the context the draft was made at (its root is ``anchor[-1]``); the drafter's cache
    holds the committed rows below ``base`` and one row per computed node after it (``slot``), with the
    node's output (``out``) and its best next tokens (``logp``: log-probs and tokens, best first). The
    pool it grows may since have been re-rooted at a descendant (the walk accepted nodes: the context
    grew by their tokens) and merged with other drafters' nodes; paths name nodes across both.
    """

    def __init__(self, anchor: Sequence[int], base: int):
        self.anchor, self.base = list(anchor), base
        self.slot: dict[NodePath, int] = {}
        self.out: dict[NodePath, torch.Tensor] = {}
        self.logp: dict[NodePath, tuple[list[float], list[int]]] = {}
        self._under: NodePath = ()

    def paths(self, context: Sequence[int], pool: Tree, nodes: Sequence[int]) -> list[NodePath] | None:
        """Each of ``nodes``' paths below the anchor's root, for ``pool`` rooted at ``context[-1]``; None when
        ``context`` does not extend the anchor (these rows cannot serve it). Nodes outside the current
        root's subtree and off the path to it are forgotten (pruned: the walk went elsewhere); their cache
        rows are never attended again."""
        n = len(self.anchor)
        if len(context) < n or list(context[:n]) != self.anchor:
            return None
        under = tuple(context[n:])
        if under != self._under:
            self._under = under
            k = len(under)
            for table in (self.slot, self.out, self.logp):
                for key in [key for key in table if key[:k] != under and under[: len(key)] != key]:
                    del table[key]
        return [under + tuple(pool.path_tokens(u)[1:]) for u in nodes]

    def missing(self, paths: Sequence[NodePath], root_row: bool) -> list[list[NodePath]]:
        """The paths among ``paths`` and their ancestors without a row, grouped by length, shortest first,
        each group in order of first need (a drafted level's batch is its frontier, in order). The root
        ``()`` needs a row only where the drafter feeds the root as a tree row (``root_row``)."""
        levels: dict[int, dict[NodePath, None]] = {}
        for p in paths:
            for j in range(0 if root_row else 1, len(p) + 1):
                if p[:j] not in self.out:
                    levels.setdefault(j, {})[p[:j]] = None
        return [list(levels[j]) for j in sorted(levels)]

    def proposals(self, paths: Sequence[NodePath], k: int) -> list[list[tuple[int, float]]]:
        """Up to ``k`` (token, log-prob) children for each path, from ``logp``."""
        out = []
        for p in paths:
            vals, toks = self.logp[p]
            out.append(list(zip(toks[:k], vals[:k])))
        return out


def session_paths(
    session: DraftRows | None,
    open_new: Callable[[], DraftRows],
    context: Sequence[int],
    tree: Tree,
    nodes: Sequence[int],
) -> tuple[DraftRows, list[NodePath]]:
    """The draft rows that serve ``nodes`` of ``tree`` (rooted at ``context[-1]``) and their paths: the
    latest draft's (``session``) when ``context`` extends its anchor, else a new draft's (``open_new()``)."""
    paths = session.paths(context, tree, nodes) if session is not None else None
    if paths is None:
        session = open_new()
        paths = session.paths(context, tree, nodes)
    return session, paths


def split_segments(order: Sequence[int], k: int, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Cut a parents-first node order into ``k`` contiguous near-equal segments (or the given sizes).

    Contiguity in a parents-first order means every node's ancestors are in its own or an
    earlier segment, which is what lets a stage run segment i before segment i+1 arrives.
    """
    order = list(order)
    if sizes is None:
        k = max(1, min(k, len(order)))
        q, r = divmod(len(order), k)
        sizes = [q + (1 if i < r else 0) for i in range(k)]
    if sum(sizes) != len(order):
        raise ValueError(f"segment sizes {list(sizes)} do not cover {len(order)} nodes")
    out, start = [], 0
    for s in sizes:
        out.append(order[start : start + s])
        start += s
    return [seg for seg in out if seg]
