"""A discrete-event simulator of the mesh: the real scheduler and stage workers on a simulated clock.

Why: this 2-core machine cannot show what a ring of five Jetson boards would do, and loopback
daemons here share two cores. The simulator runs the very objects the daemon runs (the sans-IO
:class:`~meshd.ring.scheduler.Originator`, one :class:`~meshd.ring.worker.StageWorker` per stage) with real
tensors, so every draft, accept/reject decision, tree size, prune and batch is the real one; only
the clock is simulated. Each forward is computed for real but *charged* by a cost model:

- **stages**: one device per stage, serial (one torch executor, as in the daemon). A device loops
  like ``Runtime._step``: the originator's calls for the requests and results that have arrived
  (what they send to the device's own stage is queued at once; every result verified before any is
  followed up with drafting, so tokens and prunes leave first), then one batched forward over its
  queue (``take_batch``/``run``), then route the forward's outputs. A forward over T rows costs
  ``profile.stage_cost(layers)(T)``.
- **originator**: its calls (submit, verify_result, follow_up) cost the LM heads they run plus the draft time;
  with a ``measured`` profile, the call's own CPU time (``time.thread_time``; run with one torch
  thread). Within a call its clock runs on over the heads and drafting charged so far, as a daemon's
  wall clock does, so what it times (a segment's send, its own work per segment) is what a daemon's
  originator would time. It lives on a stage's device (meshd: any peer originates, sharing its
  executor) or on a device of its own (FlowSpec's layout: a head device with no layers).
- **links**: one per ordered pair of devices, FIFO; a message occupies the wire for
  ``bytes * 8 / bandwidth`` and arrives ``latency`` later (latency overlaps, bandwidth serialises,
  as ``peers/link.py``'s emulation does). Segments carry ``rows * hidden * wire_bytes`` plus
  metadata, or with int8 activations (``wire_activations``: each stage's link decides as a daemon's does,
  :func:`meshd.ring.wire.link_dtype`) one byte per value and a scale per 32, and then the receiver
  computes with the int8 round trip's values, as it would. Prunes and closes are small and go to
  every stage, so they may overtake segments (the workers prune by node id, so that is fine).
- **cores** (optional): a pool of CPU cores shared by every device, for calibrating against
  loopback daemons that share this machine's two cores; non-preemptive, first come first served.

Decisions never depend on the simulated clock, so output tokens equal the in-process pipeline's
(and plain greedy decoding's); the tree budget sees the *simulated* stage curves, so a flat GPU
profile gets GPU-sized trees. Where a profile's originator is measured rather than modelled, its
clock runs within a call over the drafter's CPU time only (the head's is known when the call is over).
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from meshd.lab.bench import sum_tree_ends, tree_ends_line
from meshd.lab.loadtest import per_token_latency, percentile, poisson_arrivals
from meshd.lab.sim.links import ROW_META_BYTES, SEGMENT_META_BYTES, TOKEN_BYTES, LinkModel
from meshd.lab.sim.profiles import Profile
from meshd.ring.interpreter import Delivery, ToClient, ToEveryStage, ToOriginator, ToStage, forward, interpret
from meshd.ring.messages import Prune, Result, RingMessage, Segment
from meshd.ring.scheduler import Action, Emit, Originator, Request
from meshd.ring.wire import as_received, link_dtype
from meshd.ring.worker import StageWorker
from models.budget import CostCurve
from models.engine import Stats
from models.ranges import LayerRange
from models.stage import Stage
from models.verify import Sampling
from peers.codec import QuantizedRows
from peers.planner import ORIGIN_LEVELS, ORIGIN_ROWS, SPLITS, ModelShape, PeerResources, PlanError, plan_layers

FLOWSPEC_7B_FLOW_OVER_CHUNK = 1.43  # FlowSpec, LLaMA2-chat 7B, 5 Jetson boards, T=0 (measured, published)


def origin_layers(profile: Profile) -> float:
    """The originator's work per round in the profile's decoder layers, as a daemon measures it at start-up
    (``meshd.serve.daemon``): one LM head over ``ORIGIN_ROWS`` rows plus one ``ORIGIN_LEVELS``-level draft,
    over one layer's forward of as many rows."""
    d = profile.draft
    if d.measured_scale is not None:
        raise ValueError(
            f"profile {profile.name}: its drafts are timed on this machine, not modelled, so the originator's work "
            "per round is not known before the run; use --split even with it"
        )
    work = profile.head(ORIGIN_ROWS) + d.per_call + ORIGIN_LEVELS * d.per_level
    return work / max(1e-12, profile.layer(ORIGIN_ROWS))


