"""The daemon's engine room: the scheduler and the stage worker, driven on one event loop.

Everything torch (the originator's LM head and drafting, this device's layer slice) runs in
one executor thread, so links keep streaming while a forward runs; only a short step that finds
that thread idle runs on the loop's own thread, to spare a hop two thread hand-offs
(``Runtime._start_step``). The event loop only moves
messages: from the API to the originator, between this device's worker and its ring
neighbours, and from the last stage back to whichever peer originated a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from meshd import __version__
from meshd.ring.interpreter import Delivery, ToClient, ToEveryStage, ToStage, forward, interpret
from meshd.ring.messages import PREFIX_MISS, Close, Failure, Result, RingMessage, Segment
from meshd.ring.scheduler import Action, CloseSessions, Emit, Originator, Request
from meshd.ring.validate import FrameRejected, Limits, check_result
from meshd.ring.wire import as_received, link_dtype
from meshd.ring.worker import StageWorker
from meshd.serve.engine import GenerateParams, RuntimeUnavailable
from models.budget import CostCurve
from models.drafters import Drafter
from models.engine import Stats
from models.prefixcache import PrefixBook
from models.source import ModelSource
from models.stage import Stage
from models.text import stop_ids
from models.verify import TokenLogprobs
from models.weights import release_freed_memory

log = logging.getLogger(__name__)
RECENT_REQUESTS = 8  # finished requests ``status()`` keeps showing, so a short one is seen on the live page

# A step expected to take at most this long, over at most this many rows, runs on the event loop's own
# thread when the torch thread has nothing to do (Runtime._start_step).
INLINE_SECONDS = 0.02
INLINE_ROWS = 16
INBOX_LIMIT = 4096  # ring messages waiting for the torch thread; a stage this far behind refuses peers' new work
# A request whose send to a stage failed while the plan stayed (a link dropped and came back) is replayed on the
# same ring after this long: longer than the mesh takes to declare a silent peer lost (3 s), so a dead stage
# gets a new plan first instead of a replay that fails again.
RETRY_SAME_RING = 5.0


def _json_family(value: Any) -> Any:
    """A metric for JSON: a labelled family (label sets as tuples of (name, value), as /metrics takes
    them) becomes an object keyed ``name=value,...``; a plain number stays as it is."""
    if not isinstance(value, dict):
        return value
    return {",".join(f"{k}={v}" for k, v in labels): n for labels, n in value.items()}


def _same_path(a: Ring | None, b: Ring | None) -> bool:
    """Whether a stage output computed under ring ``a`` still goes where it should under ring ``b``."""
    return a is not None and b is not None and (a.nodes, a.local_index, a.layout) == (b.nodes, b.local_index, b.layout)


BOOK_SHARE = 4  # the originator's record of kept prefixes may hold a quarter of a stage's prefix bytes


class RequestHandle:
    """What the API holds for one request: an async stream of token chunks, then the outcome."""

    def __init__(self, runtime: Runtime, request_id: str, prompt_tokens: int, mode: str = ""):
        self.runtime, self.request_id, self.prompt_tokens, self.mode = runtime, request_id, prompt_tokens, mode
        self.submitted = time.monotonic()
        self.rounds = 0  # token chunks so far: one per verification round
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats: Stats | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        # time.monotonic() when this request's pause began (its ring was lost: it waits for a plan or replays
        # on one); None while it runs. Set by the compute loop's sweep, cleared by the first tokens after it.
        self.paused_since: float | None = None
        self.first_token_at: float | None = None  # time.monotonic() when its first tokens reached this handle
        self._chunks: asyncio.Queue[list[int] | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        while True:
            chunk = await self._chunks.get()
            if chunk is None:
                return
            yield chunk

    async def cancel(self) -> None:
        if self.finish_reason is None:
            await self.runtime._cancel(self.request_id)

    def progress(self, now: float) -> dict[str, Any]:
        """How far the request is, for the live page (``GET /mesh``'s ``requests``)."""
        n, seconds = len(self.token_ids), max(1e-9, now - self.submitted)
        return {
            "request_id": self.request_id,
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": n,
            "rounds": self.rounds,
            "accepted_per_round": round(n / self.rounds, 3) if self.rounds else 0.0,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(n / seconds, 2),
            "finish_reason": self.finish_reason,
            **({"finished_at": round(time.time(), 3)} if self.finish_reason else {}),
        }

    def _push(self, tokens: list[int], logprobs: list[TokenLogprobs] | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.rounds += 1
        self.token_ids.extend(tokens)
        self.logprobs.extend(logprobs or ())
        self._chunks.put_nowait(tokens)

    def _finish(self, reason: str, stats: Stats | None, error: str | None) -> None:
        self.finish_reason, self.stats, self.error = reason, stats, error
        self._chunks.put_nowait(None)


@dataclass
class Ring:
    """Where stages live for the current plan. ``None`` in ``nodes`` means this device."""

    epoch: int
    nodes: list[str | None]
    curves: list[CostCurve]
    local_index: int | None  # which stage this device is, if any
    # (node id, first layer, stop layer) per stage: a new epoch with the same layout keeps its requests
    layout: tuple[tuple[str, int, int], ...] = ()


class Runtime:
    """Originator + stage worker for one device, with or without a mesh around it.

    ``transport`` sends a ring message to a peer: ``await transport(node_id, message)``; it raises
    ``ConnectionError`` when the peer cannot be reached. Tests run it without a mesh, on a ring of
    this device alone (``support.solo_runtime``).
    """

    def __init__(
        self,
        source: ModelSource,
        vocab: Stage,
        drafter_factory: Callable[[], Drafter] | None,
        *,
        tokenizer: Any = None,
        node_id: str = "local",
        max_context: int = 4096,
        wire_dtype: torch.dtype | None = None,
        session_timeout: float = 300.0,
        flow_slots: int | None = None,
        flow_backoff: bool = True,
        contexts: int | None = None,
        sessions_per_peer: int | None = None,
        stall_timeout: float | None = None,
        wire_activations: str = "fp16",
        link_seconds_per_byte: float | None = None,
        prefix_cache_bytes: int = 0,
        resume_timeout: float = 0.0,
    ):
        self.source, self.vocab, self.tokenizer = source, vocab, tokenizer
        self.flow_slots = flow_slots  # the originator's segments in flight per flow request (None: from the ring)
        self.flow_backoff = flow_backoff  # flow sends plain trees while drafted ones are slower (Originator)
        # a stage frees a request's KV session after this long without traffic: its originator vanished
        # (killed, partitioned) and will never send the close; swept from the compute loop
        self.session_timeout = session_timeout
        # this stage's KV for ``contexts`` full contexts and ``sessions_per_peer`` open requests per peer
        # (None: unlimited); a request with no answer from the ring for ``stall_timeout`` s fails
        self.limits = Limits(
            kv_tokens=contexts * max_context if contexts is not None else None, sessions_per_peer=sessions_per_peer
        )
        self.stall_timeout = stall_timeout
        # kept prefixes: at most this many bytes at this device's stage (inside its KV reservation, which
        # the gate's kv_tokens enforces), and a BOOK_SHARE-th of it for this originator's record of them
        # (the drafter's features of those positions: a hidden-size row per token, far less than a stage's
        # KV per token); 0: off
        self.prefix_cache_bytes = prefix_cache_bytes
        # a request whose ring is lost waits this long for a new one and resumes on it (0: it fails at once);
        # ``plan_problem`` says why there is no plan (the planner's error), for the error after the wait
        self.resume_timeout = resume_timeout
        self.plan_problem: Callable[[], str | None] | None = None
        self.on_resumed: Callable[[float], None] | None = None  # each resumed request's pause, in seconds
        self._origin_of: dict[str, str] = {}  # ring id -> the peer originating it, for sessions at our stage
        self.refusals: dict[str, int] = {}  # refused ring messages by code, for the log and /metrics
        self._heard: dict[str, float] = {}  # request id -> when the ring last answered it (or it was submitted)
        self._swept = time.monotonic()
        self.node_id, self.max_context = node_id, max_context
        self.model_name = source.name
        self.drafter_factory = drafter_factory
        self.wire_dtype = wire_dtype or (torch.float32 if vocab.dtype == torch.float32 else torch.float16)
        # hidden-state precision per link (meshd.ring.wire.link_dtype); the links' bandwidth when known
        self.wire_activations, self.link_seconds_per_byte = wire_activations, link_seconds_per_byte
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.worker: StageWorker | None = None
        self.ring: Ring | None = None
        self.originator: Originator | None = None
        self.transport: Callable[[str, RingMessage], Awaitable[None]] | None = None
        self.handles: dict[str, RequestHandle] = {}
        self.finished: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)  # last requests' final progress
        self._ring_of: dict[str, int] = {}  # request id -> ring epoch it started under
        self._inbox: deque[tuple[RingMessage, str | None]] = deque()  # with the peer each came from
        self._wake = asyncio.Event()
        self._waiting = False  # the compute loop waits for work: a delivery starts the step itself
        self._started: tuple[asyncio.Future, Ring | None, StageWorker | None] | None = None  # that step
        self._torch_jobs = 0  # submitted to the torch thread and not yet seen finished by the loop
        self._step_seconds: float | None = None  # how long recent steps took (moving average; None: no step yet)
        self.inline_steps = 0  # steps run on the loop's thread (see _start_step)
        # set by a step that left only fillers queued for our stage because a result of ours is due first
        # (Originator.hold_stage): how long the compute loop waits for it before the forward goes ahead
        self._hold_seconds: float | None = None
        self.held_steps = 0  # such waits, since start
        # the originator's deliveries a threaded step handed to the loop before its drafting or forward (_send_ahead),
        # awaited before the forward's outputs are sent; and how many hand-overs, since start
        self._ahead: Future | None = None
        self.sent_ahead = 0
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._background: set[asyncio.Future] = set()
        self.counters = {
            "requests_total": 0,
            "requests_failed_total": 0,
            "tokens_total": 0,
            "rounds_total": 0,
            "accepted_total": 0,
            "rows_computed_total": 0,  # tree rows sent around the ring (finished requests)
            "rows_accepted_total": 0,  # of those, drafted rows the target accepted
            "prefix_hit_tokens_total": 0,  # positions the stages did not compute (kept prefixes), resumes' replays too
            "prefix_hit_requests_total": 0,
            "prefix_misses_total": 0,
            "requests_resumed_total": 0,  # resumes of requests this device originated (a request may resume twice)
            "resume_pause_seconds_total": 0.0,  # what their clients waited across those pauses
        }
        self.started = time.time()
        self.unavailable_reason = "no committed plan yet: waiting for peers"
        self.mesh_status: Callable[[], dict] | None = None  # the daemon's view of plan and peers

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_task = asyncio.create_task(self._compute_loop(), name="meshd-compute")

    async def stop(self) -> None:
        for rid in list(self.handles):
            self._fail(rid, "the daemon is shutting down")
        if self._loop_task:
            self._stopping = True  # Python 3.11's wait_for can swallow a cancel: the loop checks this too
            self._wake.set()
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def ping_torch(self) -> None:
        """Returns once the torch thread has run a no-op: it is not stuck (the daemon's watchdog asks)."""
        await self._torch(lambda: None)

    async def _torch(self, fn: Callable, *args: Any) -> Any:
        return await self._submit(fn, *args)

    def _submit(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Queue ``fn`` on the torch thread; counted until it has run or was dropped unrun (see _start_step),
        on the executor's own future: an awaiter that gives up on the job does not end it."""
        loop = asyncio.get_running_loop()
        job = self.executor.submit(fn, *args)
        self._torch_jobs += 1
        fut = asyncio.wrap_future(job, loop=loop)
        job.add_done_callback(lambda _: self._call_in_loop(loop, self._torch_job_done))
        return fut

    def _torch_job_done(self) -> None:
        self._torch_jobs -= 1

    @staticmethod
    def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first (the daemon stopped)
            loop.call_soon_threadsafe(fn)

    # ---- topology ---------------------------------------------------------------------------
    def install_worker(self, stage: Stage | None) -> None:
        """This device's slice for the coming plan (None: a pure originator)."""
        embed = self.vocab.embed if stage is not None and stage.layer_range.first == 0 else None
        self.worker = (
            StageWorker(
                stage,
                embed=embed,
                idle_timeout=self.session_timeout,
                limits=self.limits,
                prefix_bytes=self.prefix_cache_bytes,
                epoch=self.ring.epoch if self.ring is not None else 0,
            )
            if stage
            else None
        )
        # The replaced worker and its slice sit in reference cycles (worker <-> gate and cache callbacks),
        # which only the cyclic collector frees: without a collection here each re-plan left a whole slice
        # behind until a full collection happened to run (resident memory grew ~200 MiB per re-plan in
        # the soak). A plan commit is rare, so a full collection and a heap trim here cost nothing that matters.
        gc.collect()
        release_freed_memory()
        self._follow_ring()

    def _follow_ring(self) -> None:
        """Tell this device's stage which node the plan puts before it: only that one relays segments here."""
        ring = self.ring
        if self.worker is not None and ring is not None and ring.local_index is not None:
            self.worker.gate.follow(ring.nodes[ring.local_index - 1] if ring.local_index > 0 else None)

    def set_ring(self, ring: Ring) -> None:
        """A committed plan. Requests started under an older one cannot go on there: with resume they
        pause and replay their history on the new ring (also after :meth:`clear_ring`, and for a plan that
        only grew the mesh back); without, they fail now. Either way a plan that keeps every stage where it
        was (the mesh only gained or lost a pure originator) keeps its requests as they are."""
        old = self.ring
        self.ring = ring
        self._follow_ring()
        if self.worker is not None:
            self.worker.set_epoch(ring.epoch)
        if self.resume_timeout > 0 and self.originator is not None:
            moved = old is not None and old.epoch != ring.epoch and not (ring.layout and ring.layout == old.layout)
            self._resume_on(ring, pause_first=moved)
            return
        if old is not None and old.epoch != ring.epoch:
            same_layout = bool(ring.layout) and ring.layout == old.layout
            for rid, epoch in list(self._ring_of.items()):
                if same_layout:
                    self._ring_of[rid] = ring.epoch
                elif epoch != ring.epoch:
                    self._fail(
                        rid,
                        f"the mesh re-planned (epoch {old.epoch} -> {ring.epoch}) while this request "
                        "was in flight; retry it",
                    )
        if self.originator is None:
            self.originator = Originator(
                self.vocab,
                self.drafter_factory,
                ring.curves,
                origin=self.node_id,
                local_stage=ring.local_index,  # its stage's forwards and its own work share the torch thread
                flow_slots=self.flow_slots,
                back_off=self.flow_backoff,
                draft_when_idle=True,  # _compute_once calls idle() whenever the torch thread has nothing queued
                prefix_book=PrefixBook(self.prefix_cache_bytes // BOOK_SHARE) if self.prefix_cache_bytes else None,
            )
        else:
            self.originator.set_ring(ring.curves, ring.local_index)
        self.originator.set_epoch(ring.epoch)  # prefixes are named under the plan that holds them

    def clear_ring(self, reason: str) -> None:
        """A stage is gone: every request in flight pauses until the next plan (resume), or fails with
        ``reason`` (the originator's ``ring_lost``) when resume is off."""
        self.ring = None
        self.unavailable_reason = reason
        if self.resume_timeout > 0 and self.originator is not None:
            if self.handles:
                log.info(
                    "ring lost (%s): %d request(s) pause and wait up to %.0f s for a new plan",
                    reason,
                    len(self.handles),
                    self.resume_timeout,
                )
            self._in_torch_now(self.originator.on_ring_lost)
            return
        if self.originator is not None:
            self._apply_now(self.originator.ring_lost(reason))
        for rid in list(self.handles):  # submitted, but not yet live at the originator
            self._fail(rid, reason)

    def ready(self) -> tuple[bool, str]:
        if self.ring is None:
            problem = self.plan_problem() if self.plan_problem else None
            if problem:  # why there is no plan (what the mesh lacks, what to do), not only that there is none
                return False, f"{self.unavailable_reason}. The last plan attempt failed: {problem}"
            return False, self.unavailable_reason
        return True, ""

    # ---- resume -----------------------------------------------------------------------------
    def _in_torch_now(self, fn: Callable, *args: Any) -> asyncio.Future:
        """Queue ``fn`` on the torch thread at once, ahead of anything queued later (the executor is one
        FIFO thread): a pause queued when the ring goes runs before any result that arrives after it."""
        fut = self._submit(fn, *args)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure is logged where awaited
        return fut

    def _resume_on(self, ring: Ring, pause_first: bool) -> None:
        """Pause every live request (``pause_first``: the plan moved layers under them), then replay every
        paused one on ``ring``; queued now, so nothing computed for the old ring slips in between."""
        now = time.monotonic()
        for rid in self.handles:
            self._heard[rid] = now

        def work() -> list[Action]:
            self.originator.set_epoch(ring.epoch)  # prefixes are named under the plan that holds them
            if pause_first:
                self.originator.on_ring_lost()
            return self.originator.on_ring(ring.curves, ring.local_index)

        self._spawn(self._dispatch_later(self._in_torch_now(work), ring, f"plan epoch {ring.epoch}"))

    async def _dispatch_later(self, fut: asyncio.Future, ring: Ring, what: str) -> None:
        try:
            actions = await fut
        except Exception:
            log.exception("resuming requests on %s failed", what)
            return
        n = sum(isinstance(a, CloseSessions) for a in actions)
        if n:
            log.info("resuming %d request(s) on %s: replaying their history", n, what)
        await self._dispatch(actions, ring)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _path_broken(self, ring_id: str, why: str) -> None:
        """A message of request ``ring_id`` could not reach its stage: with resume it pauses (the next plan,
        or the same ring after ``RETRY_SAME_RING`` s, replays it); without, it fails."""
        if self.resume_timeout > 0 and self.originator is not None:
            log.info("request %s paused: %s", self._request_of(ring_id) or ring_id, why)
            self._in_torch_now(self.originator.pause, ring_id)
        else:
            self._fail_ring(ring_id, why)

    def _request_of(self, ring_id: str) -> str | None:
        """The request (of ours) the stages know as ``ring_id``; None for another originator's or a stale id."""
        if self.originator is not None and (rid := self.originator.request_of(ring_id)) is not None:
            return rid
        return ring_id if ring_id in self.handles else None

    def _fail_ring(self, ring_id: str, why: str) -> None:
        """Fail the request the stages know as ``ring_id``. With resume, decided in the torch thread's
        order: a resume queued before (a plan just committed) has given the request a new ring id by then,
        so a refusal of what the old ring still held no longer matches it and is dropped."""
        if self.resume_timeout > 0 and self.originator is not None:

            def decided(fut: asyncio.Future) -> None:
                if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
                    self._fail(fut.result(), why)

            self._in_torch_now(self.originator.request_of, ring_id).add_done_callback(decided)
            return
        rid = self._request_of(ring_id)
        if rid is not None:
            self._fail(rid, why)

    def _sweep_paused(self) -> tuple[list[Action], dict[str, float]]:
        """Torch thread: give up on requests that waited for a ring past ``resume_timeout``; replay those that
        waited ``RETRY_SAME_RING`` s on a ring still in place. Returns the actions and who is still paused
        (request id -> seconds so far)."""
        o = self.originator
        acts: list[Action] = []
        if self.ring is not None:
            acts += o.resume_waiting(older_than=RETRY_SAME_RING)
        why = (self.plan_problem() if self.plan_problem else None) or self.unavailable_reason
        acts += o.give_up(self.resume_timeout, why)
        return acts, o.paused()

    def originator_lost(self, node: str) -> None:
        """Our link to peer ``node`` closed, or the mesh lost it: the sessions its requests hold at our stage
        are freed now, not after the idle timeout (the originator's death is the one loss nothing resumes;
        a live originator whose link only blipped resumes those requests under fresh ring ids anyway)."""
        gone = [r for r, o in self._origin_of.items() if o == node]
        for r in gone:
            del self._origin_of[r]
            self._inbox.append((Close(r), None))
        if gone:
            log.info("freeing %d session(s) of requests originated by peer %s (its link closed)", len(gone), node)
            self._wake.set()

    # ---- requests ---------------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], params: GenerateParams) -> RequestHandle:
        ok, why = self.ready()
        if not ok:
            raise RuntimeUnavailable(why)
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context limit of {self.max_context}"
            )
        rid = str(random.getrandbits(62))
        handle = RequestHandle(self, rid, len(prompt_ids), params.mode)
        self.handles[rid] = handle
        self._ring_of[rid] = self.ring.epoch
        self._heard[rid] = time.monotonic()
        self.counters["requests_total"] += 1
        req = Request(
            rid,
            list(prompt_ids),
            params.max_tokens,
            params.mode,
            params.sampling,
            params.seed,
            frozenset(self._stop_ids()),
            params.logprobs,
            params.prefix_cache,
        )
        try:
            actions = await self._torch(self.originator.submit, req)
        except ValueError:
            self.handles.pop(rid, None)
            self._ring_of.pop(rid, None)
            self._heard.pop(rid, None)
            raise
        await self._dispatch(actions)
        return handle

    async def _cancel(self, rid: str) -> None:
        if self.originator is None or rid not in self.handles:
            return
        await self._dispatch(await self._torch(self.originator.cancel, rid))

    def _fail(self, rid: str, why: str) -> None:
        """Fail one request with the error ``why``: it enters the originator as a cancel with reason
        "error", so the originator's state and stats stay consistent with what the client hears."""
        if rid not in self.handles:
            return
        actions = self.originator.cancel(rid, "error", why) if self.originator is not None else []
        if not actions:  # submitted but not (yet) live at the originator: the client still gets its answer
            self._finish_handle(rid, "error", None, why)
            actions = [CloseSessions(rid)]
        self._apply_now(actions)

    def _apply_now(self, actions: list[Action]) -> None:
        """For callers that cannot wait (failures): the client hears now, the stages in the background."""
        later: list[Delivery] = []
        for d in interpret(actions):
            if isinstance(d, ToClient):
                self._to_client(d)
            else:
                later.append(d)
        if later:
            task = asyncio.ensure_future(self._deliver_quietly(later))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _deliver_quietly(self, deliveries: list[Delivery]) -> None:
        ring = self.ring
        with contextlib.suppress(Exception):  # best effort: stages free idle sessions by themselves
            for d in deliveries:
                await self._deliver(d, ring)

    # ---- moving messages --------------------------------------------------------------------
    async def _dispatch(self, actions: list[Action], ring: Ring | None = None) -> None:
        """Carry out ``actions`` on ``ring`` (default: the current one, kept for the whole batch even if a new
        plan is committed while sending)."""
        ring = ring or self.ring
        for d in interpret(actions):
            await self._deliver(d, ring)

    async def _deliver(self, d: Delivery, ring: Ring | None, others_only: bool = False) -> None:
        """Send ``d`` on ``ring`` (``others_only``: a message for every stage skips this device's, which
        the torch thread queued already, :meth:`_queue_own`)."""
        if isinstance(d, ToClient):
            self._to_client(d)
            return
        if ring is None:  # no plan: nowhere to send; the request has already failed, or pauses (resume)
            if isinstance(d, ToStage) and self.resume_timeout > 0:
                self._path_broken(d.message.request_id, "no committed plan to send it on")
            return
        if isinstance(d, ToStage):
            await self._to_node(ring.nodes[d.index], d.message)
        elif isinstance(d, ToEveryStage):
            for node in ring.nodes:
                if node is not None or not others_only:
                    await self._to_node(node, d.message)
        elif d.origin is None or d.origin == self.node_id:
            self.deliver(d.message)
        else:
            await self._to_node(d.origin, d.message)

    def _to_client(self, d: ToClient) -> None:
        a = d.event
        if isinstance(a, Emit):
            h = self.handles.get(a.request_id)
            if h:
                if a.resumed_after is not None:
                    h.paused_since = None
                h._push(a.tokens, a.logprobs)
                self.counters["tokens_total"] += len(a.tokens)
                if a.resumed_after is not None:
                    self.counters["requests_resumed_total"] += 1
                    self.counters["resume_pause_seconds_total"] += a.resumed_after
                    log.info(
                        "request %s resumed after a pause of %.2f s (%d tokens before it)",
                        a.request_id,
                        a.resumed_after,
                        len(h.token_ids) - len(a.tokens),
                    )
                    if self.on_resumed is not None:
                        self.on_resumed(a.resumed_after)
        elif a.request_id in self.handles:
            self.counters["rounds_total"] += a.stats.rounds
            self.counters["accepted_total"] += sum(a.stats.per_round)
            self.counters["rows_computed_total"] += a.stats.verified_nodes
            self.counters["rows_accepted_total"] += a.stats.accepted_drafts
            self.counters["prefix_hit_tokens_total"] += a.stats.prefix_hit
            self.counters["prefix_hit_requests_total"] += a.stats.prefix_hit > 0
            self.counters["prefix_misses_total"] += a.stats.prefix_misses
            if a.stats.prefix_hit or a.stats.prefix_misses:
                log.info(
                    "request %s: prefix_hit %d positions reused from kept prefixes (prompt %d tokens, "
                    "%d resume(s) replayed), %d miss(es)",
                    a.request_id,
                    a.stats.prefix_hit,
                    self.handles[a.request_id].prompt_tokens,
                    a.stats.resumed,
                    a.stats.prefix_misses,
                )
            self._finish_handle(a.request_id, a.reason, a.stats, a.error)

    def _finish_handle(self, rid: str, reason: str, stats: Stats | None, error: str | None) -> None:
        h = self.handles.pop(rid)
        self._ring_of.pop(rid, None)
        self._heard.pop(rid, None)
        if reason == "error":
            self.counters["requests_failed_total"] += 1
        h._finish(reason, stats, error)
        self.finished.appendleft(h.progress(time.monotonic()))

    async def _to_node(self, node: str | None, msg: RingMessage) -> None:
        if node is None:
            self.deliver(msg, self.node_id)
            return
        if self.transport is None:
            raise RuntimeUnavailable("no transport to reach peer " + node)
        try:
            await self.transport(node, msg)
        except ConnectionError as exc:
            self._path_broken(msg.request_id, f"lost the link to peer {node}: {exc}")

    def deliver(self, msg: RingMessage, sender: str | None = None) -> None:
        """A ring message for this device's worker (or a result or failure for our originator), from the
        peer ``sender`` (our own node id: from us; None: a trusted in-process caller)."""
        if isinstance(msg, Failure):
            if msg.code == PREFIX_MISS:
                self._prefix_miss(msg.request_id, sender)
            else:
                self._on_failure(msg, sender)
            return
        if isinstance(msg, Result) and sender is not None:
            ring = self.ring
            try:  # only the plan's last stage may hand us a request's output
                check_result(msg.request_id, sender, (ring.nodes[-1] or self.node_id) if ring else None)
            except FrameRejected as exc:
                self._refused(exc)
                return
        if isinstance(msg, Segment) and sender not in (None, self.node_id):
            self._origin_of[msg.request_id] = msg.origin or sender
        elif isinstance(msg, Close):
            self._origin_of.pop(msg.request_id, None)
        if len(self._inbox) >= INBOX_LIMIT and sender not in (None, self.node_id):
            # the torch thread is this far behind: new work from peers is refused, not queued without bound
            if isinstance(msg, Segment):
                reason = f"stage overloaded: {INBOX_LIMIT} messages already wait here; retry later"
                self._refused(FrameRejected(msg.request_id, "overloaded", reason, spoils=False, tell=msg.origin))
            return
        self._inbox.append((msg, sender))
        self._wake.set()
        self._start_step(msg)

    def _start_step(self, msg: RingMessage) -> None:
        """While the compute loop waits for work, a delivery starts the step itself, and the loop picks up
        the step's outcome when it wakes: the loop's own wake-up (0.05-0.3 ms on a busy host) is then off
        the path of every hop of every token.

        A short step (``msg`` of at most INLINE_ROWS rows while recent steps took at most INLINE_SECONDS)
        runs right here, on the loop's thread, when the torch thread has nothing queued (so it cannot
        overtake anything queued there): a hop then costs what a blocking server's does, one wake-up,
        instead of two more thread hand-offs there and back (0.3-0.4 ms a hop on this project's 2-core
        VMs). The loop's other work waits that long, as a queued message waits for a forward anyway.
        Longer steps (a prompt, a big tree, a slow device: the first step is always timed there) go to
        the torch thread."""
        if not self._waiting or self._started is not None or self._stopping:
            return
        if isinstance(msg, (Segment, Result)):  # a prune or close waits for the segment that usually comes with it
            self._started = self._begin_step(len(msg.node_ids))

    def _begin_step(self, rows: int) -> tuple[asyncio.Future, Ring | None, StageWorker | None]:
        """Start a step over about ``rows`` rows: on this thread when short and the torch thread is idle (see
        :meth:`_start_step`), else on the torch thread. Returns its outcome and the ring and worker it ran for."""
        ring, worker = self.ring, self.worker
        recent = self._step_seconds
        if self._torch_jobs or rows > INLINE_ROWS or recent is None or recent > INLINE_SECONDS:
            return self._submit(self._step, ring, True), ring, worker
        step = self._loop.create_future()
        try:
            step.set_result(self._step(ring))
        except Exception as exc:  # the compute loop reports it, as for a step on the torch thread
            step.set_exception(exc)
        self.inline_steps += 1
        return step, ring, worker

    def _on_failure(self, msg: Failure, sender: str | None) -> None:
        """A stage (or the mesh) says one of our requests cannot go on: fail it with that reason. Only a
        peer of the ring may fail a request (any stage could stall it anyway); others are ignored."""
        ring, rid = self.ring, self._request_of(msg.request_id)
        if rid is None or ring is None or (sender is not None and sender not in ring.nodes):
            log.debug("ignoring %s failure of request %s from %s", msg.code, msg.request_id, sender)
            return
        if msg.code == "stale_epoch" and self.resume_timeout > 0:  # the stage is on a newer plan than we are
            self._path_broken(msg.request_id, f"peer {sender} moved on to a newer plan")
            return
        self._fail_ring(msg.request_id, f"peer {sender} failed the request ({msg.code}): {msg.reason}")

    def _prefix_miss(self, rid: str, sender: str | None) -> None:
        """A stage no longer holds the prefix a request of ours started after: the originator sends
        the prompt again (only a stage of the ring may ask; the request goes on either way)."""
        ring = self.ring
        if self.originator is None or ring is None or (sender is not None and sender not in ring.nodes):
            return
        task = asyncio.ensure_future(self._resend_prompt(rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resend_prompt(self, rid: str) -> None:
        await self._dispatch(await self._torch(self.originator.prefix_miss, rid))

    def _refused(self, exc: FrameRejected) -> None:
        """This device's stage refused a message (or failed its forward): whoever must know hears why."""
        n = self.refusals[exc.code] = self.refusals.get(exc.code, 0) + 1
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood of refusals must not flood the log too
            log.warning("stage refused a message (%s, %d so far) for %s", exc.code, n, exc)
        if exc.code == PREFIX_MISS and (exc.tell is None or exc.tell == self.node_id):
            self._prefix_miss(exc.request_id, None)
        elif exc.tell is None or exc.tell == self.node_id:
            self._fail_ring(exc.request_id, f"{exc.reason} ({exc.code} at this device's stage)")
        elif self.transport is not None:
            failure = Failure(exc.request_id, exc.code, exc.reason)
            task = asyncio.ensure_future(self._tell(exc.tell, failure))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _tell(self, node: str, failure: Failure) -> None:
        try:
            await self.transport(node, failure)
        except Exception as exc:  # best effort: its own deadline fails the request if this never arrives
            log.info("could not tell %s that request %s failed: %s", node, failure.request_id, exc)

    def _drain_inbox(self) -> list[Result]:
        """Runs in the torch thread: apply queued messages in arrival order; return results for us."""
        results = []
        while self._inbox:
            msg, sender = self._inbox.popleft()
            if isinstance(msg, Result):
                results.append(msg)
            elif self.worker is not None:
                try:
                    self.worker.handle(msg, sender)
                except FrameRejected as exc:  # that request alone fails; the rest of the inbox goes on
                    self._loop.call_soon_threadsafe(self._refused, exc)
        return results

    async def _compute_loop(self) -> None:
        sweep = max(0.05, min(30.0, self.session_timeout / 4, (self.stall_timeout or 120.0) / 4))
        if self.resume_timeout > 0:
            sweep = min(sweep, 1.0)  # paused requests' deadlines
        while not self._stopping:
            if self._started is None:
                self._waiting = True
                try:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), sweep)
                finally:
                    self._waiting = False
            self._wake.clear()
            try:
                if self._started is not None:  # what a delivery started goes on before the housekeeping
                    await self._compute_once()
                if self.resume_timeout > 0 and self.originator is not None and self.handles:
                    actions, paused = await self._torch(self._sweep_paused)
                    now = time.monotonic()
                    for rid in paused:  # a pause is not a stall: its own deadline is resume_timeout
                        if rid in self._heard:
                            self._heard[rid] = now
                    for rid, h in self.handles.items():  # the API tells a waiting client why no token comes
                        if rid not in paused:
                            h.paused_since = None
                        elif h.paused_since is None:
                            h.paused_since = now - paused[rid]
                    await self._dispatch(actions)
                self._fail_stalled()
                await self._compute_once()
                if self.worker is not None and time.monotonic() - self._swept >= sweep:
                    self._swept = time.monotonic()
                    gone = await self._torch(self.worker.expire)
                    if gone:
                        log.info(
                            "freed %d session(s) idle for over %.0f s: %s",
                            len(gone),
                            self.session_timeout,
                            ", ".join(gone),
                        )
            except Exception:  # a bad request must not kill the loop that serves every other one
                log.exception("compute step failed")

    def _fail_stalled(self) -> None:
        """The originator's deadline: a request the ring has not answered for ``stall_timeout`` s fails, so a
        hung stage or a lost message gives its client an error within ``stall_timeout`` plus one sweep."""
        if self.stall_timeout is None:
            return
        now = time.monotonic()
        for rid, heard in list(self._heard.items()):
            if now - heard > self.stall_timeout:
                self._fail(
                    rid,
                    f"no answer from the ring for {self.stall_timeout:.0f} s (a stage is hung or dropped the "
                    "request); retry it",
                )

    async def _compute_once(self) -> None:
        while True:
            if self._started is not None:  # a delivery started this step while the loop waited (_start_step)
                (step, ring, worker), self._started = self._started, None
            else:
                rows = sum(len(m.node_ids) for m, _ in self._inbox if isinstance(m, (Segment, Result)))
                step, ring, worker = self._begin_step(rows + (self.worker.queued_rows if self.worker else 0))
            verified, outputs = await step
            if self._ahead is not None:  # what the step handed over before its forward leaves first
                ahead, self._ahead = self._ahead, None
                await asyncio.wrap_future(ahead)
            for res, others, failure in verified:
                rid = self._request_of(res.request_id)
                if rid in self._heard:
                    self._heard[rid] = time.monotonic()
                if failure is not None:  # one broken request fails alone, with its reason, instead of hanging
                    self._fail_ring(res.request_id, f"internal error at the originator: {failure}")
                    continue
                # peers' prunes before this step's outputs: every stage sees a prune before rows computed after it
                for d in others:
                    await self._deliver(d, ring, others_only=True)
            if outputs and (self.worker is not worker or not _same_path(ring, self.ring)):
                outputs = []  # computed for a plan replaced meanwhile: its requests replay on the new one
            for seg in outputs:
                await self._route_output(seg)
            if self._hold_seconds is not None:  # the step held our stage's fillers for a result of ours
                wait, self._hold_seconds = self._hold_seconds, None
                self._wake.clear()  # both on this thread: a delivery from here on sets it again
                if not self._inbox:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                continue
            # nothing more for the torch thread (the worker's queue only changes in a step, which is over):
            # no trip there to find that out, so the loop is waiting again when the next message comes
            if not self._inbox and (self.worker is None or not self.worker.queue):
                if self.originator is None or not self.originator.idle_work():
                    return
                # nothing queued: deepen the pools that first segments left from (slots' fillers come from them)
                await self._dispatch(await self._torch(self.originator.idle))

    def _step(
        self, ring: Ring | None, threaded: bool = False
    ) -> tuple[list[tuple[Result, list[Delivery], str | None]], list[Segment]]:
        """Torch thread (``threaded``) or the loop's, for a short one (:meth:`_start_step`): one step of this
        device's work, carried as far as it goes without the event loop.

        Results for this originator are verified first (LM head, walk), then followed up (drafting the rounds
        the walks moved to; the tokens and prunes leave before that on the torch thread); what that sends to
        this device's own stage is queued for it here, and the stage then runs on everything queued, so the next
        segment starts at once instead of after two trips through the loop (which, while it writes to sockets,
        holds the GIL). Only fillers queued while a result of ours is due before their forward would end: the
        forward waits for it instead (``_hold_seconds``, :meth:`Originator.hold_stage`). Returns each result
        with the deliveries left for peers and the client (or why the originator failed on it) and the stage's
        outputs; the loop sends those deliveries, then the outputs. On the torch thread, deliveries that would
        otherwise wait for this device's forward go to the loop before it (:meth:`_send_ahead`)."""
        t0 = time.perf_counter()
        verified, outputs = self._step_on(ring, threaded)
        if verified or outputs:  # steps that found nothing to do say nothing about how long work takes
            took, recent = time.perf_counter() - t0, self._step_seconds
            self._step_seconds = took if recent is None else 0.8 * recent + 0.2 * took
        return verified, outputs

    def _step_on(
        self, ring: Ring | None, threaded: bool
    ) -> tuple[list[tuple[Result, list[Delivery], str | None]], list[Segment]]:
        verified: list[tuple[Result, list[Delivery], str | None]] = []
        results = self._drain_inbox()
        while results and self.originator is not None:
            checked = [self._originate(res, ring, self.originator.verify_result, res) for res in results]
            verified += checked
            if threaded:  # the client's tokens and the prunes leave now; the drafts they call for follow
                verified = self._send_ahead(verified, ring)
            follow = {res.request_id: res for res, _, failure in checked if failure is None}
            for rid, res in follow.items():
                verified.append(self._originate(res, ring, self.originator.follow_up, rid))
            results = self._drain_inbox()  # this device's messages, in order after what peers sent meanwhile
        if self.worker is None:
            return verified, []
        if self.originator is not None and self.worker.fillers_only:
            now = self.originator.clock()
            until = self.originator.hold_stage(self.worker.queued_rows, now)
            if until is not None:  # a result of ours is due before a filler's forward would end: wait for it
                self._hold_seconds = until - now
                self.held_steps += 1
                return verified, []
        batch = self.worker.take_batch()
        if threaded and batch:
            verified = self._send_ahead(verified, ring)
        try:
            return verified, self.worker.run(batch)
        except Exception as exc:
            # the batch is lost: its requests' sessions are unusable, so close them; local ones fail at once,
            # remote originators hear it in an error message
            log.exception("stage forward failed for %s", [s.request_id for s in batch])
            for seg in batch:
                self.worker.close(seg.request_id)
                why = f"stage forward failed: {type(exc).__name__}: {exc}"
                refusal = FrameRejected(seg.request_id, "forward_failed", why, spoils=True, tell=seg.origin)
                self._loop.call_soon_threadsafe(self._refused, refusal)
            return verified, []

    def _originate(
        self, res: Result, ring: Ring | None, call: Callable[[Any], list[Action]], arg: Any
    ) -> tuple[Result, list[Delivery], str | None]:
        """Torch thread: one originator call for ``res``'s request (``call(arg)``); ``res`` with the call's
        deliveries for peers and the client (what it sends to this device's own stage is queued here), or
        with why the call failed (that request alone fails)."""
        try:
            actions = call(arg)
        except Exception as exc:
            log.exception("request %s failed at the originator", res.request_id)
            return res, [], f"{type(exc).__name__}: {exc}"
        return res, self._queue_own(actions, ring), None

    def _send_ahead(
        self, verified: list[tuple[Result, list[Delivery], str | None]], ring: Ring | None
    ) -> list[tuple[Result, list[Delivery], str | None]]:
        """Torch thread, before the originator's drafting and before this device's forward: hand the
        originator's deliveries so far (tokens for the client, a prune for every stage; before the forward
        also a round's next segment for a peer's stage) to the loop now, so they leave while the drafting
        and the forward run instead of after them; returns ``verified`` without them. Each hand-over's
        deliveries go after the previous one's, and the loop awaits them all (:attr:`_ahead`) before it
        sends the forward's outputs, so every stage still sees a prune before the rows computed after it.
        When the originator's device runs a stage, a result that moved a walk otherwise held its next
        segment, and the client its tokens, for a whole forward of whatever was queued there; the client's
        tokens also waited for the next round's draft (the simulator sends each call's messages when the
        call ends: ``Simulation._originator_call``)."""
        ahead = [d for _, ds, _ in verified for d in ds]
        if not ahead:
            return verified
        earlier = self._ahead  # handed over earlier in this step: those go first
        self._ahead = asyncio.run_coroutine_threadsafe(self._deliver_all(ahead, ring, earlier), self._loop)
        self.sent_ahead += 1
        return [(res, [], failure) for res, _, failure in verified]

    async def _deliver_all(self, deliveries: list[Delivery], ring: Ring | None, after: Future | None = None) -> None:
        if after is not None:
            await asyncio.wrap_future(after)
        for d in deliveries:
            await self._deliver(d, ring, others_only=True)

    def _queue_own(self, actions: list[Action], ring: Ring | None) -> list[Delivery]:
        """Torch thread: queue what ``actions`` send to this device's own stage on ``ring`` (as :meth:`deliver`
        would from the loop) and return the rest of their deliveries, in order, for the loop to send with
        ``others_only`` (a message for every stage then skips this device's)."""
        deliveries = interpret(actions)
        if ring is None or None not in ring.nodes:
            return deliveries
        rest = []
        for d in deliveries:
            mine = isinstance(d, ToStage) and ring.nodes[d.index] is None
            if mine or isinstance(d, ToEveryStage):
                self._inbox.append((d.message, self.node_id))
            if not mine:
                rest.append(d)
        return rest

    async def _route_output(self, seg: Segment) -> None:
        ring = self.ring
        if ring is None or ring.local_index is None:
            return
        nxt = ring.local_index + 1
        node = ring.nodes[nxt] if nxt < len(ring.nodes) else seg.origin
        node = None if node == self.node_id else node
        wire = self.link_dtype(node)
        # as a peer would receive it, even when the next hop is us; int8 to a peer is applied once, by the
        # codec (quantizing a dequantized row again may move its scale by an ulp)
        if node is None or wire != torch.int8:
            seg.hidden = as_received(seg.hidden, wire)
        load = self.worker.rows_besides(seg.request_id) if self.worker else 0
        await self._deliver(forward(seg, ring.local_index, len(ring.nodes), load), ring)

    def link_dtype(self, node: str | None) -> torch.dtype:
        """The dtype hidden states cross to ``node`` as (None: this device; ``torch.int8``: int8 with
        scales per 32 values). A hop within this device has no link, so ``auto`` keeps floats there."""
        ring = self.ring
        curve = ring.curves[ring.local_index] if ring is not None and ring.local_index is not None else None
        return link_dtype(
            self.wire_activations,
            self.wire_dtype,
            hidden_size=self.vocab.cfg.hidden_size,
            seconds_per_byte=self.link_seconds_per_byte if node is not None else None,
            stage_curve=curve,
        )

    def _stop_ids(self) -> list[int]:
        if self.tokenizer is None:
            return list(self.vocab.cfg.eos_token_ids)
        return stop_ids(self.tokenizer, self.vocab.cfg)

    # ---- observability ----------------------------------------------------------------------
    def stage_stats(self) -> dict:
        w = self.worker
        if w is None:
            return {}
        up = max(1e-9, time.time() - self.started)
        return {
            "first_layer": w.stage.layer_range.first,
            "stop_layer": w.stage.layer_range.stop,
            "queued_rows": w.queued_rows,
            "sessions": len(w.sessions),
            "busy_seconds": round(w.busy_seconds, 3),
            "rows_done": w.rows_done,
            "forwards": w.forwards,
            "shared_forwards": w.shared_forwards,
            # steps run on the loop's thread (Runtime._start_step)
            "inline_steps": self.inline_steps,
            # steps whose fillers waited for a result of this device's originator (Originator.hold_stage)
            "held_steps": self.held_steps,
            # hand-overs of the originator's messages ahead of its drafting or the stage's forward (Runtime._send_ahead)
            "sent_ahead": self.sent_ahead,
            "utilisation": round(w.busy_seconds / up, 4),
            "prefix_cache": (
                {
                    "entries": len(w.prefixes),
                    "tokens": w.prefixes.tokens,
                    "bytes": w.prefixes.nbytes,
                    "hits": w.prefixes.hits,
                    "misses": w.prefixes.misses,
                    "evictions": w.prefixes.evictions,
                }
                if w.prefixes is not None
                else None
            ),
        }

    def originator_stats(self) -> dict | None:
        """Segments in flight per live request this peer originates, and the slots it aims for."""
        o = self.originator
        if o is None:
            return None
        return {
            "live_segments": o.live_segments(),
            "peak_segments": o.peak_segments,
            "flow_slots": o.flow_slots or "auto",
            "ring_latency_ms": round(o.ring.latency(8) * 1e3, 2),
            "ring_step_ms": round(o.ring.step(8) * 1e3, 2),
        }

    def metrics(self) -> dict:
        c = dict(self.counters)
        c["requests_in_flight"] = len(self.handles)
        c["accepted_per_round"] = round(c["accepted_total"] / c["rounds_total"], 4) if c["rounds_total"] else 0.0
        c["tokens_per_second"] = round(c["tokens_total"] / max(1e-9, time.time() - self.started), 4)
        st = self.stage_stats()
        c["stage_utilisation"] = st.get("utilisation", 0.0)
        c["stage_queue_rows"] = st.get("queued_rows", 0)
        c["stage_sessions"] = st.get("sessions", 0)
        kept = self.worker.prefixes if self.worker is not None else None
        c["stage_prefix_cache_bytes"] = kept.nbytes if kept is not None else 0
        c["stage_prefix_cache_entries"] = len(kept) if kept is not None else 0
        live = self.originator.live_segments() if self.originator is not None else {}
        c["segments_in_flight"] = sum(live.values())  # this originator's requests, all together
        c["stage_refused_total"] = {(("code", k),): n for k, n in self.refusals.items()}
        return c

    def status(self) -> dict:
        """``GET /mesh``: the mesh's plan and peers (from the daemon) plus this device's load."""
        ring = self.ring
        out = {
            "node_id": self.node_id,
            "version": __version__,
            "model": self.model_name,
            "fingerprint": self.source.fingerprint,
            "ready": self.ready()[0],
            "reason": self.ready()[1] or None,
            "stage": self.stage_stats() or None,
            "originator": self.originator_stats(),
            # labelled families (tuple label sets, for /metrics) as plain JSON objects
            "metrics": {name: _json_family(value) for name, value in self.metrics().items()},
            "plan": {"epoch": ring.epoch, "committed": True, "stages": []} if ring else None,
            "peers": [],
            "requests": [h.progress(time.monotonic()) for h in self.handles.values()],
            "recent_requests": list(self.finished),
        }
        if self.mesh_status is not None:
            out.update(self.mesh_status())
        return out
