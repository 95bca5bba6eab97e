"""Drafters: cheap guesses of the target's next tokens, all behind one small interface.

A drafter only has to say, for some tree nodes, which tokens are likely next and how likely;
:func:`models.tree.grow_tree` turns that into an EAGLE-2 style tree. The originator tells the
drafter what got accepted (with the target's hidden states, which an EAGLE head feeds on).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Protocol

import torch

from models.config import ModelError
from models.eagle import default_drafter, load_eagle_drafter
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.tree import DraftRows, NodePath, Tree, add_level, draft_tree, session_paths
from models.verify import Draws, Sampling


class Drafter(Protocol):
    name: str

    def reset(self, prompt: list[int]) -> None:
        """Start a new request whose context so far is ``prompt``."""

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        """A candidate tree rooted at ``context[-1]`` (the last emitted token); ``keep``: see :func:`grow_tree`."""

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        """``context`` is now committed (its last token is the next root).

        ``hidden``, when the caller has it, holds the target's post-norm features (m, hidden) of the
        m positions whose KV the target just computed: ``context[-1 - m:-1]``. The root has none yet.
        """


class Resumable(Drafter, Protocol):
    """A drafter that can grow a pool instead of drafting it again (every drafter here is one; a drafter
    without ``extend`` still works: the originator re-drafts from the root and merges, see
    :func:`can_extend`)."""

    def extend(self, context: list[int], pool: Tree, leaves: list[int], *, top_k: int, max_nodes: int) -> list[int]:
        """Add up to ``top_k`` children below each of ``leaves`` (by :func:`models.tree.add_level`, so
        ``pool`` stays under ``max_nodes`` nodes) and return the nodes added. ``pool`` is rooted at
        ``context[-1]``: a pool this drafter drafted at that context or at an earlier one the context
        extends (re-rooted at an accepted node since), possibly merged with other drafters' nodes.
        Whatever the drafter computed for the pool's nodes is reused; nothing of it may be needed."""


def cheap_part(drafter: Drafter | None) -> Drafter | None:
    """The part of a merged drafter that costs next to nothing to run (n-gram lookup: a table, no forward),
    which a budget backing off the rest still lets draft (:attr:`models.budget.TreeBudget.cheap`). None
    when there is no such part, or when it is the whole drafter (backing off then means not drafting)."""
    parts = getattr(drafter, "parts", None)
    if not parts:
        return None
    cheap = [p for p in parts if getattr(p, "cheap", False)]
    if not cheap or len(cheap) == len(parts):
        return None
    return cheap[0] if len(cheap) == 1 else MergedDrafter(cheap)


def likeliest_first(drafter: Drafter, context: list[int]) -> float:
    """The probability a draft at ``context`` would give its likeliest node, told without drafting by a
    drafter that has ``best_first`` (n-gram lookup), the best over a merge's parts; 1.0 (anything may come)
    for one that cannot tell."""
    parts = getattr(drafter, "parts", None)
    if parts:
        return max(likeliest_first(p, context) for p in parts)
    best_first = getattr(drafter, "best_first", None)
    return best_first(context) if best_first is not None else 1.0


def couple(drafter: Drafter | None, draws: Draws | None, sampling: Sampling) -> None:
    """Let ``drafter``'s model parts rank their candidates with the noise the target will sample with
    (:meth:`models.verify.Draws.perturb`; nothing when greedy). A sampled walk then accepts a model
    drafter's child about as often as a greedy one does, instead of with the target's probability of it.
    The n-gram part keeps its counts: they are not a distribution the noise could sharpen."""
    coupling = (draws, sampling.temperature) if draws is not None and not sampling.greedy else None
    for part in getattr(drafter, "parts", None) or ([drafter] if drafter is not None else []):
        if hasattr(part, "coupling"):
            part.coupling = coupling


def can_extend(drafter: Drafter | None) -> bool:
    """Whether ``drafter`` grows pools (:class:`Resumable`); a merge of drafters only if all its parts do."""
    return drafter is not None and callable(getattr(drafter, "extend", None))