def layer_split(
    profile: Profile, stages: int, split: str | Sequence[int] = "even", origins: Sequence[int | None] = (0,)
) -> list[int]:
    """The profile's layers per stage. ``even``: sizes differing by at most one (``LayerRange.split``);
    ``origin-aware``: as the planner splits them when the devices of ``origins`` originate (role ``both``)
    and the others only serve stages (role ``stage``), each originator's work (:func:`origin_layers`) taken
    off its own share, so that its device finishes a round when the others do; a list: those counts (a
    plan daemons served, which a calibration replays)."""
    if not isinstance(split, str):
        counts = list(split)
        if len(counts) != stages or sum(counts) != profile.n_layers or min(counts, default=0) < 1:
            raise ValueError(
                f"layers per stage {counts}: expected {stages} stages of at least one layer, "
                f"{profile.n_layers} layers in all"
            )
        return counts
    if split == "even":
        return [r.n_layers for r in LayerRange.split(profile.n_layers, stages)]
    if split != "origin-aware":
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    work = origin_layers(profile)
    hosts = {o for o in origins if o is not None}
    peers = [
        PeerResources(f"{k:04d}", profile.n_layers, role="both" if k in hosts else "stage", origin_layers=work)
        for k in range(stages)
    ]
    plan = plan_layers(peers, ModelShape(profile.n_layers, bytes_per_layer=1, replicated_bytes=0))
    if len(plan) != stages:
        raise PlanError(
            f"the origin-aware split of {profile.n_layers} layers over {stages} stages leaves the originator's "
            f"device without layers (its work is {work:.1f} layers a round): simulate it as a device of its own "
            "(--originator own) or with fewer stages"
        )
    return [a.n_layers for a in plan]


def _scaled(counts: Sequence[int], n_layers: int) -> list[LayerRange]:
    """``counts`` (one split of some number of layers) carried over to ``n_layers``: each boundary at the
    same fraction of the model, every stage keeping at least one layer."""
    if len(counts) > n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {len(counts)} stages")
    total, bounds, acc = sum(counts), [0], 0
    for i, c in enumerate(counts[:-1], start=1):
        acc += c
        lo, hi = bounds[-1] + 1, n_layers - (len(counts) - i)
        bounds.append(min(hi, max(lo, round(acc * n_layers / total))))
    bounds.append(n_layers)
    return [LayerRange(a, b) for a, b in itertools.pairwise(bounds)]


class Variant(NamedTuple):
    mode: str
    slots: int | None  # flow's segments in flight per request (None: from the ring model)
    resumable: bool = True  # flow grows its pools with a drafter that keeps its state (Originator.resumable_drafting)


def parse_variant(label: str) -> Variant:
    """A mode as the simulator runs it: ``flow@N`` is ``flow`` with N segments in flight per request
    (``flow@1``: one tree per round, the scheduler before slots); a ``:redraft`` suffix (``flow:redraft``,
    ``flow@3:redraft``) re-drafts pools from the root instead of growing them (the scheduler before
    resumable drafting); any other label is a plain mode, ``flow`` with its slots from the ring model."""
    label, colon, option = label.partition(":")
    if colon and (option != "redraft" or not label.startswith("flow")):
        raise ValueError(f"mode {label + colon + option!r}: the only option is flow's ':redraft'")
    mode, at, slots = label.partition("@")
    if not at:
        return Variant(mode, None, not colon)
    if mode != "flow" or not slots.isdigit() or int(slots) < 1:
        raise ValueError(f"mode {label!r}: only flow takes a slot count, as flow@N with N >= 1")
    return Variant(mode, int(slots), not colon)


# ---- what a run records -------------------------------------------------------------------
@dataclass
class Busy:
    """One stretch of work on a device: a stage forward or an originator call."""

    device: int
    kind: str  # "stage" | "originator"
    start: float
    end: float
    requests: tuple[str, ...]
    rows: int


@dataclass
class RequestTrace:
    request_id: str
    mode: str
    arrival: float
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    emits: list[tuple[float, int]] = field(default_factory=list)  # (simulated time, tokens emitted)
    finish: float | None = None
    reason: str | None = None
    error: str | None = None
    stats: Stats | None = None
    peak_segments: int = 0  # most segments of this request in flight at once

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def ttft(self) -> float:
        return self.emits[0][0] - self.arrival if self.emits else math.nan

    @property
    def decode_seconds(self) -> float:
        """First token to last: FlowSpec's "decode time only" (prefill excluded)."""
        return self.emits[-1][0] - self.emits[0][0] if self.emits else 0.0

    @property
    def tpot(self) -> float:
        """Per-token latency, as the load test measures it (NaN under two tokens)."""
        first, last = (self.emits[0][0], self.emits[-1][0]) if self.emits else (None, None)
        return per_token_latency(first, last, self.new_tokens)

    @property
    def seconds(self) -> float:
        return (self.finish if self.finish is not None else math.nan) - self.arrival


