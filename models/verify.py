"""Acceptance: walk the tree with the target's logits, greedy or by tree rejection sampling.

Each node is decided once, as soon as its logits exist. That single rule serves the
one-shot modes (all logits at once) and the continuous pipeline (logits arrive segment by
segment): a walk stops where the next logits are not available yet and resumes later.

Sampling keeps the target distribution exactly. Drafts are deterministic (top-k), so child
``x`` is accepted with probability p(x); on rejection p(x) is zeroed and p renormalised before
the next sibling is tried; if every child is rejected the token comes from the residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.tree import Tree


@dataclass(frozen=True)
class Sampling:
    """How the target picks a token. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def target_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution the target alone would sample from (temperature, then nucleus filter)."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p >= sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(target_probs(logits, sampling), 1, generator=gen))


def decide(
    tree: Tree, node: int, logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None
) -> tuple[int | None, int]:
    """The target's choice after ``node``: (accepted child or None, its token)."""
    if sampling.greedy:
        tok = int(logits.argmax())
        return tree.child_with_token(node, tok), tok
    p = target_probs(logits, sampling).double()
    kids = sorted(tree.children(node), key=lambda c: (-tree.scores[c], c))
    for c in kids:
        x = tree.tokens[c]
        total = float(p.sum())
        px = float(p[x]) / total if total > 0 else 0.0
        if float(torch.rand((), generator=gen, dtype=torch.float64)) < px:
            return c, x
        p[x] = 0.0
    if float(p.sum()) <= 0.0:  # every token with mass was a rejected child: impossible unless p is degenerate
        p = target_probs(logits, sampling).double()
    return None, int(torch.multinomial(p, 1, generator=gen))


@dataclass
class Walk:
    """Progress of one round's acceptance walk. ``path`` starts at the root."""

    path: list[int] = field(default_factory=lambda: [0])
    bonus: int | None = None  # set when the round is decided: the token after the last accepted node

    @property
    def done(self) -> bool:
        return self.bonus is not None


def advance(
    walk: Walk,
    tree: Tree,
    logits_of: Callable[[int], torch.Tensor | None],
    sampling: Sampling,
    gen: torch.Generator | None,
) -> list[int]:
    """Decide as far as available logits allow; return the tokens newly accepted (bonus included)."""
    out: list[int] = []
    while not walk.done:
        node = walk.path[-1]
        logits = logits_of(node)
        if logits is None:
            break
        child, tok = decide(tree, node, logits, sampling, gen)
        out.append(tok)
        if child is None:
            walk.bonus = tok
        else:
            walk.path.append(child)
    return out


def verify(
    tree: Tree, logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None = None
) -> tuple[list[int], list[int]]:
    """One-shot verification when every node's logits are at hand (row i = node i).

    Returns the accepted node path (root first) and the emitted tokens (accepted + bonus).
    """
    walk = Walk()
    tokens = advance(walk, tree, lambda i: logits[i], sampling, gen)
    return walk.path, tokens
