"""Acceptance: walk the tree with the target's logits, greedy or sampled, one decision per position.

Each node is decided once, as soon as its logits exist. That single rule serves the
one-shot modes (all logits at once) and the continuous pipeline (logits arrive segment by
segment): a walk stops where the next logits are not available yet and resumes later.

Sampling keeps the target distribution exactly. A node's token is drawn from the target's
distribution p as plain decoding draws it, with the request's noise for that position of the
sequence (:class:`Draws`: one exponential race per position, ``argmax p(x) / E_x``); the walk
follows the child holding that token, and if no child holds it the token is the bonus. The noise
depends on the request's seed and the position only, never on the tree, so a seeded request writes
the same text in `ar`, `spec`, `chunk` and `flow`, whatever the tree sizes and segments (given the
same logits, as the batch-invariant int4a8 layers give), and after a resume. That makes sampled
runs of two modes or two schedulers comparable answer for answer, as greedy ones are.

Because the noise of a position is fixed before anything is drafted there, a drafter may read it
too (:meth:`Draws.perturb`): ranking its candidates by its own log-probabilities plus the same noise
(Gumbel-max) makes its likeliest child the token the target will draw whenever the two
distributions are close, so a sampled walk accepts nearly as often as a greedy one. The output
stays exact: each position's token is a function of the target's distribution and of noise
independent of everything before it; drafts decide only how many positions one forward settles.

That holds for any target distribution, so it holds for the one ``Sampling`` shapes (penalties,
top-k, min-p) as long as each node is judged with its own history: the tokens before it along
its path (``History``), as plain decoding would have had them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from models.tree import Tree


@dataclass(frozen=True)
class Sampling:
    """How the target picks a token. ``temperature == 0`` is greedy (the argmax of the penalised logits).

    The target's distribution is formed in this order, the order llama.cpp and vLLM use:
    penalties on the logits (``repetition_penalty`` over the prompt and the generated tokens, as
    transformers defines it; ``presence_penalty`` and ``frequency_penalty`` over the generated
    tokens only, as OpenAI defines them), then temperature, then the filters ``top_k`` (0: off),
    ``top_p`` and ``min_p`` (drop tokens below ``min_p`` times the most likely one's probability),
    each renormalising. Verification walks this distribution, so speculative decoding stays exact
    for it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        """Whether the distribution depends on the tokens before the position (then a ``History`` is needed)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class History:
    """The tokens before the position being decided, which the penalties look at.

    For a node of a draft tree that is the request's prompt, what it generated so far (the tree's
    root token included, it was emitted last round) and the draft tokens on the path from the root
    down to the node: exactly the tokens that precede the node's successor if the walk accepts the
    path. So each node is judged by the distribution plain decoding would have used there.
    """

    prompt: Sequence[int] = ()
    generated: Sequence[int] = ()

    def then(self, tokens: Sequence[int]) -> History:
        """This history followed by ``tokens`` (generated ones)."""
        return History(self.prompt, [*self.generated, *tokens]) if tokens else self


def penalised_logits(logits: torch.Tensor, sampling: Sampling, history: History | None) -> torch.Tensor:
    """``logits`` (float32) with the repetition, presence and frequency penalties of ``history`` applied."""
    logits = logits.float()
    if not sampling.penalised:
        return logits
    if history is None:
        raise ValueError("penalties depend on the tokens so far: pass the request's History")
    out = logits.clone()
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*history.prompt, *history.generated}), dtype=torch.long)
        if len(seen):
            v = out[seen]
            out[seen] = torch.where(v > 0, v / sampling.repetition_penalty, v * sampling.repetition_penalty)
    if (sampling.presence_penalty or sampling.frequency_penalty) and len(history.generated):
        ids, counts = torch.tensor(list(history.generated), dtype=torch.long).unique(return_counts=True)
        out[ids] -= sampling.frequency_penalty * counts.float() + sampling.presence_penalty
    return out


def _renormalised(probs: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def target_probs(logits: torch.Tensor, sampling: Sampling, history: History | None = None) -> torch.Tensor:
    """The distribution the target alone would sample from (``Sampling``'s order: penalties,
    temperature, top-k, nucleus, min-p)."""
    probs = torch.softmax(penalised_logits(logits, sampling, history) / sampling.temperature, dim=-1)
    if 0 < sampling.top_k < probs.shape[-1]:
        kth = probs.topk(sampling.top_k).values[..., -1:]
        probs = _renormalised(probs, probs < kth)  # ties with the k-th token stay: no arbitrary cut among equals
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p >= sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if sampling.min_p > 0.0:
        probs = _renormalised(probs, probs < sampling.min_p * probs.max(-1, keepdim=True).values)
    return probs


def mixed_seed(*parts: object) -> int:
    """A 63-bit generator seed from ``parts`` (hashed: neighbouring inputs give unrelated streams)."""
    key = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1


class Draws:
    """A request's random numbers: for each position of its sequence, one exponential variable per vocabulary
    entry, drawn from a generator seeded by (``seed``, position).

    The token sampled at a position is ``argmax p(x) / E_x`` (an exponential race: token x wins with
    probability p(x), exactly), so it depends only on the target's distribution there and on noise that
    nothing before the position can have influenced. Keyed by position rather than taken from one stream,
    the numbers are the same whatever order positions are decided in, however many trees and segments a
    mode cuts a walk into, and after a resume; and a drafter can read a position's noise before the target
    decides it (:meth:`perturb`). A request without a seed gets a random one."""

    KEEP = 32  # positions kept (a draft reads a few ahead of the walk; older ones are decided)

    def __init__(self, seed: int | None = None):
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._noise: dict[int, torch.Tensor] = {}

    def exponential(self, pos: int, n: int) -> torch.Tensor:
        """The ``n`` exponential variables (float32) of position ``pos`` (0-based, prompt included)."""
        e = self._noise.get(pos)
        if e is None or len(e) != n:
            gen = torch.Generator().manual_seed(mixed_seed(self.seed, pos))
            e = -torch.log(torch.rand(n, generator=gen))
            self._noise[pos] = e
            if len(self._noise) > self.KEEP:
                del self._noise[min(self._noise)]
        return e

    def perturb(
        self, logprobs: torch.Tensor, positions: list[int], temperature: float, vocab: torch.Tensor | None, size: int
    ) -> torch.Tensor:
        """A drafter's log-probabilities (one row per node, over ``vocab``: the draft vocabulary's token ids, or
        the whole vocabulary of ``size`` tokens) coupled to the noise the target will sample the nodes'
        successors with: ``log_softmax(logprobs / temperature + G)``, ``G = -log E`` (Gumbel) at the row's
        position. Its best entry is the draft's Gumbel-max sample, which is the target's token whenever the
        two distributions agree; the softmax is that token's chance of being the target's if the draft's
        logits are off by Gumbel noise, as ``log_softmax(logprobs)`` is for greedy decoding."""
        gumbel = {}  # per position (a tree level's rows share one): -log E over the draft vocabulary
        for p in positions:
            if p not in gumbel:
                e = self.exponential(p, size)
                gumbel[p] = -torch.log(e if vocab is None else e.index_select(0, vocab))
        g = torch.stack([gumbel[p] for p in positions])
        return torch.log_softmax(logprobs.float() / temperature + g, dim=-1)


def draw(probs: torch.Tensor, noise: torch.Tensor) -> int:
    """One token from ``probs``: the winner of the exponential race ``argmax probs / noise`` (``noise``:
    :meth:`Draws.exponential` of the position), which is token x with probability ``probs[x]``. Tokens the
    filters removed (probability 0) never win."""
    return int((probs.double() / noise.double()).argmax())


def sample_token(
    logits: torch.Tensor, sampling: Sampling, draws: Draws | None, pos: int, history: History | None = None
) -> int:
    """The target's token at position ``pos`` of the sequence: the argmax when greedy, else a ``draw`` with
    ``draws``' noise for ``pos``."""
    if sampling.greedy:
        return int(penalised_logits(logits, sampling, history).argmax())
    if draws is None:
        raise ValueError("sampling needs the request's Draws")
    probs = target_probs(logits, sampling, history)
    return draw(probs, draws.exponential(pos, probs.shape[-1]))