class NGramDrafter:
    """Prompt lookup with back-off: the continuation of the longest earlier match of the context's suffix.

    Needs no weights, so it works for any model; strong on tasks that copy from the prompt
    (summaries, RAG, code edits). Counts of what followed each n-gram give a distribution, and
    a discount per order makes short matches less trusted than long ones.
    """

    name = "ngram"
    cheap = True  # a table lookup per node: see :func:`cheap_part`

    def __init__(self, orders: tuple[int, ...] = (3, 2, 1), discounts: dict[int, float] | None = None):
        self.orders = orders
        self.discounts = discounts or {3: 0.9, 2: 0.6, 1: 0.3}
        self.reset([])

    def reset(self, prompt: list[int]) -> None:
        self._table: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        self._seen = 0
        self._context: list[int] = []
        self.accept(list(prompt), None)

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self._context = list(context)
        for end in range(max(self._seen, 1), len(context)):
            nxt = context[end]
            for n in self.orders:
                if end - n >= 0:
                    self._table[tuple(context[end - n : end])][nxt] += 1
        self._seen = max(self._seen, len(context))

    def match(self, ctx: list[int]) -> tuple[int, Counter[int]] | None:
        """The longest of ``orders`` whose n-gram ending ``ctx`` was seen, with the counts of what followed it."""
        for n in self.orders:
            if len(ctx) >= n and (counts := self._table.get(tuple(ctx[-n:]))):
                return n, counts
        return None

    def _propose(self, ctx: list[int], k: int) -> list[tuple[int, float]]:
        m = self.match(ctx)
        if m is None:
            return []
        n, counts = m
        total, w = sum(counts.values()), self.discounts.get(n, 0.5)
        return [(tok, math.log(w * c / total)) for tok, c in counts.most_common(k)]

    def start(self, context: list[int]) -> bool:
        """Open a draft at ``context``: the table catches up with it (see :func:`draft_tree`)."""
        if context[: self._seen] != self._context[: self._seen] or len(context) < self._seen:
            self.reset(context[:-1])
        self.accept(context, None)
        return True

    def children(self, context: list[int], tree: Tree, nodes: list[int], k: int) -> list[list[tuple[int, float]]]:
        """Each node's path looked up like a context (the table is the context's: nothing else is kept)."""
        return [self._propose(context[:-1] + tree.path_tokens(u), k) for u in nodes]

    def best_first(self, context: list[int]) -> float:
        """The probability a draft at ``context`` would give its likeliest node (0.0: it would draft nothing).
        No node of the tree scores higher (each further level multiplies by another probability), so a
        budget can tell from this alone that a tree is not worth drafting
        (:meth:`models.budget.TreeBudget.cheap_may_pay`)."""
        self.start(context)
        best = self._propose(context, 1)
        return math.exp(best[0][1]) if best else 0.0

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        return draft_tree(self, context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)

    def extend(self, context: list[int], pool: Tree, leaves: list[int], *, top_k: int, max_nodes: int) -> list[int]:
        self.start(context)
        return add_level(pool, leaves, self.children(context, pool, leaves, top_k), top_k, max_nodes)