@dataclass
class SimResult:
    requests: dict[str, RequestTrace]
    busy: list[Busy]
    stage_devices: list[int]
    start: float
    end: float

    @property
    def makespan(self) -> float:
        return self.end - self.start

    def stage_busy(self) -> list[float]:
        """Forward time per stage inside the makespan (forwards of already-finished requests' leftover
        segments can run past the last finish; they are not counted)."""
        out = [0.0] * len(self.stage_devices)
        for b in self.busy:
            if b.kind == "stage":
                out[self.stage_devices.index(b.device)] += max(0.0, min(b.end, self.end) - max(b.start, self.start))
        return out

    def utilisation(self) -> list[float]:
        """Per stage: forward time / makespan (in [0, 1]: a device runs one thing at a time)."""
        return [b / self.makespan if self.makespan > 0 else 0.0 for b in self.stage_busy()]

    def timeline(self) -> list[tuple[int, float, float, str, int]]:
        """(stage, start, end, request ids, rows) of every stage forward."""
        return [
            (self.stage_devices.index(b.device), b.start, b.end, ",".join(b.requests), b.rows)
            for b in self.busy
            if b.kind == "stage"
        ]


# ---- the simulator ------------------------------------------------------------------------
class _WorkMeter:
    """What the originator's work cost so far: its drafting (measured CPU seconds, tree levels and calls)
    and, on a modelled profile, its LM heads, with the device's modelled time for all of it (``modelled``),
    which the originator reads as its timer and its clock runs on by."""

    def __init__(self, profile: Profile, scale: float) -> None:
        self.profile, self.scale = profile, scale
        self.seconds, self.levels, self.calls = 0.0, 0, 0
        self.head_rows = 0  # rows put through the LM head
        self.modelled = 0.0

    def add_head(self, rows: int) -> None:
        """An LM head over ``rows`` rows ran (its time is modelled here on a modelled profile; a measured
        one times the whole call)."""
        self.head_rows += rows
        if not self.profile.originator_measured:
            self.modelled += self.profile.head(rows) * self.scale

    def add(self, seconds: float, levels: int = 0, calls: int = 0) -> None:
        self.seconds, self.levels, self.calls = self.seconds + seconds, self.levels + levels, self.calls + calls
        d = self.profile.draft
        if self.profile.originator_measured:
            self.modelled += seconds * self.scale
        elif d.measured_scale is not None:
            self.modelled += seconds * d.measured_scale
        else:
            self.modelled += (d.per_call * calls + d.per_level * levels) * self.scale  # slowed like all compute


class _TimedDrafter:
    """Wraps a request's drafter to charge its CPU time and tree depth to the simulator."""

    def __init__(self, inner, meter: _WorkMeter):
        self.inner, self.meter = inner, meter

    def reset(self, prompt: list[int]) -> None:
        self.inner.reset(prompt)

    def draft(self, context: list[int], **kw):
        t0 = time.thread_time()
        tree = self.inner.draft(context, **kw)
        self.meter.add(time.thread_time() - t0, max(tree.depth), 1)
        return tree

    def accept(self, context: list[int], hidden) -> None:
        t0 = time.thread_time()
        self.inner.accept(context, hidden)
        self.meter.add(time.thread_time() - t0)

    def __getattr__(self, name: str):
        # one tree level, charged like a draft of depth 1 (only where the inner drafter grows pools)
        if name == "extend":
            extend = self.inner.extend

            def timed(*args, **kw):
                t0 = time.thread_time()
                added = extend(*args, **kw)
                self.meter.add(time.thread_time() - t0, 1, 1)
                return added

            return timed
        return getattr(self.inner, name)


class _TimedHead:
    """The target's vocabulary ends as the originator reads them, charging each LM head to the simulated
    device (``_WorkMeter.add_head``) when it runs, so the originator's clock and timer pass over it as a
    daemon's wall clock does over its (paced) head."""

    def __init__(self, full: Stage, meter: _WorkMeter):
        self.full, self.meter = full, meter

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        self.meter.add_head(hidden.shape[0])
        return self.full.logits(hidden, normed=normed)

    def __getattr__(self, name: str):
        return getattr(self.full, name)


@dataclass
class _Device:
    index: int
    worker: StageWorker | None = None
    stage: int | None = None
    cost: CostCurve | None = None
    wire: torch.dtype | None = None  # how its stage's hidden states cross its outgoing link
    originator: Originator | None = None
    stepping: bool = False  # inside the originator's calls of a step (_iterate): own-stage messages queue at once
    busy: bool = False
    submits: deque[Request] = field(default_factory=deque)
    results: deque[Result] = field(default_factory=deque)


