"""The originator's brain, sans-IO: events in (submit, result, cancel, ring lost), actions out.

The daemon, the in-process pipeline and the simulator all drive this same class; none of its
methods touches a socket or a clock it was not given. Torch work (LM head, drafting) happens
inside the calls, so the daemon calls them from its torch executor. A result is taken in two calls,
``verify_result`` (the walk: tokens for the client, prunes for the stages) and ``follow_up`` (the
drafting it calls for, and the segments), so that a driver can send the tokens before drafting.

Three modes, per request:
- ``ar``: one token per pass through the ring.
- ``chunk``: one tree per round, cut into chunks in tree order, verified once every chunk is
  back (FlowSpec's Chunk-PP baseline).
- ``flow``: the tree is cut into score-sorted segments that stream through the ring; each
  returning segment is verified at once (step-wise), a prune decision goes to every stage, and
  the tree is re-drafted from the new frontier and extended with new segments.

``flow`` keeps a number of segments per request in flight (its *slots*, ``flow_slots``; by default
from :class:`~meshd.ring.ringtime.RingTimer`: ring latency over the slowest step) and refills them
after every event: the prefill's end, every returning segment (also one whose rows were all pruned or
that did not move the walk) and a finished round, which refills at once from the bonus token. A
round's first segment (the new root and the frontier's likeliest descendants) is sized to come back
fast; the following *filler* segments carry the best unsent candidates, sized to keep the slowest
step busy. ``flow_slots=1`` is the earlier scheduler, kept for comparison: one tree per round, cut
into segments only where the stages' compute curve makes that free (``flat_rows``). With
``draft_when_idle`` a first segment leaves after a shallow draft, deepened first only while a level's
measured drafting time is worth what it saves (:meth:`Originator._deeper_first_pays`), and
:meth:`Originator.idle` deepens the pool while it is in flight, for drivers that call it when the
originator's device is idle. With ``resumable_drafting`` (the default) a pool is drafted once per round
and then grown by the drafter one level at a time (``Drafter.extend``), in :meth:`Originator.idle` and
after a re-root, instead of being re-drafted from the root and merged.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from meshd.modes import MESH_MODES
from meshd.ring.messages import PROMPT_PARENT, PrefixRef, Prune, Result, Segment
from meshd.ring.ringtime import RingTimer
from models.budget import CostCurve, TreeBudget
from models.drafters import Drafter, can_extend, couple
from models.engine import Stats
from models.prefixcache import PrefixBook, PrefixMatch
from models.stage import Stage
from models.tree import Tree, frontier, split_segments
from models.verify import Draws, History, Sampling, TokenLogprobs, Walk, advance, sample_token, token_logprobs

# A filler node must be expected to be accepted at least this often to use a row, and drafting when idle:
# levels always drafted before a first segment goes out (deeper ones follow where they pay,
# Originator._deeper_first_pays) and levels the idle draft reaches. Chosen on simulated runs whose modes
# write the same text (int4a8 target; docs/benchmarks.md, "Fillers down to half a per cent"): 0.005, 3 and 8
# against 0.02, 2 and 5 read +2-5 % tokens/s at T=0 and +2-4 % at T=1 (paired: noise keyed by position makes
# every variant write the same sampled text), for ~80 % more rows on the stages; on 5 emulated daemons
# +4.6 % at T=0 (an unpaired "-7 %" at T=1 was different answers, "Sampled answers the same in every mode").
# On a steep (CPU) curve a filler's rows must pay for the step they lengthen, so the floor rarely binds there.
# IDLE_FIRST_DEPTH back to 2 later (docs/benchmarks.md, "Two levels before a first segment"): on the later
# scheduler 2 and 3 read the same at T=0 (22.69 and 22.70 tok/s on the 13 x 256), and 2 is +2-5 % at
# T=1, where a walk rarely gets three levels deep and every level drafted first delays each restart.
FILL_FLOOR = 0.005
IDLE_FIRST_DEPTH = 2
IDLE_DEPTH = 8
# drafted trees (decayed count, memory 0.8: ~5 trees) measured before flow may back off to plain trees
TREES_TO_JUDGE = 3.0
# how far past a segment's expected return a fillers-only forward on the originator's own device waits for it,
# as a fraction of that forward (Originator.hold_stage)
HOLD_SLACK = 0.25
# why a continuous request's drafted tree ended at the node where its walk stopped (Stats.tree_ends): the pool
# held children of that node, none with the target's token; one held it, but no row had been sent for it;
# no child had been drafted there
TREE_ENDS = ("missed", "unsent", "undrafted")


# ---- actions ------------------------------------------------------------------------------
@dataclass
class SendSegment:
    segment: Segment


@dataclass
class SendPrune:
    prune: Prune


@dataclass
class Emit:
    request_id: str
    tokens: list[int]
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked for them
    # on the first tokens after a resume: how long the client waited for them (the pause), in seconds
    resumed_after: float | None = None


@dataclass
class Finish:
    request_id: str
    reason: str  # stop | length | cancelled | error
    stats: Stats
    error: str | None = None


@dataclass
class CloseSessions:
    """Every stage frees the request's session; a finished one may first keep its context's KV for
    reuse (see :class:`~meshd.ring.messages.Close`: ``keep``, ``commit``, ``epoch``)."""

    request_id: str  # the id the stages know the request by (its ring id, see ``_Live.ring_id``)
    keep: tuple[int, ...] = ()
    commit: tuple[int, ...] = ()
    epoch: int = 0


Action = SendSegment | SendPrune | Emit | Finish | CloseSessions


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    max_new_tokens: int = 128
    mode: str = "flow"
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    eos: frozenset[int] = frozenset()
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: none)
    prefix_cache: bool = True  # start after a prefix the stages kept, and ask them to keep this one's context


@dataclass
class _Live:
    """Per-request state at the originator."""

    req: Request
    drafter: Drafter | None
    budget: TreeBudget
    draws: Draws  # the request's noise by position: the target samples with it, the drafter ranks with it
    stats: Stats = field(default_factory=Stats)
    out: list[int] = field(default_factory=list)
    next_id: int = 0
    pos: dict[int, int] = field(default_factory=dict)
    tree: Tree | None = None
    ids: list[int] = field(default_factory=list)  # tree index -> node id
    walk: Walk = field(default_factory=Walk)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    feats: dict[int, torch.Tensor] = field(default_factory=dict)
    prefill_left: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # node ids sent and not yet returned or pruned
    tail: int = PROMPT_PARENT  # newest committed node with computed KV: the parent of a fresh root
    predicted: float = 0.0  # sum of draft probabilities of the nodes sent this round
    round_accepted: int = 0
    started: float = 0.0
    done: bool = False
    # continuous flow (slots > 1): the candidate pool at the tree's root, which of its nodes are sent
    # (pool index -> tree index), the live segments (number -> node ids still in flight)
    pool: Tree | None = None
    placed: dict[int, int] = field(default_factory=dict)
    root_sent: bool = True
    fresh: bool = False  # the next segment is a round's (or a new frontier's) first: small, sent first
    segments: dict[int, set[int]] = field(default_factory=dict)
    seg_of: dict[int, int] = field(default_factory=dict)
    # when each live segment's result is expected back (sent + ring latency), and when the first stage is
    # expected to be done with every segment of this request sent so far: a filler must fit in between
    due: dict[int, float] = field(default_factory=dict)
    stage_free: float = 0.0
    stage_load: int = 0  # other requests' rows at the last stage, as its latest result reported them
    next_seg: int = 0
    first_depth: int = 2  # levels below its root the latest first segment reached
    deepen: bool = False  # the pool was drafted shallow for a first segment; deepen it when idle
    # flow is never slower than ar: when the latest tree began (None: not timed), the tokens it emitted so
    # far, and whether it was drafted (False: a plain tree, its root alone, as an ar token)
    tree_started: float | None = None
    tree_tokens: int = 0
    tree_drafted: bool = False
    tree_rows: int = 0  # the request's verified rows before the latest tree began
    # prefix caching: the cached prefix the prompt starts after (None: computed from its start), the
    # target's post-norm features of every context position whose KV the stages hold (a record for the
    # next request that reuses them), and the last round's accepted nodes with computed KV
    prefix: PrefixMatch | None = None
    ctx_feats: list[torch.Tensor] = field(default_factory=list)
    final_commit: list[int] = field(default_factory=list)
    # resume: the id the stages know this request by (the client's id, a fresh one after each resume, so
    # that nothing of an earlier ring can reach the new one), and the pause the client is in
    ring_id: str = ""
    paused_at: float | None = None  # when the ring was lost; cleared by the first tokens after the resume
    waiting: bool = False  # paused and not yet replayed on a ring
    replaying: bool = False  # the replay prefill of the committed history is in flight
    # between Originator.verify_result and follow_up: a result was verified (following), what its walk calls
    # for next (then: a new round or a re-rooted frontier, drafted and sent by follow_up; None: nothing but
    # a continuous request's refill) and the verification's time, which follow_up adds to its own
    following: bool = False
    then: Callable[[], list[Action]] | None = None
    verify_seconds: float = 0.0

    @property
    def context(self) -> list[int]:
        return self.req.prompt + self.out

    def new_ids(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids


class Originator:
    """Drafts, verifies and streams for the requests this peer originates."""

    def __init__(
        self,
        vocab: Stage,
        drafter_factory: Callable[[], Drafter] | None,
        stage_curves: Sequence[CostCurve],
        *,
        clock: Callable[[], float] = time.perf_counter,
        top_k: int = 8,
        depth: int = 8,
        pool: int = 512,
        max_nodes: int = 64,
        origin: str | None = None,
        timer: Callable[[], float] = time.perf_counter,
        flow_slots: int | None = None,
        draft_when_idle: bool = False,
        prefix_book: PrefixBook | None = None,
        resumable_drafting: bool = True,
        local_stage: int | None = None,
        back_off: bool = True,
    ):
        if not vocab.has_vocab:
            raise ValueError("the originator needs the embeddings, final norm and LM head")
        self.vocab, self.drafter_factory, self.clock, self.origin = vocab, drafter_factory, clock, origin
        self.timer = timer  # measures drafting cost for the budget; the simulator swaps in its device model
        if flow_slots is not None and flow_slots < 1:
            raise ValueError(f"flow slots {flow_slots}: at least 1 (or None: from the ring's measured times)")
        self.flow_slots = flow_slots
        # a driver that calls idle() when the originator's device has nothing else to do may set this:
        # a continuous request's first segment then goes out after a shallow draft
        self.draft_when_idle = draft_when_idle
        # grow a round's pool level by level with a drafter that keeps its state (models/drafters.py: extend),
        # also across a re-root, instead of drafting it again from the root and merging (False: the latter)
        self.resumable_drafting = resumable_drafting
        # flow drafts only while drafted trees yield more tokens a second than plain ones (:meth:`_start_tree`);
        # False: every tree is drafted (to measure a drafter's acceptance, which plain trees would dilute)
        self.back_off = back_off
        # prefix caching (models/prefixcache.py): what this originator asked the stages to keep; None: off
        self.prefix_book = prefix_book
        self.set_ring(stage_curves, local_stage)
        self.top_k, self.depth, self.pool, self.max_nodes = top_k, depth, pool, max_nodes
        self.live: dict[str, _Live] = {}
        self._by_ring: dict[str, str] = {}  # ring id -> request id, for what comes back from the stages
        self._rows_hint = 8  # rows of the latest flow segment: the size slots are computed for
        self._level_seconds: float | None = None  # one pool level's drafting time (_grow), averaged
        self.peak_segments = 0  # most segments of one request in flight at once, since start

    def set_ring(self, stage_curves: Sequence[CostCurve], local_stage: int | None = None) -> None:
        """A new plan: the number of stages and the cost of a pass through all of them. ``local_stage``:
        the stage this originator's device also runs (None: none), whose forwards share its thread."""
        if not stage_curves:
            raise ValueError("a ring needs at least one stage")
        self.n_stages = len(stage_curves)
        total = stage_curves[0]
        for c in stage_curves[1:]:
            total = total + c
        self.ring_cost = total
        self.ring = RingTimer(stage_curves, local=local_stage)
        # a plain tree's seconds a token on this ring, from the latest request that timed one: where a flow
        # request starts judging its drafted trees (None: its first tree is plain, to time one). Public so a
        # driver that models a daemon which has served requests on this ring can carry it over (the simulator)
        self.plain_tree_s: float | None = None
        self.max_slots = 2 * self.n_stages  # a segment per stage, and as many queued behind them
        # the flat head of the curve: up to this many rows cost about as much as one, so cutting a tree
        # into segments smaller than this buys no overlap, only extra forwards
        self.flat_rows = max([t for t in total.ts if total(t) <= 1.25 * total(1)] or [1])

    def set_epoch(self, epoch: int) -> None:
        """The plan the stages serve: prefixes are named under it, and those of another plan are gone."""
        if self.prefix_book is not None:
            self.prefix_book.set_epoch(epoch)

    # ---- events -----------------------------------------------------------------------------
    def submit(self, req: Request) -> list[Action]:
        if req.mode not in MESH_MODES:
            raise ValueError(f"mode {req.mode!r}; choose one of {', '.join(MESH_MODES)}")
        if req.request_id in self.live:
            raise ValueError(f"request id {req.request_id!r} is already live")
        if not req.prompt:
            raise ValueError("the prompt is empty")
        drafter = self.drafter_factory() if (req.mode != "ar" and self.drafter_factory) else None
        if drafter is not None:
            drafter.reset(list(req.prompt))
        lv = _Live(
            req,
            drafter,
            TreeBudget(
                self.ring_cost,
                max_nodes=self.max_nodes,
                back_off=self.back_off,
                measured_only=True,
                judge_after=TREES_TO_JUDGE,
                plain_s=self.plain_tree_s,
            ),
            Draws(req.seed),
            started=self.clock(),
            ring_id=req.request_id,
        )
        couple(drafter, lv.draws, req.sampling)
        self.live[req.request_id] = lv
        self._by_ring[lv.ring_id] = req.request_id
        lv.new_ids(len(req.prompt))  # the prompt's nodes are 0..n-1, at their positions
        if self.prefix_book is not None and req.prefix_cache:
            lv.prefix = self.prefix_book.match(req.prompt, need_feats=drafter is not None)
        return self._prefill_segments(lv, req.prompt)

    def _prefill_segments(self, lv: _Live, tokens: list[int], restart: bool = False) -> list[Action]:
        """``tokens`` as committed context from position 0 (a new request's prompt, or a resumed
        request's history; their nodes 0..n-1 already allocated), cut into as many chunks as the ring's
        model says bring the last one back soonest (:meth:`RingTimer.prefill_chunks`). With a cached
        prefix ``lv.prefix`` the chunks start after it (the first names the prefix; stages fork the
        request's KV from their cache); ``restart``: the stages drop whatever they hold of the request
        first (after a prefix miss)."""
        skip = lv.prefix.length if lv.prefix is not None else 0
        lv.stats.prefix_hit += skip  # summed over the request's prefills: its prompt's and each replay's
        ids = list(range(skip, len(tokens)))
        acts: list[Action] = []
        for a, chunk in enumerate(split_segments(ids, self.ring.prefill_chunks(len(ids)))):
            for i in chunk:
                lv.pos[i] = i
            seg = Segment(
                lv.ring_id,
                chunk,
                [i - 1 if i > 0 else PROMPT_PARENT for i in chunk],
                chunk,
                tokens=[tokens[i] for i in chunk],
                commit=True,
                origin=self.origin,
                prefix=PrefixRef(lv.prefix.epoch, skip, lv.prefix.hash) if skip and a == 0 else None,
                restart=restart and a == 0,
            )
            acts.append(SendSegment(seg))
            lv.stats.target_forwards += 1
        lv.prefill_left = set(ids)
        return acts

    def prefix_miss(self, ring_id: str) -> list[Action]:
        """A stage no longer holds the prefix the prefill of the request it knows as ``ring_id`` started
        after: send the whole prefill again from position 0, the prompt or, for a resumed request, its
        history (the request goes on; only its next token comes later). Once per prefill: other stages'
        misses of the same prefix are answered by the same restart."""
        rid = self._by_ring.get(ring_id)
        lv = self.live.get(rid) if rid is not None else None
        if lv is None or lv.prefix is None or not lv.prefill_left:
            return []
        self.prefix_book.forget(lv.prefix.hash)
        lv.stats.prefix_hit -= lv.prefix.length  # offered, not reused: the restart computes it
        lv.prefix = None
        lv.feats.clear()
        lv.stats.prefix_misses += 1
        return self._prefill_segments(lv, self._committed(lv), restart=True)

    def cancel(self, request_id: str, reason: str = "cancelled", error: str | None = None) -> list[Action]:
        lv = self.live.pop(request_id, None)
        if lv is None:
            return []
        self._by_ring.pop(lv.ring_id, None)
        lv.done = True
        lv.stats.seconds = self.clock() - lv.started
        return [CloseSessions(lv.ring_id), Finish(request_id, reason, lv.stats, error)]

    def ring_lost(self, why: str) -> list[Action]:
        """A stage died: every request in flight fails with an error (no silent hang)."""
        acts: list[Action] = []
        for rid in list(self.live):
            acts += self.cancel(rid, "error", why)
        return acts

    # ---- resume: the ring lost or re-planned under live requests ---------------------------------
    def request_of(self, ring_id: str) -> str | None:
        """The live request the stages know as ``ring_id`` (None: none, or an earlier ring's id)."""
        return self._by_ring.get(ring_id)

    def paused(self) -> dict[str, float]:
        """Live requests in a pause (waiting for a ring, or replaying their history on one) and how long
        each has been paused, in seconds: the daemon tells their clients why no token comes."""
        now = self.clock()
        return {rid: now - lv.paused_at for rid, lv in self.live.items() if lv.paused_at is not None}

    def waiting(self) -> list[str]:
        """Live requests waiting for a ring to be replayed on."""
        return [rid for rid, lv in self.live.items() if lv.waiting]

    def on_ring_lost(self) -> list[Action]:
        """The ring is gone (a stage died or was cut off) or is about to be replaced (a new plan moved
        the layers): every live request pauses. What it has emitted stays; what was in flight is
        forgotten, and anything still coming back from the old ring is ignored. :meth:`on_ring`
        resumes them; no action goes out now (the stages that would receive them may be gone)."""
        for lv in self.live.values():
            self._pause(lv)
        return []

    def pause(self, ring_id: str) -> list[Action]:
        """One request's path through the ring broke (a send to a stage failed, a stage moved on to a
        newer plan): it pauses like :meth:`on_ring_lost`, alone."""
        rid = self._by_ring.get(ring_id)
        if rid is not None:
            self._pause(self.live[rid])
        return []

    def on_ring(self, stage_curves: Sequence[CostCurve], local_stage: int | None = None) -> list[Action]:
        """A ring to serve on (a newly committed plan, or the current one again): every paused request
        resumes on it. See :meth:`_resume`."""
        self.set_ring(stage_curves, local_stage)
        return self.resume_waiting()

    def resume_waiting(self, older_than: float = 0.0) -> list[Action]:
        """Resume on the current ring every request that has waited for one at least ``older_than`` s."""
        now, acts = self.clock(), []
        for lv in list(self.live.values()):
            if lv.waiting and lv.paused_at is not None and now - lv.paused_at >= older_than:
                acts += self._resume(lv)
        return acts

    def give_up(self, timeout: float, why: str) -> list[Action]:
        """Requests that waited for a ring longer than ``timeout`` s fail with ``why`` (what is missing)."""
        now, acts = self.clock(), []
        for rid, lv in list(self.live.items()):
            if lv.waiting and lv.paused_at is not None and now - lv.paused_at > timeout:
                acts += self.cancel(
                    rid, "error", f"its ring was lost and no new plan could take it within {timeout:g} s: {why}"
                )
        return acts

    def _pause(self, lv: _Live) -> None:
        if lv.paused_at is None:  # a second loss during the replay extends the same pause
            lv.paused_at = self.clock()
        lv.waiting, lv.replaying = True, False
        for k in list(lv.segments):
            self.ring.dropped((lv.req.request_id, k))
        lv.segments.clear()
        lv.seg_of.clear()
        lv.due.clear()
        lv.stage_free = 0.0  # the old ring's stages: nothing of this request is computing on the new one
        lv.tree_started = None  # the tree in progress is lost: its time says nothing of drafts
        lv.following, lv.then, lv.verify_seconds = False, None, 0.0  # what a result called for is lost with it
        lv.in_flight.clear()
        lv.prefill_left.clear()
        lv.logits.clear()
        lv.feats.clear()
        lv.tree, lv.pool, lv.placed, lv.ids, lv.walk, lv.deepen = None, None, {}, [], Walk(), False
        lv.ctx_feats, lv.final_commit = [], []  # node ids and features of the old ring's context

    def _resume(self, lv: _Live) -> list[Action]:
        """Rebuild ``lv``'s KV on the current ring and carry on from its last emitted token.

        The stages learn the request under a fresh ring id (the old one's sessions are closed and its
        late messages cannot mix in) and get its committed history as one prefill from position 0: the
        prompt and every emitted token but the last, which is the next round's root as it would have
        been. The drafter restarts from that history, as for a new prompt. What is decided is decided:
        no token is sampled again, and the request's random generator (``seed``) continues where it
        stopped, so with temperature > 0 the tokens after a resume are the next draws of the same
        stream, one per position (models/verify.py): the text an uninterrupted run writes, though the
        trees it verifies differ. With nothing emitted yet it is a plain new prefill.

        Like a prompt, the replay starts after the longest prefix of the history the prefix book holds
        (``Segment.prefix``; a stage that evicted it answers ``prefix_miss`` and the whole history is
        sent again). The book is emptied of every other plan's prefixes at :meth:`set_epoch`, so only
        prefixes kept under the ring's current epoch can match: a resume on the same plan (a path that
        broke and is retried on the ring still in place) finds what the request's own prompt started
        after, and a new plan (a lost stage, a re-plan, a ``stale_epoch`` bounce, which resumes at this
        originator's own commit of the newer plan) finds only what requests that finished on it since
        its commit kept (a shared system prompt, say). Nothing kept before a re-plan can serve after it:
        a stage keeps KV for its own layer slice only, so the KV of a slice that moved exists on no stage
        of the new ring (its old holder dropped it with the old epoch, the new holder never computed it).
        """
        old = lv.ring_id
        self._by_ring.pop(old, None)
        lv.stats.resumed += 1
        lv.ring_id = resumed_ring_id(lv.req.request_id, lv.stats.resumed)
        self._by_ring[lv.ring_id] = lv.req.request_id
        lv.waiting, lv.replaying = False, bool(lv.out)
        lv.next_id, lv.pos, lv.tail = 0, {}, PROMPT_PARENT
        lv.budget.cost = self.ring_cost
        history = self._committed(lv)
        if lv.drafter is not None:
            lv.drafter.reset(list(history))
        lv.prefix = None
        if self.prefix_book is not None and lv.req.prefix_cache:
            lv.prefix = self.prefix_book.match(history, need_feats=lv.drafter is not None)
        lv.new_ids(len(history))
        return [CloseSessions(old), *self._prefill_segments(lv, history)]

    @staticmethod
    def _committed(lv: _Live) -> list[int]:
        """The tokens whose KV a prefill puts on the stages: the prompt and every emitted token but the
        last (the next round's root, never computed before its round); just the prompt before any."""
        return lv.context[:-1] if lv.out else list(lv.req.prompt)

    def _replayed(self, lv: _Live, feats: torch.Tensor) -> list[Action]:
        """The replay prefill is back: the history's KV is on every stage again; the next round starts
        at the last emitted token, exactly as after a prompt's prefill (nothing is sampled here).
        ``feats``: the replayed positions' features, after the cached prefix when there was one."""
        lv.replaying = False
        full = self._context_feats(lv, feats)
        if self.prefix_book is not None and full is not None:  # the record a later turn may reuse
            lv.ctx_feats = [full]
        if lv.drafter is not None:
            lv.drafter.accept(lv.context, full if full is not None else feats)
        lv.then = lambda: self._new_round(lv)
        return []

    @staticmethod
    def _context_feats(lv: _Live, feats: torch.Tensor) -> torch.Tensor | None:
        """The features of every committed position from 0: a prefill's ``feats`` (the positions it
        computed) after those the cached prefix recorded. None when the prefix was matched without
        them, which only a request without a drafter allows (``match(need_feats=...)``)."""
        if lv.prefix is None:
            return feats
        if lv.prefix.feats is None:
            return None
        return torch.cat([lv.prefix.feats.to(feats.dtype), feats])

    def _by_result(self, res: Result) -> _Live | None:
        rid = self._by_ring.get(res.request_id)
        lv = self.live.get(rid) if rid is not None else None
        return None if lv is None or lv.waiting else lv

    def on_result(self, res: Result) -> list[Action]:
        """Hidden states of ``res``'s nodes came back from the last stage: :meth:`verify_result` and
        :meth:`follow_up` in one call, for drivers that send nothing between them."""
        return self.verify_result(res) + self.follow_up(res.request_id)

    def verify_result(self, res: Result) -> list[Action]:
        """The first half of :meth:`on_result`: the LM head and the walk over ``res``'s rows, with what they
        decide at once (the client's tokens, the stages' prune). The drafting they call for (a new round's
        pool, a re-rooted frontier's levels) and the segments that carry it wait for :meth:`follow_up`, so a
        driver can send the tokens and the prune first: a client otherwise waited a draft longer for every
        round's last tokens, and for the answer's first token (a ``chunk`` tree's whole depth)."""
        lv = self._by_result(res)
        if lv is None:
            return []  # finished, cancelled, or sent on a ring since lost, while this segment was in flight
        acts = self._follow(lv)  # an earlier result of this request not followed up yet: its round goes first
        lv.stage_load = res.stage_queue
        t0 = self.timer()
        lv.following = True
        acts += self._prefill_result(lv, res) if lv.prefill_left else self._verify(lv, res)
        lv.verify_seconds += self.timer() - t0
        return acts

    def follow_up(self, ring_id: str) -> list[Action]:
        """The second half of :meth:`on_result` for the request the stages know as ``ring_id``, once per
        :meth:`verify_result` (a second call, or one for a request that finished meanwhile, returns nothing):
        the round or frontier its walk moved to is drafted and sent, and a continuous request's slots are
        refilled (after every result, also one that moved nothing)."""
        rid = self._by_ring.get(ring_id)
        lv = self.live.get(rid) if rid is not None else None
        return self._follow(lv) if lv is not None else []

    def _follow(self, lv: _Live) -> list[Action]:
        """:meth:`follow_up` for ``lv``; also what :meth:`verify_result` runs first when a second result of
        the request comes before the first's follow-up (one device step held both), so each walk goes on
        from the tree the previous one left, as with :meth:`on_result` per result."""
        if not lv.following or lv.waiting or lv.done:
            return []
        lv.following = False
        t0 = self.timer()
        then, lv.then = lv.then, None
        acts = then() if then is not None else []
        if self._continuous(lv) and not lv.done:
            acts += self._fill(lv)
            self.ring.originator_work(lv.verify_seconds + self.timer() - t0)
        lv.verify_seconds = 0.0
        return acts

    def _verify(self, lv: _Live, res: Result) -> list[Action]:
        self._returned(lv, res.node_ids)
        wanted = [i for i, n in enumerate(res.node_ids) if n in lv.in_flight]
        lv.in_flight.difference_update(res.node_ids)
        if not wanted:
            return []
        feats = self.vocab.final_norm(res.hidden[wanted].to(self.vocab.dtype))
        logits = self.vocab.logits(feats, normed=True)
        for r, i in enumerate(wanted):
            lv.logits[res.node_ids[i]] = logits[r]
            lv.feats[res.node_ids[i]] = feats[r]
        if lv.req.mode != "flow" and lv.in_flight:  # ar / chunk: verify only once the whole tree is back
            return []
        return self._walk(lv)

    def _continuous(self, lv: _Live) -> bool:
        return lv.req.mode == "flow" and lv.drafter is not None and self.flow_slots != 1

    def live_segments(self) -> dict[str, int]:
        """Segments in flight per live request (what /mesh and the status view show)."""
        return {rid: len(lv.segments) for rid, lv in self.live.items()}

    # ---- prefill ----------------------------------------------------------------------------
    def _prefill_result(self, lv: _Live, res: Result) -> list[Action]:
        hidden = res.hidden.to(self.vocab.dtype)  # the wire may carry fp16 while this device computes in bf16
        for i, n in enumerate(res.node_ids):
            lv.feats[n] = hidden[i]
        lv.prefill_left.difference_update(res.node_ids)
        if lv.prefill_left:
            return []
        ids = sorted(lv.feats)
        feats = self.vocab.final_norm(torch.stack([lv.feats[i] for i in ids]))
        lv.feats.clear()
        lv.tail = ids[-1]
        if lv.replaying:
            return self._replayed(lv, feats)
        lv.stats.prefill_seconds = self.clock() - lv.started  # the decode rate starts here (bench's "decode")
        logits = self.vocab.logits(feats[-1:], normed=True)[0]
        full = self._context_feats(lv, feats)
        if full is not None:
            feats = full
            if self.prefix_book is not None:  # the record a later turn may reuse
                lv.ctx_feats = [feats]
        first = sample_token(logits, lv.req.sampling, lv.draws, len(lv.context), self._history(lv))
        lps = [token_logprobs(logits, first, lv.req.logprobs)] if lv.req.logprobs is not None else None
        acts = self._emit(lv, [first], lps)
        if lv.drafter is not None:
            lv.drafter.accept(lv.context, feats)
        if not lv.done:
            lv.then = lambda: self._new_round(lv)
        return acts

    @staticmethod
    def _history(lv: _Live) -> History | None:
        """What the penalties look at before the next token (None when the sampling has none)."""
        return History(lv.req.prompt, tuple(lv.out)) if lv.req.sampling.penalised else None

    # ---- rounds -----------------------------------------------------------------------------
    def _load(self, lv: _Live) -> tuple[int, float]:
        """Rows and expected tokens other live requests put through the ring (FASER's load signal): this
        originator's other requests' rows in flight, or the other requests' rows the last stage reported
        with ``lv``'s latest result, whichever is more (the stage sees other originators' requests too,
        and this one's own others only while they are there); a request seen only at the stage counts
        as yielding one token a forward."""
        others = [o for o in self.live.values() if o is not lv and not o.done]
        rows = max(sum(len(o.in_flight) for o in others), lv.stage_load)
        gain = sum(max(1.0, o.stats.mean_accepted) for o in others) or (1.0 if lv.stage_load else 0.0)
        return rows, gain

    def _draft(self, lv: _Live, cost: CostCurve | None = None, depth: int | None = None) -> tuple[Tree, int]:
        """A candidate pool rooted at the last emitted token (``depth`` levels, by default
        :meth:`_draft_depth`'s), and how many of its nodes the cost model (``cost``, by default the
        ring's summed compute curve) pays for. The ring always drafts: unlike one device
        (``models/engine.py``), whose budget stops drafting while drafts do not pay for their own cost,
        a ring drafts while its stages compute (flow, idle drafting), so the draft's cost is mostly hidden
        and the one-device rule would stop speculation that pays (it did, in tests of chunk and flow)."""
        left = lv.req.max_new_tokens - len(lv.out)
        if lv.drafter is None or lv.req.mode == "ar" or left <= 1:  # the last token: its root's row decides it
            return Tree.root(lv.out[-1]), 0
        t0 = self.timer()
        pool = lv.drafter.draft(
            lv.context,
            top_k=self.top_k,
            depth=max(1, min(self._draft_depth(lv) if depth is None else depth, left)),
            max_nodes=self.pool,
            keep=lv.budget.keep_hint(),
        ).within(lv.req.eos, left)  # no rows for what comes after the answer's end
        overhead = self.timer() - t0
        lv.stats.draft_seconds += overhead
        rows, gain = self._load(lv)
        return pool, lv.budget.choose(pool, overhead=overhead, cost=cost, load_rows=rows, load_gain=gain)

    def _draft_depth(self, lv: _Live) -> int:
        """Levels worth drafting now. Drafting is the originator's work on the ring's critical path, and
        with slots a pool is re-drafted at every new frontier anyway, so a continuous request drafts one
        level deeper than its last first segment reached; one tree per round drafts the full depth."""
        return min(self.depth, lv.first_depth + 1) if self._continuous(lv) else self.depth

    def _new_round(self, lv: _Live) -> list[Action]:
        """Start a tree at a fresh root (the last emitted token, not yet in any cache)."""
        drafted = self._start_tree(lv)
        if self._continuous(lv):
            return self._new_pool(lv, drafted)
        root_pos = len(lv.context) - 1
        lv.logits.clear()
        lv.feats.clear()
        pool, n = self._draft(lv) if drafted else (Tree.root(lv.out[-1]), 0)
        tree = pool.best(n)
        lv.tree, lv.walk, lv.round_accepted = tree, Walk(), 0
        lv.ids = lv.new_ids(len(tree))
        lv.pos.update({lv.ids[i]: root_pos + tree.depth[i] for i in range(len(tree))})
        lv.predicted = sum(math.exp(s) for s in tree.scores[1:])
        order = tree.score_order() if lv.req.mode == "flow" else list(range(len(tree)))
        return self._send(lv, order, root_parent=lv.tail)

    def _start_tree(self, lv: _Live) -> bool:
        """A tree begins: time the one that ended, and say whether this one is drafted.

        ``flow`` is never slower than ``ar``, as one device's ``spec`` is not (``models/engine.py``):
        each tree's wall time, from its fresh root to the end of its walk, goes to the budget with the
        tokens it emitted, and while drafted trees yield fewer tokens a second than plain ones (the
        root alone: an ``ar`` token) the budget backs off to plain trees, then probes again
        (:meth:`TreeBudget.observe_round`). Only measured times can say it: a ring drafts while its
        stages compute, and what that hides depends on the devices, the links and the load (on a
        2-core CPU where a verified row costs a share of a forward, flow's trees lost to ar tokens).
        Drafted trees are judged against measured plain ones: the latest this ring timed for any request,
        or, before any, this request's first tree, which is plain."""
        now = self.clock()
        if lv.tree_started is not None and lv.tree_tokens:
            lv.budget.observe_round(lv.tree_tokens, now - lv.tree_started, drafted=lv.tree_drafted)
            if not lv.tree_drafted:  # a plain tree of any request, an ar one's too
                self.plain_tree_s = lv.budget.plain_seconds
        lv.tree_started, lv.tree_tokens, lv.tree_rows = now, 0, lv.stats.verified_nodes
        if lv.req.mode != "flow" or lv.drafter is None or not self.back_off:
            lv.tree_drafted = lv.drafter is not None
        else:
            lv.tree_drafted = lv.budget.drafting() and lv.budget.plain_seconds is not None
        return lv.tree_drafted

    def _send(self, lv: _Live, nodes: list[int], root_parent: int) -> list[Action]:
        """Send tree nodes (indices, parents first) as segments: one chunk per stage in ``chunk``; in ``flow``
        as many score-sorted segments as the stages can overlap without falling below the curve's flat rows."""
        tree = lv.tree
        if lv.req.mode == "ar":
            k = 1
        elif lv.req.mode == "chunk":
            k = self.n_stages  # FlowSpec's Chunk-PP baseline: always one chunk per stage
        else:
            k = max(1, min(self.n_stages, math.ceil(len(nodes) / self.flat_rows)))
        acts: list[Action] = []
        for part in split_segments(nodes, k):
            parents = []
            for i in part:
                p = tree.parents[i]
                parents.append(lv.ids[p] if p >= 0 else root_parent)
            ids = [lv.ids[i] for i in part]
            seg = Segment(
                lv.ring_id,
                ids,
                parents,
                [lv.pos[n] for n in ids],
                tokens=[tree.tokens[i] for i in part],
                origin=self.origin,
            )
            lv.in_flight.update(ids)
            lv.stats.verified_nodes += len(ids)
            self._track(lv, seg)
            acts.append(SendSegment(seg))
        lv.stats.target_forwards += 1 if lv.req.mode != "flow" else len(acts)
        return acts

    def _walk(self, lv: _Live) -> list[Action]:
        """Decide as far as the logits at hand allow (ar/chunk: the whole tree; flow: what came back so far)."""
        lps: list[TokenLogprobs] = []
        top = lv.req.logprobs
        tokens = advance(
            lv.walk,
            lv.tree,
            lambda i: lv.logits.get(lv.ids[i]),
            lv.req.sampling,
            lv.draws,
            len(lv.context) - len(lv.walk.path),  # the root's position: the context ends at the walk's last node
            self._history(lv),
            (lambda tok, logits: lps.append(token_logprobs(logits, tok, top))) if top is not None else None,
        )
        return self._after_walk(lv, tokens, lps if top is not None else None) if tokens else []

    def _after_walk(self, lv: _Live, tokens: list[int], lps: list[TokenLogprobs] | None) -> list[Action]:
        tree, walk = lv.tree, lv.walk
        path_ids = [lv.ids[i] for i in walk.path]
        lv.stats.rounds += 1
        lv.stats.per_round.append(len(tokens))
        if lv.tree_tokens == 0 and lv.tree_started is not None:
            lv.stats.first_tokens_seconds.append(self.clock() - lv.tree_started)
        lv.tree_tokens += len(tokens)
        lv.stats.accepted_drafts += len(tokens) - (1 if walk.done else 0)
        feats = [lv.feats[n] for n in path_ids if n in lv.feats]
        lv.final_commit = [n for n in path_ids if n in lv.feats]  # accepted, and computed at every stage
        if lv.ctx_feats and feats:
            lv.ctx_feats.append(torch.stack(feats))
        acts = self._emit(lv, tokens, lps)
        if walk.done or lv.done:
            lv.stats.trees += 1
            lv.stats.plain_trees += lv.stats.verified_nodes - lv.tree_rows == 1  # its root's row alone
        if lv.done:  # sessions are closed everywhere; a prune now would only resurrect them
            return acts
        if walk.done and self._continuous(lv) and lv.tree_drafted:
            why = self._why_ended(lv, walk.path[-1], tokens[-1])
            lv.stats.tree_ends[why] = lv.stats.tree_ends.get(why, 0) + 1
        lv.round_accepted += len(walk.path) - 1
        if walk.done:
            lv.budget.observe(lv.predicted, lv.round_accepted)
            keep = path_ids
        else:  # flow: waiting on the accepted child at the end of the path; its subtree survives
            keep = path_ids[:-1] + [lv.ids[i] for i in tree.subtree(walk.path[-1])]
        acts.append(SendPrune(Prune(lv.ring_id, lv.next_id - 1, sorted(keep), path_ids)))
        lv.in_flight.intersection_update(keep)
        self._settle(lv)
        computed = [n for n in path_ids if n in lv.feats]
        if lv.drafter is not None and computed:
            lv.drafter.accept(lv.context, torch.stack(feats))
        if walk.done:
            lv.tail = path_ids[-1]
        for n in path_ids:
            lv.logits.pop(n, None)
            lv.feats.pop(n, None)
        lv.then = (lambda: self._new_round(lv)) if walk.done else (lambda: self._expand(lv))
        return acts

    @staticmethod
    def _why_ended(lv: _Live, node: int, token: int) -> str:
        """Why the walk stopped at ``node`` of the sent tree, drawing ``token`` there (one of
        :data:`TREE_ENDS`): what the pool held below that node."""
        at = next((p for p, t in lv.placed.items() if t == node), None)
        if at is None or not lv.pool.children(at):
            return "undrafted"
        return "unsent" if lv.pool.child_with_token(at, token) is not None else "missed"

    def _expand(self, lv: _Live) -> list[Action]:
        """flow: re-root at the accepted-but-pending node, re-draft from it, send the new nodes."""
        if self._continuous(lv):
            return self._reroot_pool(lv)
        tree, walk = lv.tree, lv.walk
        frontier = walk.path[-1]
        sub, old = tree.reroot(frontier)
        lv.tree, lv.ids, lv.walk = sub, [lv.ids[o] for o in old], Walk()
        alive = set(lv.ids)
        for n in [n for n in lv.logits if n not in alive]:
            lv.logits.pop(n)
        if lv.drafter is None:
            return []
        pool, target = self._draft(lv)
        before = len(sub)
        room = max(0, target + 1 - before)
        if room == 0:
            return []
        merged = Tree.from_parents(sub.tokens, sub.parents, sub.scores)
        where = merged.merge(pool, at=0)
        fresh = [w for w in dict.fromkeys(where) if w >= before]
        fresh.sort(key=lambda i: (-merged.scores[i], i))
        chosen = set(fresh[:room])
        # keep only chosen new nodes whose ancestors are old or chosen (score order makes this closed)
        chosen = {i for i in chosen if all(a < before or a in chosen for a in merged.path(i))}
        keep = list(range(before)) + sorted(chosen)
        new_tree, old_idx = merged.select(keep)
        new_ids = lv.new_ids(len(old_idx) - before)
        lv.ids = lv.ids + new_ids
        lv.tree = new_tree
        for j in range(before, len(new_tree)):
            lv.pos[lv.ids[j]] = lv.pos[lv.ids[new_tree.parents[j]]] + 1
        lv.predicted += sum(math.exp(new_tree.scores[j]) for j in range(before, len(new_tree)))
        order = [j for j in new_tree.score_order() if j >= before]
        return self._send_flow_extension(lv, order)

    def _send_flow_extension(self, lv: _Live, nodes: list[int]) -> list[Action]:
        tree = lv.tree
        ids = [lv.ids[i] for i in nodes]
        seg = Segment(
            lv.ring_id,
            ids,
            [lv.ids[tree.parents[i]] for i in nodes],
            [lv.pos[n] for n in ids],
            tokens=[tree.tokens[i] for i in nodes],
            origin=self.origin,
        )
        lv.in_flight.update(ids)
        lv.stats.verified_nodes += len(ids)
        lv.stats.target_forwards += 1
        self._track(lv, seg)
        return [SendSegment(seg)]

    # ---- continuous flow: slots ----------------------------------------------------------------
    def _new_pool(self, lv: _Live, drafted: bool) -> list[Action]:
        """A round at a fresh root: draft the candidate pool (``drafted``; else the root alone, a plain
        tree); the root and the best candidates go out as the round's first segment at the end of this
        event (:meth:`_fill`)."""
        lv.logits.clear()
        lv.feats.clear()
        if drafted:
            pool, _ = self._draft(lv, cost=self.ring.latency_curve(), depth=self._first_depth(lv))
        else:
            pool, lv.deepen = Tree.root(lv.out[-1]), False
        lv.pool, lv.placed, lv.root_sent, lv.fresh = pool, {0: 0}, False, True
        lv.tree, lv.walk, lv.round_accepted, lv.predicted = Tree.root(pool.tokens[0]), Walk(), 0, 0.0
        lv.ids = lv.new_ids(1)
        lv.pos[lv.ids[0]] = len(lv.context) - 1
        if drafted and lv.deepen and self._resumes(lv):
            while self._deeper_first_pays(lv) and self._grow(lv):
                pass
        return []

    def _reroot_pool(self, lv: _Live) -> list[Action]:
        """The walk accepted a node whose logits are still in flight: re-root the sent tree and the
        pool there (the rest of the pool is pruned); the next segment is this frontier's first. With
        resumable drafting the surviving sub-pool is kept as it is and grown by the drafter from what it
        computed for it (only where it is shallower than the first segment's levels; :meth:`idle` grows
        the rest); otherwise the pool is re-drafted from the new root (the drafter then sees the
        target's features of the accepted path) and the new candidates merged in."""
        frontier = lv.walk.path[-1]
        pool_at = {t: p for p, t in lv.placed.items()}
        sub, old = lv.tree.reroot(frontier)
        psub, pold = lv.pool.reroot(pool_at[frontier])
        tree_new = {o: n for n, o in enumerate(old)}
        lv.placed = {j: tree_new[lv.placed[p]] for j, p in enumerate(pold) if lv.placed.get(p) in tree_new}
        lv.tree, lv.ids, lv.walk, lv.pool = sub, [lv.ids[o] for o in old], Walk(), psub
        alive = set(lv.ids)
        for n in [n for n in lv.logits if n not in alive]:
            lv.logits.pop(n)
        lv.fresh = True
        depth = self._first_depth(lv)
        if self._resumes(lv):  # the surviving sub-pool, grown where it is shallower than a first segment needs
            target = self._draft_depth(lv) if depth is None else depth
            while max(lv.pool.depth) < target and self._grow(lv):
                pass
            while lv.deepen and self._deeper_first_pays(lv) and self._grow(lv):
                pass
            return []
        fresh, _ = self._draft(lv, cost=self.ring.latency_curve(), depth=depth)
        lv.pool.merge(fresh, at=0)
        return []

    def _first_depth(self, lv: _Live) -> int | None:
        """Levels to draft before a first segment: all of them (None: :meth:`_draft_depth`), or with
        drafting when idle only the few the first segment takes; the rest waits for :meth:`idle`."""
        if not self.draft_when_idle:
            return None
        lv.deepen = True
        return min(IDLE_FIRST_DEPTH, self._draft_depth(lv))

    def _deeper_first_pays(self, lv: _Live) -> bool:
        """Whether one more pool level is worth drafting before a round's first segment leaves (drafting
        when idle). Drafted now, the level delays the whole round by one level's drafting time; left to
        :meth:`idle`, it goes out as a filler, which the stages take at least one slowest step
        (:meth:`RingTimer.step`) after the first segment, and that wait only matters where the walk gets
        as deep as the level's parents. So: deepen while the likeliest node of the deepest level (its
        expected acceptance, the budget's calibrated ``alpha`` times its path probability) times a step
        exceeds a level's measured drafting time. A drafter whose levels cost little next to the stages'
        forwards (a good head on slow, memory-bound boards) drafts deep first segments; one whose levels
        cost a share of a forward, or whose deep nodes are unlikely (sampling), sends shallow ones."""
        pool = lv.pool
        deepest = max(pool.depth)
        if deepest >= self._draft_depth(lv):
            return False
        if self._level_seconds is None:
            return False  # not measured yet: idle drafting's first level measures it
        likeliest = max(sc for sc, d in zip(pool.scores, pool.depth, strict=True) if d == deepest)
        expected = lv.budget.alpha * math.exp(likeliest)
        return expected * self.ring.step(max(1, self._rows_hint)) > self._level_seconds

    def hold_stage(self, rows: int, now: float) -> float | None:
        """This device's own stage is about to start a forward of ``rows`` rows that no walk waits on (only
        fillers are queued there): the time (on :attr:`clock`, like ``now``) until which it should wait
        instead, or None to go ahead.

        A stage cannot stop a forward it began. When the originator's device also runs a stage past the
        first, fillers reach that stage right behind each first segment, so a result that comes back while
        one is computing waits for the rest of that forward, and the walk and the next round's first
        segment with it (docs/benchmarks.md, "The originator's place in the ring"). So while one of this originator's
        segments is due back before the forward would end, the forward waits for it, at most
        ``HOLD_SLACK`` of the forward past the expected return: the result is verified at once, and the
        filler goes a little later, which costs only where the walk gets as deep as its rows."""
        if self.ring.local is None or rows < 1:
            return None
        dues = [d for lv in self.live.values() for d in lv.due.values()]
        if not dues:
            return None
        due, forward = min(dues), self.ring.local(rows)
        until = due + HOLD_SLACK * forward
        return until if now < until and due < now + forward else None

    def idle_work(self) -> bool:
        """Whether :meth:`idle` has anything to do."""
        return any(lv.deepen for lv in self.live.values())

    def idle(self) -> list[Action]:
        """Work that waits until the originator's device has nothing else to do: deepen the pools that
        a first segment was sent from (shallow, so it left at once) while that segment is in flight,
        and send the fillers this finds. The pool's root is the frontier the walk waits on, the newest
        context token. With resumable drafting each call grows one pool by one level (the oldest
        request's first), so a result that arrives meanwhile waits for one level at most; otherwise one
        call re-drafts every such pool from its root to the full depth and merges it in."""
        acts: list[Action] = []
        for lv in list(self.live.values()):
            if not lv.deepen or lv.done or lv.pool is None or lv.following:
                continue
            if self._resumes(lv):
                grown = self._grow(lv)
                depth = min(self.depth, IDLE_DEPTH, lv.req.max_new_tokens - len(lv.out))
                lv.deepen = grown and max(lv.pool.depth) < depth
                return acts + self._fill(lv)
            lv.deepen = False
            deeper, _ = self._draft(lv, cost=self.ring.latency_curve(), depth=min(self.depth, IDLE_DEPTH))
            lv.pool.merge(deeper, at=0)
            acts += self._fill(lv)
        return acts

    def _resumes(self, lv: _Live) -> bool:
        """Whether ``lv``'s pool grows by :meth:`_grow` (resumable drafting, with a drafter that can)."""
        return self.resumable_drafting and can_extend(lv.drafter) and lv.req.mode != "ar"

    def _grow(self, lv: _Live) -> bool:
        """Grow ``lv``'s pool by one level below its frontier (:func:`models.tree.frontier`: the best
        nodes of its deepest level, as a draft's next level would); whether any node was added."""
        pool = lv.pool
        if max(pool.depth) + 1 >= lv.req.max_new_tokens - len(lv.out):
            return False  # deeper nodes could never be sent (Tree.past_the_end)
        leaves = frontier(pool, self.top_k, lv.budget.keep_hint())
        if not leaves:
            return False
        t0 = self.timer()
        added = lv.drafter.extend(lv.context, pool, leaves, top_k=self.top_k, max_nodes=self.pool)
        spent = self.timer() - t0
        lv.stats.draft_seconds += spent
        if added:
            last = self._level_seconds
            self._level_seconds = spent if last is None else 0.8 * last + 0.2 * spent
        return bool(added)

    def _slots(self, lv: _Live) -> int:
        """Segments ``lv`` may keep in flight: as configured, or its share of the slots that keep the ring's
        slowest step busy (several requests of this originator split them; one alone gets them all)."""
        if self.flow_slots is not None:
            return self.flow_slots
        sharing = sum(1 for o in self.live.values() if self._continuous(o))
        return max(1, math.ceil(self.ring.slots(max(1, self._rows_hint), self.max_slots) / max(1, sharing)))

    def _fill(self, lv: _Live) -> list[Action]:
        """Send segments until ``lv`` has its slots in flight or no candidate is worth a row."""
        acts: list[Action] = []
        if lv.pool is None:
            return acts
        while len(lv.segments) < self._slots(lv):
            seg = self._next_segment(lv)
            if seg is None:
                break
            acts.append(SendSegment(seg))
        return acts

    def _next_segment(self, lv: _Live) -> Segment | None:
        """The next segment from the pool: the unsent candidates in score order (parents first), as
        many as maximise expected accepted tokens per second of the time they hold.

        A first segment (a new root or a new frontier) holds the walk up until it is back, so its
        rows are paid with the ring's latency L(m); a filler only has to keep the slowest step busy,
        so its rows are paid with step(m), and candidates below ``FILL_FLOOR`` are not worth a row.
        """
        pool = lv.pool
        dead = pool.past_the_end(lv.req.eos, lv.req.max_new_tokens - len(lv.out))  # rows no answer can use
        cands = [i for i in pool.score_order() if i not in lv.placed and not dead[i]]
        gains = [lv.budget.alpha * math.exp(pool.scores[i]) for i in cands]
        root = 0 if lv.root_sent else 1
        # FASER's rule, as TreeBudget.choose applies it to whole trees: rows that other requests put
        # through the same forwards share them, so a segment's rows must pay at that steeper point of
        # the curve against the tokens all those rows yield; and fillers only fill an idle ring (under
        # load the ring is busy with the others' rows, and a filler's rows delay them)
        load_rows, load_gain = self._load(lv)
        n = 0
        if lv.fresh:
            n = _best_prefix(gains, lambda m: self.ring.latency(load_rows + m + root), base=1.0 + load_gain)
        if n == 0 and lv.root_sent and load_rows == 0:
            floor = self._filler_rows(lv, sum(1 for g in gains if g >= FILL_FLOOR))
            n = _best_prefix(gains[:floor], self.ring.step)
        n = min(n, self.max_nodes)
        if n == 0 and lv.root_sent:
            return None
        if lv.fresh and lv.tree_drafted:  # a plain tree's root alone says nothing of how deep drafts go
            lv.first_depth = max((pool.depth[i] for i in cands[:n]), default=0)
        tree = lv.tree
        for i in cands[:n]:
            t = tree.add(lv.placed[pool.parents[i]], pool.tokens[i], pool.scores[i])
            lv.placed[i] = t
            lv.ids += lv.new_ids(1)
            lv.pos[lv.ids[t]] = lv.pos[lv.ids[tree.parents[t]]] + 1
            lv.predicted += math.exp(pool.scores[i])
        rows = ([0] if root else []) + [lv.placed[i] for i in cands[:n]]
        ids = [lv.ids[t] for t in rows]
        seg = Segment(
            lv.ring_id,
            ids,
            [lv.ids[tree.parents[t]] if t > 0 else lv.tail for t in rows],
            [lv.pos[i] for i in ids],
            tokens=[tree.tokens[t] for t in rows],
            origin=self.origin,
            first=lv.fresh,
        )
        lv.root_sent, lv.fresh = True, False
        lv.in_flight.update(ids)
        lv.stats.verified_nodes += len(ids)
        lv.stats.target_forwards += 1
        self._rows_hint = len(ids)
        self._track(lv, seg)
        return seg

    def _filler_rows(self, lv: _Live, most: int) -> int:
        """How many rows (up to ``most``) a filler may have so that the first stage is done with it before
        the walk's next first segment can reach it: no earlier than the earliest expected return of the
        request's segments in flight, since any of them may move the walk, which then sends a first segment.

        A stage cannot stop a forward it began, so a filler still computing when that first segment arrives
        delays it by what is left of the forward, and the whole walk with it. On a flat (GPU) curve several
        fillers fit in a ring latency; on a steep (CPU) curve the first segment's own forward takes most of
        it, and filling the rest by slot count (``ceil(L / tau)``) kept the stages busy with fillers exactly
        when the next first segment came (docs/benchmarks.md, "Flow under load at low rates"). Configured
        slots (``flow_slots``) are kept as configured: this sizes the slots the ring's timing decides."""
        if self.flow_slots is not None or most == 0:
            return most
        if not lv.due:
            return most
        room = min(lv.due.values()) - max(self.clock(), lv.stage_free)
        return sum(1 for m in range(1, most + 1) if self.ring.step(m) <= room * (1 + 1e-9))

    # ---- segment bookkeeping (every flow variant) ------------------------------------------------
    def _track(self, lv: _Live, seg: Segment) -> None:
        k = lv.next_seg
        lv.next_seg += 1
        lv.segments[k] = set(seg.node_ids)
        for n in seg.node_ids:
            lv.seg_of[n] = k
        now, rows = self.clock(), len(seg)
        lv.due[k] = now + self.ring.latency(rows)
        lv.stage_free = max(now, lv.stage_free) + self.ring.step(rows)
        self.ring.sent((lv.req.request_id, k), rows, now, alone=len(lv.segments) == 1)
        self.peak_segments = max(self.peak_segments, len(lv.segments))

    def _returned(self, lv: _Live, node_ids: list[int]) -> None:
        """Rows of tracked segments came back: time each segment's first return, retire finished ones."""
        now = self.clock()
        for n in node_ids:
            k = lv.seg_of.pop(n, None)
            if k is None or k not in lv.segments:
                continue
            self.ring.returned((lv.req.request_id, k), now)
            lv.segments[k].discard(n)
            if not lv.segments[k]:
                del lv.segments[k]
                lv.due.pop(k, None)

    def _settle(self, lv: _Live) -> None:
        """After a prune: a segment with no row left in flight frees its slot at once (its rows vanish
        from the stages' queues; FlowSpec would carry it on as an empty bubble)."""
        for k in list(lv.segments):
            lv.segments[k] &= lv.in_flight
            if not lv.segments[k]:
                del lv.segments[k]
                lv.due.pop(k, None)
                self.ring.dropped((lv.req.request_id, k))
        lv.seg_of = {n: k for n, k in lv.seg_of.items() if n in lv.in_flight}

    def _emit(self, lv: _Live, tokens: list[int], lps: list[TokenLogprobs] | None = None) -> list[Action]:
        room = lv.req.max_new_tokens - len(lv.out)
        new: list[int] = []
        reason = None
        for t in tokens[:room]:
            new.append(t)
            if t in lv.req.eos:
                reason = "stop"
                break
        lv.out.extend(new)
        if reason is None and len(lv.out) >= lv.req.max_new_tokens:
            reason = "length"
        acts: list[Action] = []
        if new:
            pause = None
            if lv.paused_at is not None:  # the first tokens after a resume end the client's pause
                pause = self.clock() - lv.paused_at
                lv.paused_at = None
                lv.stats.paused_seconds += pause
            acts.append(Emit(lv.req.request_id, new, lps[: len(new)] if lps is not None else None, pause))
        if reason is not None:
            lv.done = True
            self.live.pop(lv.req.request_id, None)
            self._by_ring.pop(lv.ring_id, None)
            lv.stats.new_tokens = len(lv.out)
            lv.stats.seconds = self.clock() - lv.started
            acts += [self._close_keeping(lv), Finish(lv.req.request_id, reason, lv.stats)]
        return acts

    def _close_keeping(self, lv: _Live) -> CloseSessions:
        """A finished request's close, asking the stages to keep its context for the next request that
        starts with it (a chat's next turn): every position whose KV they computed, ``context[:-1]``
        (the last token was sampled, never sent), in whole blocks; recorded here with its features."""
        book = self.prefix_book
        if book is None or not lv.req.prefix_cache:
            return CloseSessions(lv.ring_id)
        kept = lv.context[:-1]
        feats = torch.cat(lv.ctx_feats) if lv.ctx_feats else None
        # the last round may have verified nodes past an end token or the length limit: not context
        if feats is not None and feats.shape[0] < len(kept):
            feats = None  # a gap in what came back (not seen on a whole run): keep the hashes only
        hashes = book.record(kept, feats)
        if not hashes:
            return CloseSessions(lv.ring_id)
        return CloseSessions(lv.ring_id, tuple(hashes), tuple(lv.final_commit), book.epoch)


def resumed_ring_id(request_id: str, resumes: int) -> str:
    """The id the stages know ``request_id`` by after its ``resumes``-th resume: a 62-bit number (the wire
    carries request ids as unsigned 64-bit integers), derived so that every originator and test sees the
    same ids for the same request."""
    digest = hashlib.blake2b(f"{request_id}/{resumes}".encode(), digest_size=8).digest()
    return str(int.from_bytes(digest, "big") >> 2)


def _best_prefix(gains: Sequence[float], cost: Callable[[int], float], base: float = 1.0) -> int:
    """How many of ``gains`` (expected accepted tokens per candidate, best first) maximise
    (base + their sum) / cost(count): ``base`` is the token a returning segment always settles (1),
    plus what other requests' rows in the same forwards yield."""
    best_n, total = 0, base
    best = total / cost(0)
    for n, g in enumerate(gains, start=1):
        total += g
        rate = total / cost(n)
        if rate > best:
            best_n, best = n, rate
    return best_n