class ModelDrafter:
    """A separate small causal LM with the target's tokenizer, run level by level over the tree.

    Its KV cache holds the committed context; tree nodes are appended while drafting and stay until
    the next draft (:class:`~models.tree.DraftRows`), so :meth:`extend` can grow the pool; the next
    draft truncates them away, so nothing speculative survives into a fresh draft.
    """

    def __init__(self, model: Stage, name: str = "model"):
        if not model.has_vocab:
            raise ValueError("a draft model needs its embeddings and LM head")
        self.model, self.name = model, name
        self.coupling: tuple[Draws, float] | None = None  # see couple()
        self.cache = model.new_cache()
        self._context: list[int] = []
        self._session: DraftRows | None = None

    def reset(self, prompt: list[int]) -> None:
        self.cache.truncate(0)
        self._context = []
        self._session = None

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        pass  # catching up happens lazily in draft(), where the forward can be batched

    def _sync(self, context: list[int]) -> None:
        """Make the cache hold exactly ``context[:-1]`` (the root is fed as part of the tree)."""
        committed = context[:-1]
        self._session = None
        self.cache.truncate(min(self.cache.length, len(self._context)))  # the latest draft's rows go
        same = 0
        limit = min(self.cache.length, len(self._context), len(committed))
        while same < limit and self._context[same] == committed[same]:
            same += 1
        self.cache.truncate(same)
        if same < len(committed):
            new = torch.tensor(committed[same:])
            self.model.forward_one(self.model.embed(new), self.cache, torch.arange(same, len(committed)))
        self._context = list(committed)

    def _open(self, context: list[int]) -> DraftRows:
        self._sync(context)
        self._session = DraftRows(context, self.cache.length)
        return self._session

    def _children(self, s: DraftRows, paths: list[NodePath], k: int) -> list[list[tuple[int, float]]]:
        """The ``k`` best next tokens below each path, computing the missing rows one tree level per batch
        (the root is a row too: its KV is not in the committed cache)."""
        base = s.base
        for level in s.missing(paths, root_row=True):
            length = self.cache.length
            mask = torch.zeros(len(level), length + len(level), dtype=torch.bool)
            mask[:, :base] = True
            for r, key in enumerate(level):
                for j in range(len(key)):
                    mask[r, s.slot[key[:j]]] = True
                mask[r, length + r] = True
            toks = [key[-1] if key else s.anchor[-1] for key in level]
            pos = torch.tensor([base + len(key) for key in level])
            hidden = self.model.forward_one(self.model.embed(toks), self.cache, pos, mask)
            logp = torch.log_softmax(self.model.logits(hidden), dim=-1)
            for r, key in enumerate(level):
                s.slot[key], s.out[key] = length + r, logp[r]
        logp = torch.stack([s.out[key] for key in paths])
        if self.coupling is not None:  # ranked with the noise the target samples these positions with
            draws, temperature = self.coupling
            logp = draws.perturb(logp, [len(s.anchor) + len(key) for key in paths], temperature, None, logp.shape[-1])
        lp, tok = logp.topk(k, dim=-1)
        return [list(zip(t, v)) for t, v in zip(tok.tolist(), lp.tolist())]

    def start(self, context: list[int]) -> bool:
        """Open a draft at ``context`` (the cache synced to it); see :func:`draft_tree`."""
        self._open(context)
        return True

    @torch.inference_mode()
    def children(self, context: list[int], tree: Tree, nodes: list[int], k: int) -> list[list[tuple[int, float]]]:
        """The ``k`` best next tokens below ``nodes`` of ``tree`` (rooted at ``context[-1]``), from the latest
        draft's rows where ``context`` extends it (see :meth:`models.eagle.EagleDrafter.extend`), else from a
        draft opened here."""
        s, paths = session_paths(self._session, lambda: self._open(context), context, tree, nodes)
        return self._children(s, paths, k)

    @torch.inference_mode()
    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        return draft_tree(self, context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)

    @torch.inference_mode()
    def extend(self, context: list[int], pool: Tree, leaves: list[int], *, top_k: int, max_nodes: int) -> list[int]:
        return add_level(pool, leaves, self.children(context, pool, leaves, top_k), top_k, max_nodes)