def decide(
    tree: Tree,
    node: int,
    logits: torch.Tensor,
    sampling: Sampling,
    draws: Draws | None,
    pos: int,
    history: History | None = None,
) -> tuple[int | None, int]:
    """The target's choice after ``node``, at position ``pos`` of the sequence (``history``: the tokens up to
    and including ``node``'s): (accepted child or None, its token). The token is what plain decoding would
    pick there (greedy: the argmax; sampled: one ``draw``), so the child holding it is accepted with
    probability p(token) over the noise, and nearly always when the drafter ranked with the same noise."""
    tok = sample_token(logits, sampling, draws, pos, history)
    return tree.child_with_token(node, tok), tok


@dataclass(frozen=True)
class TokenLogprobs:
    """A decided token's log-probability and the most likely alternatives, most likely first.

    These are the model's own log-probabilities (log-softmax of the target's logits, before
    penalties, temperature and filters), as OpenAI-compatible servers report them by default:
    they describe the model, not the sampler, so greedy requests get useful numbers too.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = lp.topk(top) if top > 0 else None
    alts = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprobs(token, float(lp[token]), alts)


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
    draws: Draws | None,
    root_pos: int,
    history: History | None = None,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> list[int]:
    """Decide as far as available logits allow; return the tokens newly accepted (bonus included).

    ``root_pos`` is the tree's root token's position in the sequence (a node at depth d is decided
    with the noise of position ``root_pos + d + 1``); ``history`` is what precedes the tree's root token,
    that token included (needed when ``sampling`` penalises); ``on_token(token, logits)`` sees each
    decided token with the logits it was decided from (for log-probabilities)."""
    out: list[int] = []
    while not walk.done:
        node = walk.path[-1]
        logits = logits_of(node)
        if logits is None:
            break
        here = history.then([tree.tokens[i] for i in walk.path[1:]]) if history is not None else None
        child, tok = decide(tree, node, logits, sampling, draws, root_pos + len(walk.path), here)
        if on_token is not None:
            on_token(tok, logits)
        out.append(tok)
        if child is None:
            walk.bonus = tok
        else:
            walk.path.append(child)
    return out


def verify(
    tree: Tree,
    logits: torch.Tensor,
    sampling: Sampling,
    draws: Draws | None = None,
    root_pos: int = 0,
    history: History | None = None,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[list[int], list[int]]:
    """One-shot verification when every node's logits are at hand (row i = node i; the root at position
    ``root_pos``, see :func:`advance`).

    Returns the accepted node path (root first) and the emitted tokens (accepted + bonus).
    """
    walk = Walk()
    tokens = advance(walk, tree, lambda i: logits[i], sampling, draws, root_pos, history, on_token)
    return walk.path, tokens