class Simulation:
    """One simulated mesh. ``origins``: for each originator, the stage whose device hosts it, or None
    for a device of its own (FlowSpec's head device). Requests go to ``origins[i]`` by ``add(..., origin=i)``.
    ``coalesce``: stages merge a request's queued segments into one forward where their cost curve
    makes that cheap (``StageWorker``'s ``cost``). ``idle_drafting``: an originator drafts a first segment
    shallow and deepens its pool when its device would otherwise idle (``Originator.idle``), as the
    simulated devices give it the time; off, it drafts every level before the first segment leaves.
    ``split``: how the profile's layers are cut into stages (:func:`layer_split`)."""

    def __init__(
        self,
        full: Stage,
        drafter_factory,
        *,
        stages: int,
        profile: Profile,
        link: LinkModel,
        origins: Sequence[int | None] = (0,),
        compute_scale: float = 1.0,
        cores: int | None = None,
        max_batch_rows: int = 256,
        coalesce: bool = False,
        idle_drafting: bool = True,
        wire_activations: str = "fp16",
        split: str | Sequence[int] = "even",
        **originator_kw,
    ):
        if not origins:
            raise ValueError("a simulation needs at least one originator")
        self.profile, self.link, self.scale = profile, link, compute_scale
        counts = layer_split(profile, stages, split, origins)
        self.layers = counts
        wires = self.wire_plan(wire_activations, profile, link, full.dtype, stages, compute_scale, layers=counts)
        self._now = self._clock = 0.0
        self._work0 = 0.0  # the work meter's modelled time at the start of the originator's current call
        self._events: list = []
        self._seq = itertools.count()
        self._wire_free: dict[tuple[int, int], float] = {}
        self._cores = [0.0] * cores if cores else None
        self.meter = _WorkMeter(profile, compute_scale)
        # the real model's layers: as daemons split them evenly, or at the profile's fractions
        real = LayerRange.split(full.cfg.n_layers, stages) if split == "even" else _scaled(counts, full.cfg.n_layers)
        sim = _scaled(counts, profile.n_layers)
        self.devices: list[_Device] = []
        curves = []
        for k, (r, s) in enumerate(zip(real, sim)):
            cost = profile.stage_cost(s.n_layers, compute_scale)
            curves.append(cost)
            worker = StageWorker(
                full.slice(r),
                embed=full.embed if r.first == 0 else None,
                max_batch_rows=max_batch_rows,
                cost=cost if coalesce else None,
            )
            self.devices.append(_Device(k, worker, k, cost, wires[k]))
        self.stage_devices = list(range(stages))
        factory = (lambda: _TimedDrafter(drafter_factory(), self.meter)) if drafter_factory else None
        self.origin_device: list[int] = []
        for o in origins:
            dev = self.devices[o] if o is not None else self._new_device()
            if dev.originator is not None:
                raise ValueError(f"stage {o} already hosts an originator")
            dev.originator = Originator(
                _TimedHead(full, self.meter),
                factory,
                curves,
                clock=self._originator_clock,
                origin=f"dev{dev.index}",
                timer=self._work_clock,
                draft_when_idle=idle_drafting,
                local_stage=dev.stage,  # its stage's forwards and its calls share the device
                **originator_kw,
            )
            self.origin_device.append(dev.index)
        self.traces: dict[str, RequestTrace] = {}
        self.busy: list[Busy] = []

    def _originator_clock(self) -> float:
        """The originator's clock: the start of its current call plus the LM heads and drafting charged so
        far in that call (on a daemon the wall clock runs on while they work, so a segment sent after
        drafting is sent that much later); between calls, the end of its latest call's work."""
        return self._clock + (self.meter.modelled - self._work0)

    def _work_clock(self) -> float:
        """The originator's timer: the simulated device's time for its work so far (drafting and LM heads;
        CPU time on a measured profile), so its budget and ring model see the simulated device, not this
        machine."""
        return time.thread_time() * self.scale if self.profile.originator_measured else self.meter.modelled

    def _new_device(self) -> _Device:
        self.devices.append(_Device(len(self.devices)))
        return self.devices[-1]

    # ---- driving ------------------------------------------------------------------------
    def carry_over(self, earlier: Simulation) -> None:
        """Start as the mesh ``earlier`` left off: each originator knows what its counterpart there measured
        of the ring (a plain tree's time a token, :attr:`Originator.plain_tree_s`, and the links' fit that
        sizes prefill chunks, :meth:`~meshd.ring.ringtime.RingTimer.carry_link`), as a daemon's originator
        knows it from the requests it served. Without it every one-at-a-time run's first ``flow`` tree would
        be plain, to time one, where a daemon that served requests before (``meshd bench``'s, whose modes take
        turns on the same daemons) drafts it."""
        for k, i in zip(self.origin_device, earlier.origin_device, strict=False):
            mine, theirs = self.devices[k].originator, earlier.devices[i].originator
            if theirs.plain_tree_s is not None:
                mine.plain_tree_s = theirs.plain_tree_s
            mine.ring.carry_link(theirs.ring)

    def add(self, req: Request, at: float = 0.0, origin: int = 0) -> None:
        """Submit ``req`` at simulated time ``at`` to originator ``origin``."""
        self.traces[req.request_id] = RequestTrace(req.request_id, req.mode, at, len(req.prompt))
        self._at(at, self._arrive, self.devices[self.origin_device[origin]], req)

    def run(self) -> SimResult:
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self._now = t
            fn(*args)
        for tr in self.traces.values():
            if tr.reason is None:
                tr.reason, tr.error = "error", "stalled: no work left in the simulated ring"
        start = min((t.arrival for t in self.traces.values()), default=0.0)
        end = max((t.finish for t in self.traces.values() if t.finish is not None), default=start)
        return SimResult(self.traces, self.busy, self.stage_devices, start, end)

    def _at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def _arrive(self, dev: _Device, req: Request) -> None:
        dev.submits.append(req)
        self._wake(dev)

    def _wake(self, dev: _Device) -> None:
        if not dev.busy:
            dev.busy = True
            self._at(self._now, self._iterate, dev)

    # ---- one device -----------------------------------------------------------------------
    def _iterate(self, dev: _Device) -> None:
        """One pass of the daemon's compute loop on ``dev``, starting now; the next starts when it ends.

        As ``Runtime._step`` does it: the originator's calls first (new requests, then the results that
        arrived, each verified, walked and drafted from), whose messages for this device's own stage are
        queued at once (:meth:`_send`); then one forward over everything queued. So a result that decides a
        round's next first segment waits for no filler's forward on its own device, and that segment goes
        into the same forward."""
        t = self._now
        results, dev.results = list(dev.results), deque()
        submits, dev.submits = list(dev.submits), deque()
        worked = bool(results or submits)
        dev.stepping = True
        for req in submits:
            t = self._originator_call(dev, t, lambda req=req: dev.originator.submit(req), req.request_id)
        # every result's tokens and prunes leave first, then the drafts they call for (Runtime._step_on)
        for res in results:
            t = self._originator_call(dev, t, lambda res=res: dev.originator.verify_result(res), res.request_id)
        for rid in dict.fromkeys(res.request_id for res in results):
            t = self._originator_call(dev, t, lambda rid=rid: dev.originator.follow_up(rid), rid)
        dev.stepping = False
        if dev.worker is not None and dev.originator is not None and dev.worker.fillers_only:
            until = dev.originator.hold_stage(dev.worker.queued_rows, t)
            if until is not None:  # a result of its own is due before a filler's forward would end: wait for it
                self._at(t, self._hold, dev, until)
                return
        outputs, queue = [], {}
        batch = dev.worker.take_batch() if dev.worker else []
        if batch:
            worked = True
            rows = sum(len(s) for s in batch)
            start, t = self._compute(t, dev.cost(rows))
            outputs = dev.worker.run(batch)  # the real forward, charged by the cost model above
            queue = {out.request_id: dev.worker.rows_besides(out.request_id) for out in outputs}
            self.busy.append(Busy(dev.index, "stage", start, t, tuple(s.request_id for s in batch), rows))
        for out in outputs:
            self._route(dev, out, t, queue[out.request_id])
        if not worked and dev.originator is not None and dev.originator.idle_work():
            t, worked = self._originator_call(dev, t, dev.originator.idle, "idle"), True
        if worked:
            self._at(t, self._iterate, dev)
        else:
            dev.busy = False

    def _hold(self, dev: _Device, until: float) -> None:
        """``dev`` is done with its originator's calls and holds its stage's fillers until ``until`` (as
        ``Runtime._compute_once`` does): what arrives meanwhile wakes it at once."""
        dev.busy = False
        if dev.results or dev.submits or not dev.worker.fillers_only:
            self._wake(dev)
        else:
            self._at(until, self._wake, dev)

    def _compute(self, t: float, cost: float) -> tuple[float, float]:
        """Start and end of ``cost`` seconds of compute wanted at ``t`` (waiting for a core if shared)."""
        if self._cores is None:
            return t, t + cost
        i = min(range(len(self._cores)), key=self._cores.__getitem__)
        start = max(t, self._cores[i])
        self._cores[i] = start + cost
        return start, start + cost

    def _originator_call(self, dev: _Device, t: float, call: Callable[[], list], rid: str) -> float:
        self._work0, rows0 = self.meter.modelled, self.meter.head_rows
        self._clock = t
        c0 = time.thread_time()
        actions = call()
        cpu = time.thread_time() - c0
        p = self.profile
        if p.originator_measured:
            cost = cpu * self.scale
        else:
            cost = self.meter.modelled - self._work0  # the LM heads it ran and its drafting
        start, end = self._compute(t, cost)
        if cost > 0:
            self.busy.append(Busy(dev.index, "originator", start, end, (rid,), self.meter.head_rows - rows0))
        live = dev.originator.live_segments().get(rid)
        if live is not None and rid in self.traces:
            self.traces[rid].peak_segments = max(self.traces[rid].peak_segments, live)
        self._dispatch(dev, actions, end)
        return end

    # ---- messages -------------------------------------------------------------------------
    def _dispatch(self, dev: _Device, actions: list[Action], t: float) -> None:
        for d in interpret(actions):
            self._carry(dev, d, t)

    @staticmethod
    def wire_plan(
        setting: str,
        profile: Profile,
        link: LinkModel,
        dtype: torch.dtype,
        stages: int,
        compute_scale: float = 1.0,
        layers: Sequence[int] | None = None,
    ) -> list[torch.dtype]:
        """Per stage, the dtype its hidden states cross its outgoing link as: the daemon's rule
        (:func:`meshd.ring.wire.link_dtype`) applied to the profile's row (its width and float bytes, which
        are what the simulated links carry), the link's bandwidth and the stage's simulated curve (``layers``
        per stage, by default an even split), so ``auto`` decides here as it would on those devices; a float
        link carries the float the real model sends."""
        float_wire = torch.float32 if dtype == torch.float32 else torch.float16  # as the runtime sends
        profile_float = torch.float16 if profile.wire_bytes == 2 else torch.float32
        per_byte = 8 / link.bandwidth if math.isfinite(link.bandwidth) else None
        plan = [
            link_dtype(
                setting,
                profile_float,
                hidden_size=profile.hidden,
                seconds_per_byte=per_byte,
                stage_curve=profile.stage_cost(n, compute_scale),
            )
            for n in (layers or [r.n_layers for r in LayerRange.split(profile.n_layers, stages)])
        ]
        return [torch.int8 if d == torch.int8 else float_wire for d in plan]

    def _route(self, dev: _Device, out: Segment, t: float, queue: int) -> None:
        out.hidden = as_received(out.hidden, dev.wire)
        self._carry(dev, forward(out, dev.stage, len(self.stage_devices), queue), t)

    def _carry(self, dev: _Device, d: Delivery, t: float) -> None:
        """Put delivery ``d`` from ``dev`` on the simulated wires at ``t`` (the client hears at once)."""
        if isinstance(d, ToStage):
            self._send(dev.index, self.stage_devices[d.index], d.message, self._nbytes(d.message, dev.wire), t)
        elif isinstance(d, ToEveryStage):
            nbytes = self._nbytes(d.message, dev.wire)
            for s in self.stage_devices:
                self._send(dev.index, s, d.message, nbytes, t)
        elif isinstance(d, ToOriginator):
            self._send(dev.index, int(d.origin.removeprefix("dev")), d.message, self._nbytes(d.message, dev.wire), t)
        else:
            self._to_client(d, t)

    def _to_client(self, d: ToClient, t: float) -> None:
        a, tr = d.event, self.traces[d.event.request_id]
        if isinstance(a, Emit):
            tr.tokens.extend(a.tokens)
            tr.emits.append((t, len(a.tokens)))
        else:
            tr.finish, tr.reason, tr.error, tr.stats = t, a.reason, a.error, a.stats

    def _nbytes(self, msg: RingMessage, wire: torch.dtype | None) -> int:
        """Bytes ``msg`` occupies on a link of ``wire``: token rows, hidden-state rows at the profile's width
        (int8: a byte per value and a fp32 scale per 32 values), or ids only."""
        if isinstance(msg, Result) or (isinstance(msg, Segment) and msg.hidden is not None):
            hidden = self.profile.hidden
            row = QuantizedRows.row_bytes(hidden) if wire == torch.int8 else hidden * self.profile.wire_bytes
            return SEGMENT_META_BYTES + len(msg.node_ids) * (ROW_META_BYTES + row)
        if isinstance(msg, Segment):
            return SEGMENT_META_BYTES + len(msg) * (ROW_META_BYTES + TOKEN_BYTES)
        if isinstance(msg, Prune):
            return SEGMENT_META_BYTES + 4 * (len(msg.keep) + len(msg.commit))
        return SEGMENT_META_BYTES  # a close

    def _send(self, src: int, dst: int, msg: RingMessage, nbytes: int, t: float) -> None:
        if src == dst:
            dev = self.devices[dst]
            if dev.stepping and dev.worker is not None and not isinstance(msg, Result):
                dev.worker.handle(msg)  # the originator's message to its own stage, queued for this step's forward
            else:
                self._at(t, self._deliver, dev, msg)
            return
        start = max(t, self._wire_free.get((src, dst), 0.0))
        free = start + self.link.wire_seconds(nbytes)
        self._wire_free[(src, dst)] = free
        self._at(free + self.link.latency, self._deliver, self.devices[dst], msg)

    def _deliver(self, dev: _Device, msg: RingMessage) -> None:
        if isinstance(msg, Result):
            dev.results.append(msg)
        else:
            dev.worker.handle(msg)
        if isinstance(msg, (Segment, Result)):
            self._wake(dev)


