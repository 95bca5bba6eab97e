"""The daemon's engine room: the scheduler and the stage worker, driven on one event loop.

Everything torch (the originator's LM head and drafting, this device's layer slice) runs in
one executor thread, so links keep streaming while a forward runs. The event loop only moves
messages: from the API to the originator, between this device's worker and its ring
neighbours, and from the last stage back to whichever peer originated a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from meshd.ring.messages import Segment
from meshd.ring.scheduler import (
    Action,
    CloseSessions,
    Emit,
    Finish,
    Originator,
    Request,
    SendPrune,
    SendSegment,
)
from meshd.ring.worker import StageWorker
from models.budget import CostCurve
from models.drafters import Drafter
from models.engine import Stats
from models.source import ModelSource
from models.stage import Stage

log = logging.getLogger(__name__)


class RuntimeUnavailable(RuntimeError):
    """The mesh cannot take requests right now (no committed plan, a stage is gone)."""


@dataclass
class GenerateParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    mode: str = "flow"


class RequestHandle:
    """What the API holds for one request: an async stream of token chunks, then the outcome."""

    def __init__(self, runtime: Runtime, request_id: str, prompt_tokens: int):
        self.runtime, self.request_id, self.prompt_tokens = runtime, request_id, prompt_tokens
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats: Stats | None = None
        self.token_ids: list[int] = []
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

    def _push(self, tokens: list[int]) -> None:
        self.token_ids.extend(tokens)
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


class Runtime:
    """Originator + stage worker for one device, with or without a mesh around it.

    ``transport`` sends a data-plane message to a peer: ``await transport(node_id, kind, request_id, body)``.
    Without a mesh (``solo``) the ring is this device alone.
    """

    def __init__(
        self,
        source: ModelSource,
        head: Stage,
        drafter_factory: Callable[[], Drafter] | None,
        *,
        tokenizer: Any = None,
        node_id: str = "local",
        max_context: int = 4096,
        wire_dtype: torch.dtype | None = None,
        compute_scale: float = 1.0,
        session_timeout: float = 300.0,
    ):
        self.source, self.head, self.tokenizer = source, head, tokenizer
        # a stage frees a request's KV session after this long without traffic: its originator vanished
        # (killed, partitioned) and will never send the close; swept from the compute loop
        self.session_timeout = session_timeout
        self._swept = time.monotonic()
        self.node_id, self.max_context = node_id, max_context
        self.model_name = source.name
        self.drafter_factory = drafter_factory
        self.compute_scale = compute_scale
        self.wire_dtype = wire_dtype or (torch.float32 if head.dtype == torch.float32 else torch.float16)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.worker: StageWorker | None = None
        self.ring: Ring | None = None
        self.originator: Originator | None = None
        self.transport: Callable[..., Any] | None = None
        self.handles: dict[str, RequestHandle] = {}
        self._ring_of: dict[str, int] = {}  # request id -> ring epoch it started under
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._background: set[asyncio.Future] = set()
        self.counters = {
            "requests_total": 0,
            "requests_failed_total": 0,
            "tokens_total": 0,
            "rounds_total": 0,
            "accepted_total": 0,
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
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def _torch(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- topology ---------------------------------------------------------------------------
    def install_worker(self, stage: Stage | None) -> None:
        """This device's slice for the coming plan (None: a pure originator)."""
        embed = self.head.embed if stage is not None and stage.first == 0 else None
        self.worker = (
            StageWorker(stage, embed=embed, compute_scale=self.compute_scale, idle_timeout=self.session_timeout)
            if stage
            else None
        )

    def set_ring(self, ring: Ring) -> None:
        """A committed plan: requests started under an older one cannot finish, so they fail now."""
        old = self.ring
        self.ring = ring
        if old is not None and old.epoch != ring.epoch:
            for rid, epoch in list(self._ring_of.items()):
                if epoch != ring.epoch:
                    self._fail(
                        rid,
                        f"the mesh re-planned (epoch {old.epoch} -> {ring.epoch}) while this request "
                        "was in flight; retry it",
                    )
        if self.originator is None:
            self.originator = Originator(self.head, self.drafter_factory, ring.curves, origin=self.node_id)
        else:
            self.originator.set_ring(ring.curves)

    def clear_ring(self, reason: str) -> None:
        self.ring = None
        self.unavailable_reason = reason
        for rid in list(self.handles):
            self._fail(rid, reason)

    def ready(self) -> tuple[bool, str]:
        if self.ring is None:
            return False, self.unavailable_reason
        return True, ""

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
        handle = RequestHandle(self, rid, len(prompt_ids))
        self.handles[rid] = handle
        self._ring_of[rid] = self.ring.epoch
        self.counters["requests_total"] += 1
        req = Request(
            rid,
            list(prompt_ids),
            params.max_tokens,
            params.mode,
            _sampling(params),
            params.seed,
            frozenset(_stop_ids(self)),
        )
        try:
            actions = await self._torch(self.originator.submit, req)
        except ValueError:
            self.handles.pop(rid, None)
            self._ring_of.pop(rid, None)
            raise
        await self._dispatch(actions)
        return handle

    async def _cancel(self, rid: str) -> None:
        if self.originator is None or rid not in self.handles:
            return
        await self._dispatch(await self._torch(self.originator.cancel, rid))

    def _fail(self, rid: str, why: str) -> None:
        h = self.handles.pop(rid, None)
        self._ring_of.pop(rid, None)
        if h is None:
            return
        self.counters["requests_failed_total"] += 1
        if self.originator is not None:
            lv = self.originator.live.pop(rid, None)
            stats = lv.stats if lv else None
        else:
            stats = None
        h._finish("error", stats, why)
        task = asyncio.ensure_future(self._close_everywhere(rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_everywhere(self, rid: str) -> None:
        with contextlib.suppress(Exception):
            await self._dispatch([CloseSessions(rid)])

    # ---- moving messages --------------------------------------------------------------------
    async def _dispatch(self, actions: list[Action]) -> None:
        ring = self.ring
        for a in actions:
            if isinstance(a, Emit):
                h = self.handles.get(a.request_id)
                if h:
                    h._push(a.tokens)
                    self.counters["tokens_total"] += len(a.tokens)
            elif isinstance(a, Finish):
                h = self.handles.pop(a.request_id, None)
                self._ring_of.pop(a.request_id, None)
                if h:
                    self.counters["rounds_total"] += a.stats.rounds
                    self.counters["accepted_total"] += sum(a.stats.per_round)
                    if a.reason == "error":
                        self.counters["requests_failed_total"] += 1
                    h._finish(a.reason, a.stats, a.error)
            elif ring is None:
                continue
            elif isinstance(a, SendSegment):
                await self._to_stage(0, a.segment)
            elif isinstance(a, SendPrune):
                for k in range(len(ring.nodes)):
                    await self._to_node(ring.nodes[k], "prune", a.prune)
            elif isinstance(a, CloseSessions):
                for k in range(len(ring.nodes)):
                    await self._to_node(ring.nodes[k], "cancel", a.request_id)

    async def _to_stage(self, k: int, seg: Segment) -> None:
        await self._to_node(self.ring.nodes[k], "segment", seg)

    async def _to_node(self, node: str | None, kind: str, payload: Any) -> None:
        if node is None:
            self._inbox.append((kind, payload))
            self._wake.set()
            return
        if self.transport is None:
            raise RuntimeUnavailable("no transport to reach peer " + node)
        try:
            await self.transport(node, kind, payload)
        except ConnectionError as exc:
            rid = payload.request_id if hasattr(payload, "request_id") else payload
            self._fail(str(rid), f"lost the link to peer {node}: {exc}")

    def deliver(self, kind: str, payload: Any) -> None:
        """A data-plane message from a peer for this device's worker (or a result for our originator)."""
        self._inbox.append((kind, payload))
        self._wake.set()

    def _drain_inbox(self) -> list[tuple[Segment, int]]:
        """Runs in the torch thread: apply queued messages in arrival order; return results for us."""
        results = []
        while self._inbox:
            kind, p = self._inbox.popleft()
            if kind == "result":
                results.append(p)
            elif self.worker is not None:
                self.worker.handle(kind, p)
        return results

    async def _compute_loop(self) -> None:
        sweep = max(0.05, min(30.0, self.session_timeout / 4))
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sweep)
            self._wake.clear()
            try:
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

    async def _compute_once(self) -> None:
        while True:
            results, outputs = await self._torch(self._step)
            for seg in outputs:  # first, so the next stage starts while the originator verifies and drafts
                await self._route_output(seg)
            for seg, queue in results:
                if self.originator is None:
                    continue
                try:
                    actions = await self._torch(self.originator.on_result, seg, queue)
                except Exception as exc:  # one broken request fails alone, with its reason, instead of hanging
                    log.exception("request %s failed at the originator", seg.request_id)
                    self._fail(seg.request_id, f"internal error at the originator: {type(exc).__name__}: {exc}")
                    continue
                await self._dispatch(actions)
            if not results and not outputs and not self._inbox:
                return

    def _step(self) -> tuple[list[tuple[Segment, int]], list[Segment]]:
        results = self._drain_inbox()
        if self.worker is None:
            return results, []
        batch = self.worker.take_batch()
        try:
            return results, self.worker.run(batch)
        except Exception as exc:
            # the batch is lost: its requests' sessions are unusable, so close them; local ones fail at once,
            # remote originators notice through their own error path (their results never come)
            log.exception("stage forward failed for %s", [s.request_id for s in batch])
            for seg in batch:
                self.worker.close(seg.request_id)
                if seg.request_id in self.handles:
                    self._loop.call_soon_threadsafe(
                        self._fail, seg.request_id, f"stage forward failed: {type(exc).__name__}: {exc}"
                    )
            return results, []

    async def _route_output(self, seg: Segment) -> None:
        ring = self.ring
        if ring is None or ring.local_index is None:
            return
        k = ring.local_index
        seg.hidden = seg.hidden.to(self.wire_dtype)
        if k + 1 < len(ring.nodes):
            await self._to_stage(k + 1, seg)
            return
        origin = seg.origin
        queue = self.worker.queued_rows if self.worker else 0
        if origin is None or origin == self.node_id:
            self.deliver("result", (seg, queue))
        else:
            await self._to_node(origin, "result", (seg, queue))

    # ---- observability ----------------------------------------------------------------------
    def stage_stats(self) -> dict:
        w = self.worker
        if w is None:
            return {}
        up = max(1e-9, time.time() - self.started)
        return {
            "first_layer": w.stage.first,
            "last_layer": w.stage.last - 1,
            "queued_rows": w.queued_rows,
            "sessions": len(w.sessions),
            "busy_seconds": round(w.busy_seconds, 3),
            "rows_done": w.rows_done,
            "forwards": w.forwards,
            "shared_forwards": w.shared_forwards,
            "utilisation": round(w.busy_seconds / up, 4),
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
        return c

    def status(self) -> dict:
        """``GET /mesh``: the mesh's plan and peers (from the daemon) plus this device's load."""
        ring = self.ring
        out = {
            "node_id": self.node_id,
            "model": self.model_name,
            "fingerprint": self.source.fingerprint,
            "ready": self.ready()[0],
            "reason": self.ready()[1] or None,
            "stage": self.stage_stats() or None,
            "metrics": self.metrics(),
            "plan": {"epoch": ring.epoch, "committed": True, "stages": []} if ring else None,
            "peers": [],
        }
        if self.mesh_status is not None:
            out.update(self.mesh_status())
        return out


def _sampling(params: GenerateParams):
    from models.verify import Sampling

    return Sampling(params.temperature, params.top_p)


def _stop_ids(rt: Runtime) -> list[int]:
    from models.text import stop_ids

    if rt.tokenizer is None:
        return list(rt.head.cfg.eos_token_ids)
    return stop_ids(rt.tokenizer, rt.head.cfg)


def solo_runtime(source: ModelSource, head: Stage, drafter_factory, tokenizer=None, *, curve=None, **kw) -> Runtime:
    """A one-device ring: this device holds every layer (no mesh). Tests and ``serve --solo`` use it."""
    rt = Runtime(source, head, drafter_factory, tokenizer=tokenizer, **kw)
    rt.install_worker(head)
    cc = CostCurve(curve or {1: 1.0, 64: 2.0})
    rt.set_ring(Ring(epoch=1, nodes=[None], curves=[cc], local_index=0))
    return rt
