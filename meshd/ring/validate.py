"""What a stage checks in every ring message before any of it reaches torch.

A stage cannot trust its peers: a buggy or hostile one can send a segment whose parents form a
cycle (the worker's mask walk would never end, in the one torch thread that serves everyone), rows
whose parent this stage never saw or already pruned (a ``KeyError`` in the middle of a batched
forward, failing every request in it), positions past the model's rotary table, token ids outside
the vocabulary, hidden states of the wrong width or dtype, or a flood of sessions that eats the
device's memory. :class:`FrameGate` refuses all of these at the door, one message at a time, while
every earlier message is still queued: the worker's one place of entry (``StageWorker.handle``)
calls :meth:`FrameGate.check` first.

The gate keeps a small book per session (who opened it, each live node's parent and position, what
is committed, the newest prune) that mirrors the worker's own rules exactly, so what it admits is
exactly what the worker will compute:

- every row's parent is an earlier row of the same segment or a live node of the session, and its
  position is the parent's plus one (the prompt's first row, parent ``PROMPT_PARENT``, sits at 0);
  so parents are acyclic by construction;
- a prune never leaves a live node hanging under a dead one, and prunes only move forward;
- a session belongs to the node that opened it: other peers cannot extend, prune or close it;
- a segment comes the way the committed plan says: to the first stage from its originator itself, to
  stage i from the node at stage i - 1 (:meth:`FrameGate.follow`), so a member of the mesh that is not
  the previous stage cannot inject rows into anyone's request; and a ``Result`` reaches an originator
  only from the last stage (:func:`check_result`);
- a segment has at most ``max_rows`` rows (the worker's ``max_batch_rows``), and every session's
  KV together stays under :class:`Limits`.

A refusal is a :class:`FrameRejected` naming the request and whom to tell. When the message came
from the request's owner (or its relay) the request cannot go on, so ``spoils`` asks the worker to
close the session; a message from anyone else (another owner, a peer off the request's path) is
refused without touching the owner's session, so no peer can fail someone else's request by naming it.

No I/O and no clock here; the daemon's runtime turns a refusal into an ``error`` message to the
originator (or fails its own client at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from meshd.ring.messages import PROMPT_PARENT, Close, Prune, Segment, StageMessage
from models.config import ModelConfig
from models.prefixcache import PREFIX_BLOCK

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a peer may send hidden states as
MAX_NODE_ID = (1 << 63) - 1  # node ids are int64-safe: the codec's ints are unbounded, torch's are not
SESSION_FLOOR = 256  # KV entries an open session costs even when empty: Stage.new_cache's first capacity


class FrameRejected(Exception):
    """A ring message this stage refuses.

    ``spoils``: the request itself is broken (its owner or relay sent it): close its session here and
    fail it. ``tell``: the node to inform (the owner when spoiled, else the sender; None: in-process).
    """

    def __init__(self, request_id: str, code: str, reason: str, *, spoils: bool, tell: str | None):
        super().__init__(f"request {request_id}: {reason}")
        self.request_id, self.code, self.reason, self.spoils, self.tell = request_id, code, reason, spoils, tell


@dataclass(frozen=True)
class Limits:
    """What all sessions at one stage may hold together; None: unlimited (in-process drivers)."""

    kv_tokens: int | None = None  # KV entries of every session together (each counts at least SESSION_FLOOR)
    sessions_per_peer: int | None = None  # sessions one originator may hold open at this stage


UNLIMITED = Limits()


@dataclass
class _Book:
    """One session as the gate sees it: live nodes -> (parent, position), committed nodes, the newest prune."""

    owner: str | None
    nodes: dict[int, tuple[int, int]] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)
    open: set[int] = field(default_factory=set)  # live nodes not committed: the only ones a prune can kill
    upto: int = -1
    keep: frozenset[int] = frozenset()

    def dead(self, node: int) -> bool:
        """The worker's rule: committed context never dies; else dead if the newest prune left it out."""
        return node <= self.upto and node not in self.keep and node not in self.committed

    @property
    def cost(self) -> int:
        return max(SESSION_FLOOR, len(self.nodes))