# ---- runs over many prompts ---------------------------------------------------------------
def summarize_traces(results: Iterable[SimResult]) -> dict:
    """Figures for one mode over the request traces of several runs: totals over totals, like
    ``bench.summarize_runs``."""
    results = list(results)
    traces = [t for r in results for t in r.requests.values()]
    done = [t for t in traces if t.reason in ("length", "stop")]
    toks = sum(t.new_tokens for t in done)
    dec_t = sum(max(t.new_tokens - 1, 0) for t in done)
    dec_s = sum(t.decode_seconds for t in done)
    e2e_s = sum(t.seconds for t in done)
    rounds = sum(t.stats.rounds for t in done if t.stats)
    per_round = sum(sum(t.stats.per_round) for t in done if t.stats)
    nodes = sum(t.stats.verified_nodes for t in done if t.stats)
    trees = sum(t.stats.trees for t in done if t.stats)
    waits = [w for t in done if t.stats for w in t.stats.first_tokens_seconds]
    accepted = sum(t.stats.accepted_drafts for t in done if t.stats)
    span = sum(r.makespan for r in results)
    busy = [sum(x) for x in zip(*(r.stage_busy() for r in results))] if results else []
    tpot = [t.tpot for t in done]  # NaN for one-token answers, which percentile skips
    return {
        "requests": len(traces),
        "failed": len(traces) - len(done),
        "tokens": toks,
        "decode_tokens_per_s": dec_t / dec_s if dec_s > 0 else 0.0,
        "tokens_per_s": toks / e2e_s if e2e_s > 0 else 0.0,
        "throughput": toks / span if span > 0 else 0.0,
        "mean_accepted": per_round / rounds if rounds else 0.0,
        "nodes_per_round": nodes / rounds if rounds else 0.0,
        # a tree: from a fresh root until its walk can go no further; flow's slots cut it into several rounds
        "tokens_per_tree": per_round / trees if trees else 0.0,
        "first_tokens_ms": 1e3 * statistics.fmean(waits) if waits else math.nan,
        "ttft_mean": statistics.fmean(t.ttft for t in done) if done else math.nan,
        "ttft_p50": percentile([t.ttft for t in done], 50),
        "ttft_p95": percentile([t.ttft for t in done], 95),
        "tpot_p50": percentile(tpot, 50),
        "tpot_p95": percentile(tpot, 95),
        "utilisation": [b / span if span > 0 else 0.0 for b in busy],
        "rows_verified": nodes,
        "rows_accepted": accepted,
        "peak_segments": max((t.peak_segments for t in done), default=0),
        # the originator's drafting (on the simulated device's clock), per token
        "draft_s_per_token": sum(t.stats.draft_seconds for t in done if t.stats) / toks if toks else 0.0,
        "tree_ends": sum_tree_ends(t.stats.tree_ends for t in done if t.stats),
    }


