"""A stage's worker: per-request KV sessions for its layer slice, a queue, batched forwards.

No networking here. The daemon feeds it segments, prunes and closes from its links and runs
:meth:`StageWorker.step` in the torch executor; the in-process pipeline and the simulator call
the same methods directly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from meshd.ring.messages import PREFIX_MISS, PROMPT_PARENT, Close, Prune, Segment, StageMessage
from meshd.ring.validate import UNLIMITED, FrameGate, FrameRejected, Limits
from models.budget import CostCurve
from models.kvcache import KVCache
from models.prefixcache import PREFIX_BLOCK, PrefixCache
from models.stage import Attend, Stage


@dataclass
class Session:
    """One request's state at this stage: which node sits in which cache slot, and what is dead."""

    cache: KVCache
    last_used: float  # the worker's clock when a message last touched this session
    opened: int = 0  # order in which this worker first saw the request: older requests go first
    slot_of: dict[int, int] = field(default_factory=dict)
    parent: dict[int, int] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)
    open: set[int] = field(default_factory=set)  # cached nodes not committed: the only ones a prune can kill
    prunes: list[Prune] = field(default_factory=list)

    def dead(self, node: int) -> bool:
        """Committed context never dies; anything else dies if a prune issued after it left it out."""
        return node not in self.committed and any(p.dead(node) for p in self.prunes)

    def apply(self, prune: Prune) -> None:
        """Drop dead entries and compact the cache in place (accepted KV is never recomputed)."""
        self.prunes.append(prune)
        self.committed.update(prune.commit)
        self.open.difference_update(prune.commit)
        # only open nodes can die: the committed context is not walked on every prune (a token's worth of ar)
        dead = {n for n in self.open if self.dead(n)}
        if dead:
            self.open -= dead
            keep = sorted(((n, s) for n, s in self.slot_of.items() if n not in dead), key=lambda kv: kv[1])
            self.cache.keep([s for _, s in keep])
            self.slot_of = {n: i for i, (n, _) in enumerate(keep)}
            self.parent = {n: p for n, p in self.parent.items() if n in self.slot_of}
        # older prunes are subsumed once their range is below the newest one's
        self.prunes = [p for p in self.prunes if p.upto > prune.upto or p is prune]

    def mask_for(self, seg: Segment) -> torch.Tensor:
        """Bool (rows, cache.length + rows): committed context plus each row's own ancestors."""
        n_cache, t = self.cache.length, len(seg)
        m = torch.zeros(t, n_cache + t, dtype=torch.bool)
        m[:, :n_cache] = True  # every cached node is committed context but the open ones
        if self.open:
            m[:, [self.slot_of[n] for n in self.open]] = False
        row_of = {n: i for i, n in enumerate(seg.node_ids)}
        for r, (node, par) in enumerate(zip(seg.node_ids, seg.parents)):
            m[r, n_cache + r] = True
            while par != PROMPT_PARENT:
                if par in row_of:  # an ancestor in this very segment, committed or not: not in the cache yet
                    m[r, n_cache + row_of[par]] = True
                    par = seg.parents[row_of[par]]
                elif par in self.committed:  # cached committed context: already in every row's columns
                    break
                elif par in self.slot_of:
                    m[r, self.slot_of[par]] = True
                    par = self.parent.get(par, PROMPT_PARENT)
                else:
                    raise KeyError(f"node {node}'s ancestor {par} is unknown at this stage")
        return m

    def admit(self, seg: Segment, start: int) -> None:
        for i, (n, p) in enumerate(zip(seg.node_ids, seg.parents)):
            self.slot_of[n] = start + i
            self.parent[n] = p
        if seg.commit:
            self.committed.update(seg.node_ids)
        else:
            self.open.update(n for n in seg.node_ids if n not in self.committed)


def _awaited(seg: Segment) -> bool:
    """Whether the originator waits on ``seg``: a round's first segment, or the prompt."""
    return seg.first or seg.commit