class FrameGate:
    """The checks of one stage: model shape from ``cfg``, first stage or not (``embeds``), limits.

    ``sender`` in :meth:`check` is the authenticated peer a message came from, the local node's own id
    for this device's originator, or None for an in-process driver (pipeline, simulator) that is
    trusted as to who sent what but still checked as to what was sent.
    """

    def __init__(self, cfg: ModelConfig, *, embeds: bool, max_rows: int, limits: Limits = UNLIMITED):
        self.cfg, self.embeds, self.max_rows, self.limits = cfg, embeds, max_rows, limits
        self.books: dict[str, _Book] = {}
        self.kv_tokens = 0  # sum of the books' costs, and the worker's cached prefixes (models/prefixcache.py)
        self.upstream: str | None = None  # the previous stage's node (see follow); None: not said
        # frees KV entries held for reuse only (cached prefixes) when a live session needs room: -> entries freed
        self.reclaim: Callable[[int], int] | None = None

    def follow(self, upstream: str | None) -> None:
        """The committed plan puts node ``upstream`` right before this stage: from now on a later stage
        takes segments from peers only when that node relays them. None: this is the first stage (its
        segments come from their originators, checked anyway) or the driver keeps no plan (in process)."""
        self.upstream = upstream

    def forget(self, request_id: str) -> None:
        """The worker closed the session (close, expiry, failure): its book goes with it."""
        book = self.books.pop(request_id, None)
        if book is not None:
            self.kv_tokens -= book.cost

    def sessions_of(self, owner: str | None) -> int:
        return sum(1 for b in self.books.values() if b.owner == owner)

    # ---- the checks -------------------------------------------------------------------------
    def check(self, msg: StageMessage, sender: str | None) -> None:
        """Raise :class:`FrameRejected` unless ``msg`` is safe to hand to the worker; then record it."""
        if isinstance(msg, Segment):
            self._segment(msg, sender)
        elif isinstance(msg, Prune):
            self._prune(msg, sender)
        elif isinstance(msg, Close):
            book = self.books.get(msg.request_id)
            if book is not None and sender is not None and sender != book.owner:
                raise self._foreign(msg.request_id, sender, book, "close")

    def _foreign(self, rid: str, sender: str | None, book: _Book, what: str) -> FrameRejected:
        return FrameRejected(
            rid,
            "not_owner",
            f"{what} from {sender} for a session that belongs to {book.owner}",
            spoils=False,
            tell=sender,
        )

    def _open(self, rid: str, owner: str | None) -> _Book:
        cap = self.limits.sessions_per_peer
        if cap is not None and self.sessions_of(owner) >= cap:
            raise FrameRejected(
                rid,
                "too_many_sessions",
                f"{owner} already holds {cap} sessions at this stage (its limit); retry when some finish",
                spoils=True,
                tell=owner,
            )
        self._need(rid, SESSION_FLOOR, owner)
        book = self.books[rid] = _Book(owner)
        self.kv_tokens += book.cost
        return book

    def _need(self, rid: str, extra: int, owner: str | None) -> None:
        cap = self.limits.kv_tokens
        if cap is not None and self.kv_tokens + extra > cap and self.reclaim is not None:
            self.reclaim(self.kv_tokens + extra - cap)
        if cap is not None and self.kv_tokens + extra > cap:
            raise FrameRejected(
                rid,
                "kv_full",
                f"this stage's KV cache is full ({self.kv_tokens} of {cap} entries in use); retry later",
                spoils=True,
                tell=owner,
            )

    def _segment(self, seg: Segment, sender: str | None) -> None:
        rid = seg.request_id
        book = self.books.get(rid)
        if sender is not None and seg.origin is None:
            raise FrameRejected(
                rid, "bad_segment", "a segment from a peer must name its originator", spoils=False, tell=sender
            )
        if sender is not None and self.embeds and sender != seg.origin:
            # the first stage embeds tokens sent by the originator itself, never relayed
            raise FrameRejected(
                rid, "not_owner", f"tokens from {sender} on behalf of {seg.origin}", spoils=False, tell=sender
            )
        if sender is not None and not self.embeds and self.upstream is not None and sender != self.upstream:
            raise FrameRejected(
                rid,
                "not_upstream",
                f"a segment relayed by {sender}, but the committed plan puts {self.upstream} before this stage",
                spoils=False,
                tell=sender,
            )
        if book is not None and book.owner != seg.origin:
            raise self._foreign(rid, sender, book, f"segment on behalf of {seg.origin}")

        def bad(reason: str) -> FrameRejected:
            return FrameRejected(rid, "bad_segment", reason, spoils=True, tell=seg.origin)

        n = len(seg.node_ids)
        if not 1 <= n <= self.max_rows:
            raise bad(f"a segment has 1 to {self.max_rows} rows at this stage, not {n}")
        if len(seg.parents) != n or len(seg.positions) != n:
            raise bad(f"{n} nodes but {len(seg.parents)} parents and {len(seg.positions)} positions")
        self._input(seg, bad)
        prefix = self._prefix(seg, book, bad)
        # rows a prune already killed are dropped by the worker unseen, so they are not checked further
        live = [i for i in range(n) if book is None or not book.dead(seg.node_ids[i])]
        pos_of: dict[int, int] = {}  # this segment's live rows so far
        for i in live:
            node, par, pos = seg.node_ids[i], seg.parents[i], seg.positions[i]
            if not 0 <= node <= MAX_NODE_ID:
                raise bad(f"node id {node} is out of range")
            if node in pos_of or (book is not None and node in book.nodes):
                raise bad(f"node {node} is sent twice")
            if par == PROMPT_PARENT:
                want = 0
            elif par in pos_of:
                want = pos_of[par] + 1
            elif book is not None and par in book.nodes:
                want = book.nodes[par][1] + 1
            elif par in prefix:
                want = par + 1
            else:
                raise bad(f"node {node}'s parent {par} is neither an earlier row of its segment nor a live node here")
            if pos != want:
                raise bad(f"node {node} is at position {pos}, but its parent {par} puts it at {want}")
            if pos >= self.cfg.max_position:
                raise bad(f"node {node}'s position {pos} is past the model's {self.cfg.max_position}")
            pos_of[node] = pos
        if book is None:
            book = self._open(rid, seg.origin)
        if prefix:
            book.nodes.update((i, (i - 1, i)) for i in prefix)
            book.committed.update(prefix)
        if len(book.nodes) + len(live) > self.cfg.max_position:
            raise bad(f"the session would hold {len(book.nodes) + len(live)} nodes, over the model's context")
        before = book.cost
        self._need(rid, max(SESSION_FLOOR, len(book.nodes) + len(live)) - before, seg.origin)
        for i in live:
            book.nodes[seg.node_ids[i]] = (seg.parents[i], seg.positions[i])
        if seg.commit:
            book.committed.update(seg.node_ids[i] for i in live)
        else:
            book.open.update(seg.node_ids[i] for i in live if seg.node_ids[i] not in book.committed)
        self.kv_tokens += book.cost - before

    def _prefix(self, seg: Segment, book: _Book | None, bad) -> range:
        """The nodes a prefix reference stands for (``0..length-1``, committed); a reference only
        opens a session, and covers whole blocks of the model's context with a prompt row after it."""
        ref = seg.prefix
        if ref is None:
            return range(0)
        if book is not None:
            raise bad("a prefix reference opens a session, but this request's session is already open")
        if not 0 <= ref.epoch <= MAX_NODE_ID or not 0 <= ref.hash <= MAX_NODE_ID:
            raise bad("a prefix reference's epoch or hash is out of range")
        if not 0 < ref.length < self.cfg.max_position or ref.length % PREFIX_BLOCK:
            raise bad(
                f"a prefix of {ref.length} tokens: a positive multiple of {PREFIX_BLOCK} below the model's "
                f"{self.cfg.max_position} positions"
            )
        if not seg.commit:
            raise bad("a prefix reference comes with the prompt's remaining rows (a commit segment)")
        return range(ref.length)

    def _input(self, seg: Segment, bad) -> None:
        """Tokens at the first stage, hidden states of the model's width and a float dtype elsewhere."""
        n = len(seg.node_ids)
        if self.embeds:
            if seg.tokens is None or seg.hidden is not None:
                raise bad("the first stage takes token ids, not hidden states")
            if len(seg.tokens) != n:
                raise bad(f"{n} nodes but {len(seg.tokens)} tokens")
            vocab = self.cfg.vocab_size
            if any(not 0 <= t < vocab for t in seg.tokens):
                raise bad(f"a token id is outside the vocabulary [0, {vocab})")
            return
        h = seg.hidden
        if h is None or seg.tokens is not None:
            raise bad("a later stage takes hidden states, not token ids")
        if h.dim() != 2 or tuple(h.shape) != (n, self.cfg.hidden_size):
            raise bad(f"hidden states of shape {tuple(h.shape)}; this model needs ({n}, {self.cfg.hidden_size})")
        if h.dtype not in WIRE_DTYPES:
            raise bad(f"hidden states of dtype {h.dtype}; send float32, float16 or bfloat16")
        if not bool(torch.isfinite(h).all()):
            raise bad("hidden states contain NaN or infinity")

    def _prune(self, p: Prune, sender: str | None) -> None:
        rid = p.request_id
        book = self.books.get(rid)
        if book is not None and sender is not None and sender != book.owner:
            raise self._foreign(rid, sender, book, "prune")

        def bad(reason: str) -> FrameRejected:
            return FrameRejected(rid, "bad_prune", reason, spoils=True, tell=book.owner if book else sender)

        limit = self.cfg.max_position
        if len(p.keep) > limit or len(p.commit) > limit:
            raise bad(f"a prune keeps or commits at most {limit} nodes (the model's context)")
        if any(not 0 <= x <= MAX_NODE_ID for x in (p.upto, *p.keep, *p.commit)):
            raise bad("a prune names a node id out of range")
        if book is not None and p.upto < book.upto:
            raise bad(f"a prune up to node {p.upto} after one up to {book.upto}: prunes only move forward")
        # the committed context is not walked on every prune (a token's worth of ar): only what it adds
        # and the open nodes (the only ones that can die) are
        keep, commits = frozenset(p.keep), set(p.commit)
        if book is not None:
            commits -= book.committed
            if len(book.committed) + len(commits) > limit:
                raise bad(f"the session would commit more than the model's {limit} positions")

            def committed(x: int) -> bool:
                return x in book.committed or x in commits

            def dies(x: int) -> bool:
                return x <= p.upto and x not in keep and not committed(x)

            for node in [x for x in keep if x in book.nodes] + [x for x in book.open if x > p.upto]:
                par = book.nodes[node][0]
                if not committed(node) and par != PROMPT_PARENT and (par not in book.nodes or dies(par)):
                    raise bad(f"the prune kills node {par} but keeps its child {node}")
        else:
            book = self._open(rid, sender)  # a prune may overtake the request's first segment
        before = book.cost
        book.committed.update(commits)
        book.open -= commits
        book.upto, book.keep = p.upto, keep
        dead = [x for x in book.open if book.dead(x)]
        for x in dead:
            del book.nodes[x]
        book.open.difference_update(dead)
        self.kv_tokens += book.cost - before


def check_result(request_id: str, sender: str | None, last_stage: str | None) -> None:
    """An originator takes a request's ``Result`` only from the node the committed plan makes its last
    stage: any other peer could otherwise hand it hidden states of its choosing, and the originator
    would decode them into tokens. ``last_stage`` None: no plan (nothing is in flight; refused);
    ``sender`` None: this device's own last stage, handing it over in process (a peer's is its
    authenticated node id, never this device's own: the handshake refuses a duplicate id).

    A refusal never spoils the request (the sender is not on its path); the sender is told.
    """
    if sender is None or sender == last_stage:
        return
    expected = "no plan is committed" if last_stage is None else f"the last stage is {last_stage}"
    raise FrameRejected(
        request_id, "not_last_stage", f"a result from {sender}, but {expected}", spoils=False, tell=sender
    )