class MergedDrafter:
    """Several drafters' trees merged into one (matched by token path; a shared node keeps the better score).

    The default for the embedded model is the EAGLE head plus n-gram lookup: the head guesses
    what the model would say, the n-gram table what it is about to copy from the prompt. (Merging by a
    calibrated probability instead was measured no better: docs/draft-head.md, "Merging by calibrated
    probability".)
    """

    def __init__(self, parts: list, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(p.name for p in parts)

    def fresh(self) -> MergedDrafter:
        return MergedDrafter([p.fresh() if hasattr(p, "fresh") else type(p)() for p in self.parts], self.name)

    def reset(self, prompt: list[int]) -> None:
        for p in self.parts:
            p.reset(prompt)

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        for p in self.parts:
            p.accept(context, hidden)

    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        tree = self.parts[0].draft(context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)
        for p in self.parts[1:]:
            tree.merge(p.draft(context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep), 0)
        return tree

    def __getattr__(self, name: str):
        # ``extend`` exists only when every part has it (:func:`can_extend`); anything else is missing
        if name == "extend" and all(can_extend(p) for p in self.__dict__.get("parts", [None])):
            return self._extend
        raise AttributeError(name)

    def _extend(self, context: list[int], pool: Tree, leaves: list[int], *, top_k: int, max_nodes: int) -> list[int]:
        """Each part's children below ``leaves``, one part after the other (a child two parts propose keeps
        the better score, as in :meth:`draft`'s merge)."""
        added: list[int] = []
        for p in self.parts:
            added += p.extend(context, pool, leaves, top_k=top_k, max_nodes=max_nodes)
        return added


def load_drafter(
    spec: str, target: Stage, dtype: torch.dtype | str | None = None, source: ModelSource | None = None
) -> Drafter:
    """Build a drafter from a CLI/config spec: ``auto``, ``ngram``, ``eagle[:PATH]``, ``eagle+ngram`` or
    ``model:PATH[@LAYERS]``.

    ``eagle`` is the head trained for this target, the user's (``meshd train-draft``) or the shipped one
    (matched by ``source``'s fingerprint, see :func:`models.eagle.find_head`;
    ``eagle:PATH`` loads a given head, refusing one trained for another target). ``@LAYERS`` keeps
    only the first layers of the draft model (an early-exit draft), which is how the embedded model
    can draft for itself when no smaller sibling is installed.
    """
    if spec == "auto":  # the head for this target (the user's, else shipped) when there is one, else n-gram lookup
        return load_drafter(default_drafter(source) if source is not None else "ngram", target, dtype, source)
    if spec == "ngram":
        return NGramDrafter()
    if "+" in spec:
        return MergedDrafter([load_drafter(part, target, dtype, source) for part in spec.split("+")], name=spec)
    if spec == "eagle" or spec.startswith("eagle:"):
        return load_eagle_drafter(spec[len("eagle:") :] or None, target, source)
    if spec.startswith("model:"):
        path, _, layers = spec[len("model:") :].rpartition("@") if "@" in spec else (spec[len("model:") :], "", "")
        src = ModelSource.resolve(path or "default")
        if src.config.vocab_size != target.cfg.vocab_size:
            raise ModelError(
                f"draft model {src.path} has a vocabulary of {src.config.vocab_size} tokens but the target has "
                f"{target.cfg.vocab_size}; a draft model must share the target's tokenizer."
            )
        n = int(layers) if layers else src.config.n_layers
        model = Stage.load(
            src, LayerRange(0, min(n, src.config.n_layers)), dtype=dtype or target.dtype, weights=target.weights
        )
        return ModelDrafter(model, name=f"model:{src.name}" + (f"@{n}" if layers else ""))
    raise ValueError(
        f"unknown drafter {spec!r}; use 'auto', 'ngram', 'eagle[:PATH]', 'eagle+ngram' or 'model:PATH[@LAYERS]'"
    )


def drafter_factory(
    spec: str, target: Stage, dtype: torch.dtype | str | None = None, source: ModelSource | None = None
) -> Callable[[], Drafter]:
    """A function that makes a fresh drafter per request (drafters keep per-request state),
    sharing whatever weights the spec needs, which are loaded once here."""
    proto = load_drafter(spec, target, dtype, source)
    if isinstance(proto, ModelDrafter):
        return lambda: ModelDrafter(proto.model, name=proto.name)
    if isinstance(proto, NGramDrafter):
        return NGramDrafter
    fresh = getattr(proto, "fresh", None)
    if fresh is None:
        raise ValueError(f"drafter {spec!r} cannot be shared across requests (it has no fresh())")
    return fresh