def run_modes(
    make_sim: Callable[[str], Simulation],
    prompts: list[list[int]],
    modes: Sequence[str],
    *,
    max_tokens: int,
    eos: Iterable[int] = (),
    temperature: float = 0.0,
    rate: float = 0.0,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[SimResult]]:
    """Every prompt in every mode (labels as :func:`parse_variant` reads them; ``make_sim(label)`` builds
    the mesh for one). ``rate`` 0: one request at a time (batch 1, FlowSpec's setting), modes
    interleaved per prompt, each on a mesh that carries over what the one before it measured
    (:meth:`Simulation.carry_over`), as ``meshd bench``'s daemons serve one request after another;
    ``rate`` > 0: each mode's prompts arrive as one Poisson stream."""
    eos, out = frozenset(eos), {m: [] for m in modes}
    labels = labels or [f"p{i}" for i in range(len(prompts))]

    def request(i: int, label: str) -> Request:
        mode = parse_variant(label)[0]
        return Request(f"{label}-{labels[i]}", prompts[i], max_tokens, mode, Sampling(temperature), seed, eos)

    t_wall = time.perf_counter()
    if rate <= 0:
        last: Simulation | None = None
        for i in range(len(prompts)):
            for mode in modes:
                sim = make_sim(mode)
                if last is not None:
                    sim.carry_over(last)
                last = sim
                sim.add(request(i, mode))
                res = sim.run()
                out[mode].append(res)
                if progress:
                    tr = next(iter(res.requests.values()))
                    s = summarize_traces([res])
                    progress(
                        f"[{i * len(modes) + modes.index(mode) + 1}/{len(prompts) * len(modes)}] "
                        f"{labels[i]:<20} {mode:<5} {tr.new_tokens:4d} tok  {s['decode_tokens_per_s']:7.2f} "
                        f"tok/s simulated  {s['mean_accepted']:.2f} tok/round  "
                        f"(wall {time.perf_counter() - t_wall:.0f}s)"
                    )
        return out
    for mode in modes:
        sim = make_sim(mode)
        n_orig = len(sim.origin_device)
        for i, at in enumerate(poisson_arrivals(len(prompts), rate, seed)):
            sim.add(request(i, mode), at, origin=i % n_orig)
        out[mode].append(sim.run())
        if progress:
            s = summarize_traces(out[mode])
            progress(
                f"{mode:<5} {len(prompts)} requests at {rate:g}/s: {s['throughput']:.2f} tok/s simulated "
                f"throughput, TTFT p50 {s['ttft_p50']:.2f}s (wall {time.perf_counter() - t_wall:.0f}s)"
            )
    return out