class StageWorker:
    """Runs the layers ``stage.layer_range`` for every request that reaches this device.

    ``clock`` stamps session activity for :meth:`expire`; ``timer`` measures forwards for
    ``busy_seconds``. Both default to the machine's; a driver with a time of its own (a simulation,
    a test) passes its own. ``cost``: this stage's cost curve; with it, queued segments of one request
    are coalesced into one forward while that costs at most ``COALESCE_SLACK`` times the first one
    alone (on a flat, memory-bound curve a second segment then rides along almost free).

    ``prefix_bytes``: at most this many bytes of finished requests' context KV kept for reuse
    (:class:`~models.prefixcache.PrefixCache`; 0: none). The kept entries count against the same
    KV reservation as the sessions (``limits.kv_tokens``, the planner's ``contexts x max_context``):
    the cache lives in whatever the live requests leave free and gives it back (least recently used
    first) the moment a live request needs it, so it never makes the stage refuse work or exceed
    what the plan reserved.
    """

    COALESCE_SLACK = 1.25

    def __init__(
        self,
        stage: Stage,
        *,
        embed: Callable[[list[int]], torch.Tensor] | None = None,
        max_batch_rows: int = 256,
        idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[], float] = time.perf_counter,
        cost: CostCurve | None = None,
        limits: Limits = UNLIMITED,
        prefix_bytes: int = 0,
        epoch: int = 0,
    ):
        self.stage, self.embed, self.cost = stage, embed, cost
        self.gate = FrameGate(stage.cfg, embeds=embed is not None, max_rows=max_batch_rows, limits=limits)
        self.prefixes = PrefixCache(prefix_bytes, on_tokens=self._cached_tokens) if prefix_bytes > 0 else None
        if self.prefixes is not None:
            self.gate.reclaim = self.prefixes.reclaim
        self.epoch = epoch  # the plan this stage serves: prefixes are kept and found under it
        self.missed: deque[str] = deque(maxlen=1024)  # requests whose prefix missed: dropped until a restart
        self.prefix_tokens_reused = 0  # prompt positions whose KV a session got from the cache
        self.max_batch_rows, self.idle_timeout = max_batch_rows, idle_timeout
        self.clock, self.timer = clock, timer
        self.sessions: dict[str, Session] = {}
        self.queue: deque[Segment] = deque()
        self.closed: deque[str] = deque(maxlen=1024)  # late messages for these must not reopen a session
        self.busy_seconds = 0.0
        self.rows_done = 0
        self.forwards = 0
        self.shared_forwards = 0  # forwards that carried rows of more than one request (the ring was shared)
        self.coalesced = 0  # segments that rode along in another segment's forward
        self._last_rows: dict[str, int] = {}  # rows per request in the latest forward
        self._opened = 0

    def set_epoch(self, epoch: int) -> None:
        """A newly committed plan: prefixes kept under another epoch are dropped."""
        self.epoch = epoch
        if self.prefixes is not None:
            self.prefixes.set_epoch(epoch)

    def _cached_tokens(self, delta: int) -> None:
        self.gate.kv_tokens += delta  # cached prefixes draw on the sessions' KV reservation

    # ---- events ---------------------------------------------------------------------------
    def handle(self, msg: StageMessage, sender: str | None = None) -> None:
        """Apply one ring message in arrival order, once the gate has passed it (``sender``: see
        :meth:`FrameGate.check`); a refused message raises ``FrameRejected``.

        The daemon's inbox, the pipeline and the simulator's event queue all deliver through here,
        so every driver's worker sees exactly the same message semantics.
        """
        if isinstance(msg, (Segment, Prune, Close)) and msg.request_id in self.closed:
            return
        if isinstance(msg, Segment) and self._prefix_gate(msg, sender):
            return
        try:
            self.gate.check(msg, sender)
        except FrameRejected as exc:
            if exc.spoils:
                self.close(msg.request_id)
            raise
        if isinstance(msg, Segment):
            if msg.prefix is not None:
                self._fork(msg)
            self.enqueue(msg)
        elif isinstance(msg, Prune):
            self.prune(msg)
        elif isinstance(msg, Close):
            self._keep(msg)
            self.close(msg.request_id)
        else:
            raise TypeError(f"a stage cannot handle {type(msg).__name__}")

    # ---- prefix caching ---------------------------------------------------------------------
    def _prefix_gate(self, seg: Segment, sender: str | None) -> bool:
        """Before the gate: a restart drops what this stage holds of the request (its owner's only);
        a request whose prefix missed here is dropped until then. True: ``seg`` is dropped."""
        rid = seg.request_id
        if seg.restart:
            book = self.gate.books.get(rid)
            if book is None or sender is None or book.owner == seg.origin:
                self.sessions.pop(rid, None)
                self.gate.forget(rid)
                self.queue = deque(s for s in self.queue if s.request_id != rid)
                if rid in self.missed:
                    self.missed.remove(rid)
            return False
        return rid in self.missed

    def _fork(self, seg: Segment) -> None:
        """The request's session starts from the cached prefix ``seg.prefix`` names (nodes ``0..n-1``,
        committed); on a miss the originator hears ``prefix_miss`` and sends the whole prompt again."""
        ref, rid = seg.prefix, seg.request_id
        kv = self.prefixes.lookup(ref.epoch, ref.hash, ref.length) if self.prefixes is not None else None
        if kv is None or ref.epoch != self.epoch:
            self.gate.forget(rid)
            self.missed.append(rid)
            raise FrameRejected(
                rid,
                PREFIX_MISS,
                f"this stage no longer holds the {ref.length}-token prefix the request starts after; "
                "send the prompt again from its start",
                spoils=False,
                tell=seg.origin,
            )
        sess = self._session(rid)
        sess.cache.load(kv.k, kv.v)
        n = ref.length
        sess.slot_of = {i: i for i in range(n)}
        sess.parent = {i: i - 1 for i in range(n)}
        sess.committed, sess.open = set(range(n)), set()
        self.prefix_tokens_reused += n

    def _keep(self, close: Close) -> None:
        """A finished request asks this stage to keep its context: its committed KV, in whole blocks,
        as far as ``close.keep`` names them."""
        sess = self.sessions.get(close.request_id)
        if self.prefixes is None or sess is None or not close.keep or close.epoch != self.epoch:
            return
        limit = self.stage.cfg.max_position
        if len(close.keep) > limit // PREFIX_BLOCK or len(close.commit) > limit:
            return  # more than any context holds: not a request of this model; keep nothing
        committed = sess.committed.union(close.commit)
        # committed nodes form one chain from the first prompt token, and slots keep their order under
        # prunes; the chain is checked all the same, and only its unbroken start is kept
        chain = sorted((sess.slot_of[n], n) for n in committed if n in sess.slot_of)
        slots, prev = [], PROMPT_PARENT
        for slot, node in chain:
            if sess.parent.get(node) != prev:
                break
            slots.append(slot)
            prev = node
        blocks = min(len(slots), len(close.keep) * PREFIX_BLOCK) // PREFIX_BLOCK
        if blocks == 0:
            return
        k, v = sess.cache.gather(slots[: blocks * PREFIX_BLOCK])
        # the session's own entries are freed first (the caller closes it): the prefix takes their place
        self.sessions.pop(close.request_id, None)
        self.gate.forget(close.request_id)
        cap = self.gate.limits.kv_tokens
        need = blocks * PREFIX_BLOCK
        if cap is not None and self.gate.kv_tokens + need > cap:
            self.prefixes.reclaim(self.gate.kv_tokens + need - cap)
            if self.gate.kv_tokens + need > cap:
                return  # live requests hold the reservation: nothing is kept
        self.prefixes.store(self.epoch, list(close.keep[:blocks]), k, v)

    def enqueue(self, seg: Segment) -> None:
        if seg.request_id in self.closed:
            return
        sess = self.sessions.get(seg.request_id)
        if sess is not None and sess.prunes:
            live = [i for i, n in enumerate(seg.node_ids) if not sess.dead(n)]
            if len(live) != len(seg):
                seg = seg.rows(live)
        if len(seg):
            self.queue.append(seg)

    def prune(self, p: Prune) -> None:
        if p.request_id in self.closed:
            return
        sess = self._session(p.request_id)
        sess.apply(p)
        kept = deque()
        for seg in self.queue:
            if seg.request_id == p.request_id:
                live = [i for i, n in enumerate(seg.node_ids) if not sess.dead(n)]
                seg = seg.rows(live) if len(live) != len(seg) else seg
            if len(seg):
                kept.append(seg)
        self.queue = kept

    def close(self, request_id: str) -> None:
        if request_id in self.missed:
            self.missed.remove(request_id)
        self.sessions.pop(request_id, None)
        self.gate.forget(request_id)
        if request_id not in self.closed:
            self.closed.append(request_id)
        self.queue = deque(s for s in self.queue if s.request_id != request_id)

    def expire(self, now: float | None = None) -> list[str]:
        """Free sessions idle past the timeout (an originator that vanished never sends close)."""
        now = self.clock() if now is None else now
        gone = [r for r, s in self.sessions.items() if now - s.last_used > self.idle_timeout]
        for r in gone:
            self.close(r)
        return gone

    @property
    def queued_rows(self) -> int:
        return sum(len(s) for s in self.queue)

    @property
    def fillers_only(self) -> bool:
        """Whether something is queued and none of it is awaited: no round's first segment, no prompt."""
        return bool(self.queue) and not any(_awaited(seg) for seg in self.queue)

    def rows_besides(self, request_id: str) -> int:
        """Rows of requests other than ``request_id`` here: queued, or in the latest forward. The last stage
        reports it with each result (``Result.stage_queue``), so an originator also sees the requests of
        other originators that share the ring's forwards with its own."""
        queued = sum(len(s) for s in self.queue if s.request_id != request_id)
        return queued + sum(n for r, n in self._last_rows.items() if r != request_id)

    # ---- compute --------------------------------------------------------------------------
    def _session(self, request_id: str) -> Session:
        sess = self.sessions.get(request_id)
        now = self.clock()
        if sess is None:
            sess = self.sessions[request_id] = Session(self.stage.new_cache(), now, self._opened)
            self._opened += 1
        sess.last_used = now
        return sess

    def take_batch(self) -> list[Segment]:
        """The queued segments for the next forward, up to ``max_batch_rows``: per request its oldest
        queued segment (a request's later segment may depend on its earlier one), with the ones queued
        behind it coalesced in while that is cheap (see ``cost``); requests waiting on a round's first
        segment or on their prompt before those with only filler queued, older requests before newer ones;
        within a request, a first segment that needs none of the rows queued ahead of it goes before them
        (:meth:`_first_ready`)."""
        heads: dict[str, int] = {}  # request -> index of its oldest queued segment
        urgent: set[str] = set()
        for i, seg in enumerate(self.queue):
            heads.setdefault(seg.request_id, i)
            if _awaited(seg):
                urgent.add(seg.request_id)
        age = {r: (s.opened if (s := self.sessions.get(r)) else self._opened) for r in heads}
        order = sorted(heads, key=lambda r: (r not in urgent, age[r], heads[r]))
        taken: set[int] = set()
        batch, rows = [], 0
        for rid in order:
            run = [i for i, seg in enumerate(self.queue) if seg.request_id == rid]
            jump = self._first_ready(run)
            if jump is not None:  # the walk waits on it and it needs nothing queued before it: it goes now, alone
                run = [jump]
            merged = self.queue[run[0]]
            if batch and rows + len(merged) > self.max_batch_rows:
                continue
            used = [run[0]]
            for i in run[1:]:
                nxt = self.queue[i]
                if not self._coalesce(merged, nxt, self.max_batch_rows - rows):
                    break
                merged = _concat(merged, nxt)
                used.append(i)
            self.coalesced += len(used) - 1
            batch.append(merged)
            taken.update(used)
            rows += len(merged)
        self.queue = deque(seg for i, seg in enumerate(self.queue) if i not in taken)
        return batch

    def _first_ready(self, run: list[int]) -> int | None:
        """Of one request's queued segments (queue indices ``run``, oldest first): a round's first segment
        queued behind fillers whose rows it does not need (every parent computed at this stage already, or
        in the segment itself), so it can run before them; None when the oldest goes first anyway.

        The originator's walk waits on a first segment and on nothing else, and a filler queued ahead of
        it (sent while the previous first segment was in flight) would hold it back by a whole forward."""
        if len(run) < 2:
            return None
        sess = self.sessions.get(self.queue[run[0]].request_id)
        if sess is None:
            return None
        for i in run[1:]:
            seg = self.queue[i]
            if not seg.first:
                continue
            own = set()
            for n, par in zip(seg.node_ids, seg.parents):
                # computed here (slot_of), not merely committed: a prune commits the accepted node the walk
                # waits on while its row may still be queued at this stage
                if par != PROMPT_PARENT and par not in own and par not in sess.slot_of:
                    break
                own.add(n)
            else:
                return i
        return None

    def _coalesce(self, seg: Segment, nxt: Segment, room: int) -> bool:
        """Whether ``nxt`` (queued behind ``seg``, same request) should share its forward."""
        if self.cost is None or nxt.commit != seg.commit or len(seg) + len(nxt) > room:
            return False
        if (seg.tokens is None) != (nxt.tokens is None):
            return False
        return self.cost(len(seg) + len(nxt)) <= self.COALESCE_SLACK * self.cost(len(seg))

    @torch.inference_mode()
    def run(self, batch: list[Segment]) -> list[Segment]:
        """One batched forward over ``batch``; returns each segment with its output hidden states."""
        if not batch:
            return []
        t0 = self.timer()
        xs, items = [], []
        for seg in batch:
            sess = self._session(seg.request_id)
            if seg.hidden is not None:
                xs.append(seg.hidden.to(self.stage.dtype))
            elif self.embed is not None and seg.tokens is not None:
                xs.append(self.embed(seg.tokens).to(self.stage.dtype))
            else:
                raise ValueError(f"segment of {seg.request_id} has neither hidden states nor tokens to embed")
            mask = sess.mask_for(seg)
            sess.admit(seg, sess.cache.length)
            items.append(Attend(sess.cache, torch.tensor(seg.positions), mask))
        out = self.stage.forward(torch.cat(xs), items)
        results, row = [], 0
        for seg in batch:
            results.append(seg.with_hidden(out[row : row + len(seg)]))
            row += len(seg)
        self.busy_seconds += self.timer() - t0
        self._last_rows = {}
        for seg in batch:
            self._last_rows[seg.request_id] = self._last_rows.get(seg.request_id, 0) + len(seg)
        self.rows_done += sum(len(s) for s in batch)
        self.forwards += 1
        self.shared_forwards += len(batch) > 1
        return results

    def step(self) -> list[Segment]:
        return self.run(self.take_batch())


def _concat(a: Segment, b: Segment) -> Segment:
    """One segment holding ``a``'s rows then ``b``'s (same request; ``b`` queued after ``a``, so every
    parent still comes before its children)."""
    return Segment(
        a.request_id,
        a.node_ids + b.node_ids,
        a.parents + b.parents,
        a.positions + b.positions,
        a.tokens + b.tokens if a.tokens is not None else None,
        torch.cat([a.hidden, b.hidden]) if a.hidden is not None else None,
        a.commit,
        a.origin,
        a.first or b.first,
        a.prefix,
        a.restart,
    )