def ratios(summary: dict[str, dict], key: str = "decode_tokens_per_s") -> dict[str, float]:
    """flow (and each flow@N) over chunk and ar, and chunk over ar."""
    flows = [m for m in summary if parse_variant(m)[0] == "flow"]
    out = {}
    for a, b in [(f, base) for f in flows for base in ("chunk", "ar")] + [("chunk", "ar")]:
        if a in summary and b in summary and summary[b][key] > 0:
            out[f"{a}/{b}"] = summary[a][key] / summary[b][key]
    return out


def simulation_table(summary: dict[str, dict], rate: float) -> str:
    """The markdown table; every figure is simulated, and says so."""
    util = lambda s: "/".join(f"{u:.2f}" for u in s["utilisation"])  # noqa: E731
    if rate > 0:
        lines = [
            "| mode | throughput tok/s (simulated) | TTFT p50/p95 s (simulated) | "
            "per-token p50/p95 ms (simulated) | tokens/round | nodes/round | stage utilisation (simulated) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {s['throughput']:.2f} | {s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | "
            f"{s['tpot_p50'] * 1e3:.0f} / {s['tpot_p95'] * 1e3:.0f} | {s['mean_accepted']:.2f} | "
            f"{s['nodes_per_round']:.1f} | {util(s)} |"
            for m, s in summary.items()
        ]
        key = "throughput"
    else:
        lines = [
            "| mode | decode tok/s (simulated) | end-to-end tok/s (simulated) | tokens/round | nodes/round | "
            "tokens/tree (ms to its first, simulated) | rows accepted/computed | segments in flight (peak) | "
            "TTFT s (simulated) | stage busy fraction (simulated) | draft ms/token (simulated) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {s['decode_tokens_per_s']:.2f} | {s['tokens_per_s']:.2f} | {s['mean_accepted']:.2f} | "
            f"{s['nodes_per_round']:.1f} | {s['tokens_per_tree']:.2f} ({s['first_tokens_ms']:.0f}) | "
            f"{s['rows_accepted']}/{s['rows_verified']} | {s['peak_segments']} | "
            f"{s['ttft_mean']:.3f} | {util(s)} | {s['draft_s_per_token'] * 1e3:.2f} |"
            for m, s in summary.items()
        ]
        key = "decode_tokens_per_s"
    rs = ratios(summary, key)
    if (why := tree_ends_line({m: s["tree_ends"] for m, s in summary.items()})) is not None:
        lines += ["", why]
    if rs:
        lines += ["", "ratios (simulated): " + ", ".join(f"{k} {v:.2f}x" for k, v in rs.items())]
        if "flow/chunk" in rs:
            lines.append(
                f"reference (measured, published): FlowSpec flow/Chunk-PP {FLOWSPEC_7B_FLOW_OVER_CHUNK}x "
                "(LLaMA2-chat 7B, 5 Jetson boards, T=0, 256 tokens)"
            )
    return "\n".join(lines)
