"""A discrete-event simulator of the mesh: the real scheduler and stage workers on a simulated clock.

Why: this 2-core machine cannot show what a ring of five Jetson boards would do, and loopback
daemons here share two cores. The simulator runs the very objects the daemon runs (the sans-IO
:class:`~meshd.ring.scheduler.Originator`, one :class:`~meshd.ring.worker.StageWorker` per stage) with real
tensors, so every draft, accept/reject decision, tree size, prune and batch is the real one; only
the clock is simulated. Each forward is computed for real but *charged* by a cost model:

- **stages**: one device per stage, serial (one torch executor, as in the daemon). A device loops
  like ``Runtime._compute_once``: collect the results that have arrived, run one batched forward
  over its queue (``take_batch``/``run``), then the originator's calls for those results, then
  route the forward's outputs. A forward over T rows costs ``profile.stage_cost(layers)(T)``.
- **originator**: its calls (submit, on_result) cost the LM head over the rows it reads plus the
  draft time; with a ``measured`` profile, the call's own CPU time (``time.thread_time``; run with
  one torch thread). It lives on a stage's device (meshd: any peer originates, sharing its executor)
  or on a device of its own (FlowSpec's layout: a head device with no layers).
- **links**: one per ordered pair of devices, FIFO; a message occupies the wire for
  ``bytes * 8 / bandwidth`` and arrives ``latency`` later (latency overlaps, bandwidth serialises,
  as ``peers/link.py``'s emulation does). Segments carry ``rows * hidden * wire_bytes`` plus
  metadata; prunes and closes are small and go to every stage, so they may overtake segments (the
  workers prune by node id, so that is fine).
- **cores** (optional): a pool of CPU cores shared by every device, for calibrating against
  loopback daemons that share this machine's two cores; non-preemptive, first come first served.

Decisions never depend on the simulated clock, so output tokens equal the in-process pipeline's
(and plain greedy decoding's); the tree budget sees the *simulated* stage curves, so a flat GPU
profile gets GPU-sized trees. The one leak: the scheduler times drafting with the wall clock for
its budget's ``overhead`` term, which is small against the simulated ring cost.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meshd.lab.loadtest import percentile, poisson_arrivals
from meshd.ring.messages import Segment
from meshd.ring.pipeline import split_layers
from meshd.ring.scheduler import CloseSessions, Emit, Finish, Originator, Request, SendPrune, SendSegment
from meshd.ring.worker import StageWorker
from models.budget import CostCurve
from models.engine import Stats
from models.profile import monotone
from models.stage import Stage, parse_dtype

FLOWSPEC_7B_FLOW_OVER_CHUNK = 1.43  # FlowSpec, LLaMA2-chat 7B, 5 Jetson boards, T=0 (measured, published)
SEGMENT_META_BYTES, ROW_META_BYTES, TOKEN_BYTES = 96, 9, 4  # CBOR frame + ids/parents/positions per row
SIZES = (1, 2, 4, 8, 16, 32, 64)


# ---- links --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    latency: float = 0.0  # seconds, one way
    bandwidth: float = math.inf  # bits per second

    def wire_seconds(self, nbytes: int) -> float:
        return nbytes * 8 / self.bandwidth if math.isfinite(self.bandwidth) else 0.0

    def __str__(self) -> str:
        bw = "inf" if not math.isfinite(self.bandwidth) else f"{self.bandwidth / 1e6:g}mbit"
        return f"{self.latency * 1e3:g}ms/{bw}"


_LAT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}
_BW = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "mbps": 1e6, "gbit": 1e9, "": 1e6}


def parse_link(spec: str) -> Link:
    """``1ms/150mbit``, ``500us/1gbit``, ``0/inf`` (bare numbers: ms and Mbit/s)."""
    lat, _, bw = spec.strip().lower().partition("/")
    m1 = re.fullmatch(r"([0-9.]+)\s*(us|ms|s|)", lat)
    m2 = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|mbps|gbit|)", bw) if bw not in ("", "inf", "0") else None
    if m1 is None or (m2 is None and bw not in ("", "inf", "0")):
        raise ValueError(f"link {spec!r}: expected LATENCY/BANDWIDTH, e.g. 1ms/150mbit or 0/inf")
    bandwidth = float(m2.group(1)) * _BW[m2.group(2)] if m2 else math.inf
    return Link(float(m1.group(1)) * _LAT[m1.group(2)], bandwidth if bandwidth > 0 else math.inf)


# ---- cost profiles ------------------------------------------------------------------------
def flat(seconds: float) -> CostCurve:
    """A constant curve (CostCurve scales a single point proportionally, so give it two)."""
    return CostCurve({1: seconds, 1 << 16: seconds})


def scaled(curve: CostCurve, k: float) -> CostCurve:
    return CostCurve({t: s * k for t, s in zip(curve.ts, curve.secs)})


@dataclass
class DraftCost:
    """What one draft call costs the originator: ``per_call + per_level * depth`` of the drafted tree,
    or, with ``measured_scale``, the drafter's measured CPU time here times that factor."""

    per_call: float = 0.0
    per_level: float = 0.0
    measured_scale: float | None = None


@dataclass
class Profile:
    """The devices being simulated: the target's shape and how long its pieces take.

    ``layer(T)``: seconds per decoder layer for a forward over T rows; ``fixed(T)``: per-forward
    overhead that does not grow with the layer count; ``head(T)``: final norm + LM head over T rows.
    ``originator_measured``: charge the originator's calls their measured CPU time instead of
    ``head`` + ``draft`` (the "this device" profile, where the real calls run on the real device).
    """

    name: str
    n_layers: int
    hidden: int
    layer: CostCurve
    head: CostCurve
    fixed: CostCurve = field(default_factory=lambda: flat(0.0))
    draft: DraftCost = field(default_factory=DraftCost)
    wire_bytes: int = 2
    originator_measured: bool = False
    note: str = ""

    def stage_cost(self, n_layers: int, scale: float = 1.0) -> CostCurve:
        ts = sorted({1, *self.layer.ts, *self.fixed.ts})
        return CostCurve({t: scale * (self.fixed(t) + n_layers * self.layer(t)) for t in ts})

    def to_json(self) -> dict:
        ms = lambda c: {str(t): round(s * 1e3, 6) for t, s in zip(c.ts, c.secs)}  # noqa: E731
        d = self.draft
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "layer_ms": ms(self.layer),
            "fixed_ms": ms(self.fixed),
            "head_ms": ms(self.head),
            "wire_bytes": self.wire_bytes,
            "draft": {"measured_scale": d.measured_scale}
            if d.measured_scale is not None
            else {"per_call_ms": d.per_call * 1e3, "per_level_ms": d.per_level * 1e3},
            "originator": "measured" if self.originator_measured else "model",
            "note": self.note,
        }

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        """The JSON form of :meth:`to_json` (curves in ms, keyed by T); ``fixed_ms``/``draft`` optional."""
        curve = lambda key: CostCurve({int(t): float(v) / 1e3 for t, v in d[key].items()})  # noqa: E731
        dr = d.get("draft", {})
        draft = (
            DraftCost(measured_scale=dr["measured_scale"])
            if "measured_scale" in dr
            else DraftCost(dr.get("per_call_ms", 0.0) / 1e3, dr.get("per_level_ms", 0.0) / 1e3)
        )
        try:
            return cls(
                d.get("name", "custom"),
                int(d["n_layers"]),
                int(d["hidden"]),
                curve("layer_ms"),
                curve("head_ms"),
                curve("fixed_ms") if "fixed_ms" in d else flat(0.0),
                draft,
                int(d.get("wire_bytes", 2)),
                d.get("originator", "model") == "measured",
                d.get("note", ""),
            )
        except KeyError as e:
            raise ValueError(f"profile is missing {e}; needs n_layers, hidden, layer_ms and head_ms") from None


def jetson_orin_7b() -> Profile:
    """A 7B Llama (32 layers, hidden 4096, fp16) on Jetson AGX Orin-class boards: an ASSUMPTION, not a measurement.

    Derivation: batch-1 decoding is memory-bound. One layer holds ~202 M parameters = 404 MB in fp16;
    at ~60 % of the AGX Orin's 204.8 GB/s (~123 GB/s) reading it takes ~3.3 ms, plus ~0.3 ms of kernel
    launches from the ARM cores: 3.6 ms per layer at T=1, i.e. ~115 ms for a whole 7B forward.
    A token adds ~0.4 GFLOP per layer; at ~20 TFLOP/s of usable fp16 tensor throughput that is 0.02 ms,
    mostly hidden under the memory time until T ~ 150, so the slope is small: 0.012 ms per extra row
    (T=64: 4.36 ms per layer, ~140 ms for the model, +21 %). LM head (32000 x 4096, 262 MB): 2.2 ms +
    0.01 ms/row. Draft (EAGLE-2 class: one decoder layer + the LM head's top-k per level): 1 ms per call
    + 5 ms per tree level, whatever drafter actually supplies the tokens here. Wire: fp16 activations.
    """
    per_layer = {t: 3.6e-3 + 0.012e-3 * (t - 1) for t in (1, 64, 256)}
    head = {t: 2.2e-3 + 0.01e-3 * (t - 1) for t in (1, 64, 256)}
    return Profile(
        "jetson-orin-7b",
        32,
        4096,
        CostCurve(per_layer),
        CostCurve(head),
        flat(0.0),
        DraftCost(1e-3, 5e-3),
        2,
        False,
        "ASSUMED projection profile (not measured): 7B Llama, fp16, Jetson AGX Orin-class memory-bound "
        "decoding, 3.6 ms/layer at T=1 + 0.012 ms/row, LM head 2.2 ms, draft 1 ms + 5 ms/level",
    )


BUILTIN = {"jetson-orin-7b": jetson_orin_7b}


def _cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time of ``fn`` in this thread: robust to other jobs on the machine, which only
    delay us (wall time) without adding to our CPU time. Meaningful with one torch thread."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


@torch.inference_mode()
def _forward_curve(stage: Stage, sizes: Sequence[int], context: int, repeats: int) -> dict[int, float]:
    cache = stage.new_cache(context + max(sizes))
    stage.forward_one(
        torch.randn(context, stage.cfg.hidden_size, dtype=stage.dtype) * 0.1, cache, torch.arange(context)
    )
    out = {}
    for t in sizes:
        x = torch.randn(t, stage.cfg.hidden_size, dtype=stage.dtype) * 0.1
        pos = torch.arange(context, context + t)

        def once(x=x, pos=pos) -> None:
            cache.truncate(context)
            stage.forward_one(x, cache, pos)

        out[t] = _cpu_seconds(once, repeats)
    return out


@torch.inference_mode()
def measure_profile(
    full: Stage,
    fingerprint: str | None = None,
    *,
    sizes: Sequence[int] = SIZES,
    context: int = 128,
    repeats: int = 3,
    refresh: bool = False,
) -> Profile:
    """This device's profile for ``full``'s model, measured with ONE torch thread in CPU time.

    One thread because loopback daemons run one thread each; CPU time because this machine is
    shared. Per-layer and fixed costs come from two slices (all layers, two layers) so a stage of
    any size is ``fixed + layers * per_layer``; each curve is made non-decreasing by its suffix
    minimum (noise only ever adds time). Cached per (model, dtype) under ~/.cache/meshd.
    """
    dt = str(full.dtype).removeprefix("torch.")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshd" / "profiles"
    path = base / f"sim-{fingerprint}-{dt}-t1.json" if fingerprint else None
    if path and path.is_file() and not refresh:
        return Profile.from_json(json.loads(path.read_text()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = full.cfg.n_layers
        small_n = min(2, n)
        whole = _forward_curve(full, sizes, context, repeats)
        small = _forward_curve(
            Stage(
                full.cfg,
                0,
                small_n,
                full.layers[:small_n],
                dtype=full.dtype,
                inv_freq=full.inv_freq,
                rope_scale=full.rope_scale,
            ),
            sizes,
            context,
            repeats,
        )
        head = {
            t: _cpu_seconds(lambda t=t: full.logits(torch.randn(t, full.cfg.hidden_size, dtype=full.dtype)), repeats)
            for t in sizes
        }
    finally:
        torch.set_num_threads(threads)
    per_layer = monotone({t: max(whole[t] - small[t], 0.0) / max(n - small_n, 1) for t in sizes})
    fixed = monotone({t: max(small[t] - small_n * per_layer[t], 0.0) for t in sizes})
    head = monotone(head)
    prof = Profile(
        "this-device",
        n,
        full.cfg.hidden_size,
        CostCurve(per_layer),
        CostCurve(head),
        CostCurve(fixed),
        DraftCost(measured_scale=1.0),
        4 if full.dtype == torch.float32 else 2,
        True,
        f"measured on this machine: {dt}, 1 torch thread, CPU time (context {context})",
    )
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof.to_json()))
    return prof


def load_profile(spec: str, full: Stage | None = None, fingerprint: str | None = None) -> Profile:
    """A built-in name, ``this-device`` (measured here, needs ``full``) or a JSON file."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec == "this-device":
        if full is None:
            raise ValueError("the this-device profile is measured on the loaded model")
        return measure_profile(full, fingerprint)
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"profile {spec!r}: not one of {[*BUILTIN, 'this-device']} and no such file")
    return Profile.from_json(json.loads(p.read_text()))


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
        """(stage, start, end, request ids, rows) of every stage forward, for the utilisation plot."""
        return [
            (self.stage_devices.index(b.device), b.start, b.end, ",".join(b.requests), b.rows)
            for b in self.busy
            if b.kind == "stage"
        ]


# ---- the simulator ------------------------------------------------------------------------
class _DraftMeter:
    def __init__(self) -> None:
        self.seconds, self.levels, self.calls = 0.0, 0, 0


class _TimedDrafter:
    """Wraps a request's drafter to charge its CPU time and tree depth to the simulator."""

    def __init__(self, inner, meter: _DraftMeter):
        self.inner, self.meter = inner, meter

    def reset(self, prompt: list[int]) -> None:
        self.inner.reset(prompt)

    def draft(self, context: list[int], **kw):
        t0 = time.thread_time()
        tree = self.inner.draft(context, **kw)
        self.meter.seconds += time.thread_time() - t0
        self.meter.calls += 1
        self.meter.levels += max(tree.depth)
        return tree

    def accept(self, context: list[int], hidden) -> None:
        t0 = time.thread_time()
        self.inner.accept(context, hidden)
        self.meter.seconds += time.thread_time() - t0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@dataclass
class _Device:
    index: int
    worker: StageWorker | None = None
    stage: int | None = None
    cost: CostCurve | None = None
    originator: Originator | None = None
    busy: bool = False
    submits: deque = field(default_factory=deque)
    results: deque = field(default_factory=deque)


class Simulation:
    """One simulated mesh. ``origins``: for each originator, the stage whose device hosts it, or None
    for a device of its own (FlowSpec's head device). Requests go to ``origins[i]`` by ``add(..., origin=i)``."""

    def __init__(
        self,
        full: Stage,
        drafter_factory,
        *,
        stages: int,
        profile: Profile,
        link: Link,
        origins: Sequence[int | None] = (0,),
        compute_scale: float = 1.0,
        cores: int | None = None,
        max_batch_rows: int = 256,
        **originator_kw,
    ):
        if not origins:
            raise ValueError("a simulation needs at least one originator")
        self.profile, self.link, self.scale = profile, link, compute_scale
        self.wire = torch.float32 if full.dtype == torch.float32 else torch.float16  # as the runtime sends
        self._now = self._clock = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self._wire_free: dict[tuple[int, int], float] = {}
        self._cores = [0.0] * cores if cores else None
        self.meter = _DraftMeter()
        real = split_layers(full.cfg.n_layers, stages)
        sim = split_layers(profile.n_layers, stages)
        self.devices: list[_Device] = []
        curves = []
        for k, ((a, b), (sa, sb)) in enumerate(zip(real, sim)):
            st = Stage(
                full.cfg, a, b, full.layers[a:b], dtype=full.dtype, inv_freq=full.inv_freq, rope_scale=full.rope_scale
            )
            cost = profile.stage_cost(sb - sa, compute_scale)
            curves.append(cost)
            self.devices.append(
                _Device(
                    k, StageWorker(st, embed=full.embed if a == 0 else None, max_batch_rows=max_batch_rows), k, cost
                )
            )
        self.stage_devices = list(range(stages))
        factory = (lambda: _TimedDrafter(drafter_factory(), self.meter)) if drafter_factory else None
        self.origin_device: list[int] = []
        for o in origins:
            dev = self.devices[o] if o is not None else self._new_device()
            if dev.originator is not None:
                raise ValueError(f"stage {o} already hosts an originator")
            dev.originator = Originator(
                full, factory, curves, clock=lambda: self._clock, origin=f"dev{dev.index}", **originator_kw
            )
            self.origin_device.append(dev.index)
        self.traces: dict[str, RequestTrace] = {}
        self.busy: list[Busy] = []

    def _new_device(self) -> _Device:
        self.devices.append(_Device(len(self.devices)))
        return self.devices[-1]

    @property
    def now(self) -> float:
        return self._now

    # ---- driving ------------------------------------------------------------------------
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
        """One pass of the daemon's compute loop on ``dev``, starting now; the next starts when it ends."""
        t = self._now
        results, dev.results = list(dev.results), deque()
        submits, dev.submits = list(dev.submits), deque()
        worked = bool(results or submits)
        for req in submits:
            t = self._originator_call(dev, t, lambda req=req: dev.originator.submit(req), 0, req.request_id)
        outputs, queue = [], 0
        batch = dev.worker.take_batch() if dev.worker else []
        if batch:
            worked = True
            rows = sum(len(s) for s in batch)
            start, t = self._compute(t, dev.cost(rows))
            outputs = dev.worker.run(batch)  # the real forward, charged by the cost model above
            queue = dev.worker.queued_rows
            self.busy.append(Busy(dev.index, "stage", start, t, tuple(s.request_id for s in batch), rows))
        for seg, q in results:
            t = self._originator_call(
                dev,
                t,
                lambda seg=seg, q=q: dev.originator.on_result(seg, q),
                self._head_rows(dev.originator, seg),
                seg.request_id,
            )
        for out in outputs:
            self._route(dev, out, t, queue)
        if worked:
            self._at(t, self._iterate, dev)
        else:
            dev.busy = False

    def _compute(self, t: float, cost: float) -> tuple[float, float]:
        """Start and end of ``cost`` seconds of compute wanted at ``t`` (waiting for a core if shared)."""
        if self._cores is None:
            return t, t + cost
        i = min(range(len(self._cores)), key=self._cores.__getitem__)
        start = max(t, self._cores[i])
        self._cores[i] = start + cost
        return start, start + cost

    @staticmethod
    def _head_rows(orig: Originator, seg: Segment) -> int:
        """Rows the originator will put through the LM head for ``seg`` (peeks at its live state)."""
        lv = orig.live.get(seg.request_id)
        if lv is None:
            return 0
        if lv.prefill_left:
            return 1 if lv.prefill_left <= set(seg.node_ids) else 0
        return sum(1 for n in seg.node_ids if n in lv.in_flight)

    def _originator_call(self, dev: _Device, t: float, call: Callable[[], list], head_rows: int, rid: str) -> float:
        m = self.meter
        draft0, levels0, calls0 = m.seconds, m.levels, m.calls
        self._clock = t
        c0 = time.thread_time()
        actions = call()
        cpu = time.thread_time() - c0
        p = self.profile
        if p.originator_measured:
            cost = cpu * self.scale
        else:
            d = p.draft
            draft = (
                (m.seconds - draft0) * d.measured_scale
                if d.measured_scale is not None
                else d.per_call * (m.calls - calls0) + d.per_level * (m.levels - levels0)
            )
            cost = (p.head(head_rows) if head_rows else 0.0) * self.scale + draft
        start, end = self._compute(t, cost)
        if cost > 0:
            self.busy.append(Busy(dev.index, "originator", start, end, (rid,), head_rows))
        self._dispatch(dev, actions, end)
        return end

    # ---- messages -------------------------------------------------------------------------
    def _dispatch(self, dev: _Device, actions: list, t: float) -> None:
        for a in actions:
            if isinstance(a, SendSegment):
                seg = a.segment
                nbytes = SEGMENT_META_BYTES + len(seg) * (ROW_META_BYTES + TOKEN_BYTES)
                self._send(dev.index, self.stage_devices[0], ("segment", seg), nbytes, t)
            elif isinstance(a, SendPrune):
                nbytes = SEGMENT_META_BYTES + 4 * (len(a.prune.keep) + len(a.prune.commit))
                for d in self.stage_devices:
                    self._send(dev.index, d, ("prune", a.prune), nbytes, t)
            elif isinstance(a, CloseSessions):
                for d in self.stage_devices:
                    self._send(dev.index, d, ("cancel", a.request_id), SEGMENT_META_BYTES, t)
            elif isinstance(a, Emit):
                tr = self.traces[a.request_id]
                tr.tokens.extend(a.tokens)
                tr.emits.append((t, len(a.tokens)))
            elif isinstance(a, Finish):
                tr = self.traces[a.request_id]
                tr.finish, tr.reason, tr.error, tr.stats = t, a.reason, a.error, a.stats

    def _route(self, dev: _Device, out: Segment, t: float, queue: int) -> None:
        out.hidden = out.hidden.to(self.wire)
        nbytes = SEGMENT_META_BYTES + len(out) * (ROW_META_BYTES + self.profile.hidden * self.profile.wire_bytes)
        if dev.stage + 1 < len(self.stage_devices):
            self._send(dev.index, self.stage_devices[dev.stage + 1], ("segment", out), nbytes, t)
        else:
            self._send(dev.index, int(out.origin.removeprefix("dev")), ("result", (out, queue)), nbytes, t)

    def _send(self, src: int, dst: int, msg: tuple, nbytes: int, t: float) -> None:
        if src == dst:
            self._at(t, self._deliver, self.devices[dst], msg)
            return
        start = max(t, self._wire_free.get((src, dst), 0.0))
        free = start + self.link.wire_seconds(nbytes)
        self._wire_free[(src, dst)] = free
        self._at(free + self.link.latency, self._deliver, self.devices[dst], msg)

    def _deliver(self, dev: _Device, msg: tuple) -> None:
        kind, p = msg
        if kind == "result":
            dev.results.append(p)
        else:
            dev.worker.handle(kind, p)
        if kind in ("segment", "result"):
            self._wake(dev)


# ---- runs over many prompts ---------------------------------------------------------------
def summarize(results: Iterable[SimResult]) -> dict:
    """Figures for one mode over several runs: totals over totals, like ``bench.summarize``."""
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
    span = sum(r.makespan for r in results)
    busy = [sum(x) for x in zip(*(r.stage_busy() for r in results))] if results else []
    tpot = [t.decode_seconds / (t.new_tokens - 1) for t in done if t.new_tokens > 1]
    return {
        "requests": len(traces),
        "failed": len(traces) - len(done),
        "tokens": toks,
        "decode_tokens_per_s": dec_t / dec_s if dec_s > 0 else 0.0,
        "tokens_per_s": toks / e2e_s if e2e_s > 0 else 0.0,
        "throughput": toks / span if span > 0 else 0.0,
        "mean_accepted": per_round / rounds if rounds else 0.0,
        "nodes_per_round": nodes / rounds if rounds else 0.0,
        "ttft_mean": statistics.fmean(t.ttft for t in done) if done else math.nan,
        "ttft_p50": percentile([t.ttft for t in done], 50),
        "ttft_p95": percentile([t.ttft for t in done], 95),
        "tpot_p50": percentile(tpot, 50),
        "tpot_p95": percentile(tpot, 95),
        "utilisation": [b / span if span > 0 else 0.0 for b in busy],
    }


# ---- the command line ---------------------------------------------------------------------
def pick_questions(path: Path, n: int) -> list[dict]:
    """``n`` Spec-Bench questions spread over the categories (round robin, file order within each)."""
    from meshd.lab.bench import load_questions

    rows = load_questions(path, None, per_category=max(1, n))
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    out = [q for group in itertools.zip_longest(*by_cat.values()) for q in group if q is not None]
    return out[:n]


def parse_origins(spec: str, n: int) -> list[int | None]:
    """``own``: originators on devices of their own; ``K``: on stages K, K+1, ... (meshd: any peer)."""
    if spec == "own":
        return [None] * n
    try:
        first = int(spec)
    except ValueError:
        raise ValueError(f"--originator {spec!r}: 'own' or a stage index") from None
    return list(range(first, first + n))


def run_modes(
    make_sim: Callable[[], Simulation],
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
    """Every prompt in every mode. ``rate`` 0: one request at a time (batch 1, FlowSpec's setting),
    modes interleaved per prompt; ``rate`` > 0: each mode's prompts arrive as one Poisson stream."""
    from models.verify import Sampling

    eos, out = frozenset(eos), {m: [] for m in modes}
    labels = labels or [f"p{i}" for i in range(len(prompts))]

    def request(i: int, mode: str) -> Request:
        return Request(f"{mode}-{labels[i]}", prompts[i], max_tokens, mode, Sampling(temperature), seed, eos)

    t_wall = time.perf_counter()
    if rate <= 0:
        for i in range(len(prompts)):
            for mode in modes:
                sim = make_sim()
                sim.add(request(i, mode))
                res = sim.run()
                out[mode].append(res)
                if progress:
                    tr = next(iter(res.requests.values()))
                    s = summarize([res])
                    progress(
                        f"[{i * len(modes) + modes.index(mode) + 1}/{len(prompts) * len(modes)}] "
                        f"{labels[i]:<20} {mode:<5} {tr.new_tokens:4d} tok  {s['decode_tokens_per_s']:7.2f} "
                        f"tok/s simulated  {s['mean_accepted']:.2f} tok/round  "
                        f"(wall {time.perf_counter() - t_wall:.0f}s)"
                    )
        return out
    for mode in modes:
        sim = make_sim()
        n_orig = len(sim.origin_device)
        for i, at in enumerate(poisson_arrivals(len(prompts), rate, seed)):
            sim.add(request(i, mode), at, origin=i % n_orig)
        out[mode].append(sim.run())
        if progress:
            s = summarize(out[mode])
            progress(
                f"{mode:<5} {len(prompts)} requests at {rate:g}/s: {s['throughput']:.2f} tok/s simulated "
                f"throughput, TTFT p50 {s['ttft_p50']:.2f}s (wall {time.perf_counter() - t_wall:.0f}s)"
            )
    return out


def ratios(summary: dict[str, dict], key: str = "decode_tokens_per_s") -> dict[str, float]:
    out = {}
    for a, b in (("flow", "chunk"), ("flow", "ar"), ("chunk", "ar")):
        if a in summary and b in summary and summary[b][key] > 0:
            out[f"{a}/{b}"] = summary[a][key] / summary[b][key]
    return out


def table(summary: dict[str, dict], rate: float) -> str:
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
            "TTFT s (simulated) | stage utilisation (simulated) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {s['decode_tokens_per_s']:.2f} | {s['tokens_per_s']:.2f} | {s['mean_accepted']:.2f} | "
            f"{s['nodes_per_round']:.1f} | {s['ttft_mean']:.3f} | {util(s)} |"
            for m, s in summary.items()
        ]
        key = "decode_tokens_per_s"
    rs = ratios(summary, key)
    if rs:
        lines += ["", "ratios (simulated): " + ", ".join(f"{k} {v:.2f}x" for k, v in rs.items())]
        if "flow/chunk" in rs:
            lines.append(
                f"reference (measured, published): FlowSpec flow/Chunk-PP {FLOWSPEC_7B_FLOW_OVER_CHUNK}x "
                "(LLaMA2-chat 7B, 5 Jetson boards, T=0, 256 tokens)"
            )
    return "\n".join(lines)


# ---- calibration against measured loopback meshes -----------------------------------------
def calibration_specs(record: dict | list) -> list[dict]:
    """Normalise a calibration input to a list of specs.

    Accepted: a spec ``{"stages": K, "link": "1ms/1000mbit", "threads_per_stage": 1, "modes": {"ar": tok_s,
    "chunk": tok_s, "flow": tok_s}}`` with optional ``metric`` ("e2e", tokens over submit-to-finish as
    the daemon's stats count them (default), or "decode"), ``max_tokens``, ``prompts`` (count) or
    ``question_ids``, ``drafter``, ``dtype``, ``originator`` ("own" or a stage index, default 0),
    ``cores`` (default: this machine's), ``compute_scale``; a list of specs; ``{"calibration": [...]}``;
    or a ``meshd bench --backend daemons`` record (``runs/bench-*.json``).
    """
    if isinstance(record, list):
        return [s for r in record for s in calibration_specs(r)]
    if "calibration" in record:
        return calibration_specs(record["calibration"])
    if "config" in record and "summary" in record:  # a meshd bench record
        cfg = record["config"]
        modes = {
            k.split("/", 1)[1]: v["tokens_per_s"]
            for k, v in record["summary"].items()
            if k.startswith("ALL/") and k.split("/", 1)[1] in ("ar", "chunk", "flow")
        }
        qids = list(dict.fromkeys(r["question_id"] for r in record.get("runs", [])))
        return [
            {
                "stages": cfg.get("stages", 1),
                "link": cfg.get("link") or "0/inf",
                "threads_per_stage": cfg.get("threads") or 1,
                "modes": modes,
                "metric": "e2e",
                "max_tokens": cfg.get("max_tokens", 128),
                "question_ids": qids,
                "drafter": cfg.get("drafter"),
                "dtype": cfg.get("dtype"),
                "compute_scale": cfg.get("device_slowdown", 1.0),
            }
        ]
    if "stages" not in record or "modes" not in record:
        raise ValueError("a calibration record needs 'stages' and 'modes' ({mode: measured tokens/s})")
    return [record]


def calibration_rows(spec: dict, simulated: dict[str, float]) -> list[dict]:
    rows = []
    for mode, measured in spec["modes"].items():
        sim = simulated.get(mode)
        if sim is None:
            continue
        rows.append(
            {
                "stages": spec["stages"],
                "link": spec.get("link", "0/inf"),
                "mode": mode,
                "measured": measured,
                "simulated": sim,
                "rel_error": (sim - measured) / measured if measured else math.nan,
            }
        )
    return rows


def fit_scale_and_hop(points: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """Least squares over ``(hops per token, simulated s/token, measured s/token)`` of unshaped-link records:
    measured = scale * simulated + hops * hop. ``hop`` is what a daemon pays per message beyond the wire
    (decode, wake-ups, executor hand-offs); it shows as the gap between meshes of different sizes, which a
    compute factor alone cannot close. A negative fit means no such cost: ``hop`` 0, scale alone."""
    if len({h for h, _, _ in points}) < 2:
        raise ValueError("fitting a per-message overhead needs records of at least two stage counts")
    stt = sum(t * t for _, t, _ in points)
    sth = sum(t * h for h, t, _ in points)
    shh = sum(h * h for h, _, _ in points)
    stm = sum(t * m for _, t, m in points)
    shm = sum(h * m for h, _, m in points)
    det = stt * shh - sth * sth
    scale, hop = (stm * shh - shm * sth) / det, (stt * shm - sth * stm) / det
    if hop < 0:
        return stm / stt, 0.0
    return scale, hop


def calibration_table(rows: list[dict]) -> str:
    lines = ["| stages | link | mode | measured tok/s | simulated tok/s | error |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['stages']} | {r['link']} | {r['mode']} | {r['measured']:.2f} | {r['simulated']:.2f} | "
        f"{r['rel_error'] * 100:+.1f}%{' (fit)' if r.get('fitted') else ''} |"
        for r in rows
    ]
    return "\n".join(lines)


# ---- entry point (``meshd simulate``) -----------------------------------------------------
def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Env:
    """The loaded target, tokenizer and drafters: loaded once, shared by every simulated mesh."""

    def __init__(self, model: str, dtype: str):
        from models.source import ModelSource
        from models.text import stop_ids

        self.source = ModelSource.resolve(model)
        self.full = Stage.load(self.source, dtype=dtype)
        self.tokenizer = self.source.load_tokenizer()
        self.eos = stop_ids(self.tokenizer, self.full.cfg)
        self._factories: dict[str, Callable] = {}

    def factory(self, spec: str):
        from models.drafters import drafter_factory

        if spec == "auto":
            from models.eagle import default_drafter

            spec = default_drafter(self.source)
        if spec not in self._factories:
            self._factories[spec] = drafter_factory(spec, self.full, source=self.source)
        return spec, self._factories[spec]

    def prompts(self, questions: list[dict]) -> list[list[int]]:
        from models.text import encode_messages

        return [encode_messages(self.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]


def _simulate(
    env: _Env,
    questions: list[dict],
    *,
    stages: int,
    profile: Profile,
    link: Link,
    modes: list[str],
    drafter: str,
    max_tokens: int,
    origins: list[int | None],
    compute_scale: float,
    cores: int | None,
    rate: float,
    seed: int,
    temperature: float,
) -> tuple[dict[str, list[SimResult]], str]:
    spec, factory = env.factory(drafter)

    def make() -> Simulation:
        return Simulation(
            env.full,
            factory,
            stages=stages,
            profile=profile,
            link=link,
            origins=origins,
            compute_scale=compute_scale,
            cores=cores,
        )

    labels = [f"q{q['question_id']}-{q['category']}" for q in questions]
    res = run_modes(
        make,
        env.prompts(questions),
        modes,
        max_tokens=max_tokens,
        eos=env.eos,
        temperature=temperature,
        rate=rate,
        seed=seed,
        labels=labels,
        progress=_progress,
    )
    return res, spec


def _calibrate(env: _Env, args, paths: Sequence[Path]) -> int:
    """Simulate each measured mesh and print simulated vs measured tokens/s.

    With ``--fit-scale MODE`` (default ``ar``) one number is fitted first: a factor on every
    compute cost, chosen so MODE matches its measurements (geometric mean over the records). The profile is a
    microbenchmark of bare forwards; a daemon also pays its event loop, executor hand-offs, codec
    and the memory traffic of its neighbours, which scale with the compute it wraps. With ``--fit-hop``
    a second number is fitted with it, from records of two or more mesh sizes: a fixed cost per message
    between devices (what a daemon pays beyond the wire), which a compute factor cannot express because
    a bigger mesh has more hops per token for the same compute. Every other figure in the table is
    then a prediction of the simulator, not a fit.
    """
    from meshd.lab.bench import load_questions

    profile = measure_profile(env.full, env.source.fingerprint)
    specs = [s for p in paths for s in calibration_specs(json.loads(Path(p).read_text()))]
    qs = load_questions(Path(args.questions), None, per_category=1000)

    def run(spec: dict, modes: list[str], scale: float, hop: float = 0.0) -> dict[str, float]:
        ids = spec.get("question_ids")
        questions = (
            [q for q in qs if q["question_id"] in set(ids)]
            if ids
            else pick_questions(Path(args.questions), spec.get("prompts", args.prompts))
        )
        _progress(
            f"calibrating: {spec['stages']} stages, link {spec.get('link', '0/inf')}, {len(questions)} "
            f"prompts, modes {','.join(modes)}, compute x{scale:.3f}"
        )
        want = spec.get("dtype")
        if want not in (None, "auto") and parse_dtype(want) != env.full.dtype:
            _progress(f"warning: the record ran {want}, this simulation {env.full.dtype}; pass --dtype {want}")
        link = parse_link(spec.get("link") or "0/inf")
        res, _ = _simulate(
            env,
            questions,
            stages=spec["stages"],
            profile=profile,
            link=Link(link.latency + hop, link.bandwidth),
            modes=modes,
            drafter=spec.get("drafter") or args.drafter,
            max_tokens=spec.get("max_tokens", 128),
            origins=parse_origins(str(spec.get("originator", 0)), 1),
            compute_scale=spec.get("compute_scale", 1.0) * scale,
            cores=spec.get("cores", os.cpu_count()),
            rate=0.0,
            seed=args.seed,
            temperature=0.0,
        )
        key = "decode_tokens_per_s" if spec.get("metric") == "decode" else "tokens_per_s"
        return {m: summarize(r)[key] for m, r in res.items()}

    scale, hop, fitted = 1.0, 0.0, set()
    fit_mode = getattr(args, "fit_scale", None)
    if fit_mode and fit_mode != "none":
        basis = [s for s in specs if fit_mode in s["modes"]]
        if not basis:
            raise ValueError(f"--fit-scale {fit_mode}: no calibration record measured that mode")
        unshaped = all((s.get("link") or "0/inf") == "0/inf" for s in basis)
        if getattr(args, "fit_hop", False):
            if not unshaped:
                raise ValueError("--fit-hop needs records measured on unshaped links")
            points = []
            for s in basis:
                hops = s["stages"] + (1 if str(s.get("originator", 0)) == "own" else 0)
                points.append((hops, 1 / run(s, [fit_mode], 1.0)[fit_mode], 1 / s["modes"][fit_mode]))
            scale, hop = fit_scale_and_hop(points)
        else:
            # on unshaped links every simulated time is compute, so one step is exact; link time does not scale
            for _ in range(1 if unshaped else 4):
                ratios_ = [run(s, [fit_mode], scale)[fit_mode] / s["modes"][fit_mode] for s in basis]
                step = math.exp(sum(math.log(r) for r in ratios_) / len(ratios_))  # geometric mean over records
                scale *= step
                if abs(step - 1.0) < 0.01:
                    break
        fitted = {(s["stages"], s.get("link") or "0/inf", fit_mode) for s in basis}
        _progress(
            f"fitted compute scale {scale:.3f}"
            + (f" and per-message overhead {hop * 1e3:.2f} ms" if hop else "")
            + f" on {fit_mode} of {len(basis)} record(s)"
        )
    all_rows = []
    for spec in specs:
        rows = calibration_rows(spec, run(spec, list(spec["modes"]), scale, hop))
        for r in rows:
            r["fitted"] = (r["stages"], r["link"], r["mode"]) in fitted
        all_rows += rows
    if args.json:
        print(
            json.dumps(
                {"profile": profile.to_json(), "compute_scale": scale, "hop_overhead_s": hop, "calibration": all_rows}
            )
        )
    else:
        what = "compute scale and a per-message overhead" if getattr(args, "fit_hop", False) else "one factor"
        print(
            f"simulator calibration: profile {profile.note}; compute scale {scale:.3f}"
            + (f", per-message overhead {hop * 1e3:.2f} ms" if hop else "")
            + (
                f" ({what} fitted on {fit_mode} of every record, rows marked 'fit'; the others are predicted)"
                if fitted
                else ""
            )
        )
        print(calibration_table(all_rows))
    return 0


def main(args) -> int:
    """``meshd simulate``: Spec-Bench prompts through a simulated mesh; every figure is simulated."""
    measured = args.profile == "this-device" or args.calibrate_with
    torch.set_num_threads(1 if measured else (args.threads or 1))  # one: no oversubscription on a shared box
    env = _Env(args.model, args.dtype)
    if args.calibrate_with:
        return _calibrate(env, args, [Path(p) for p in args.calibrate_with])
    profile = load_profile(args.profile, env.full, env.source.fingerprint)
    link = parse_link(args.link)
    origins = parse_origins(args.originator, args.originators)
    modes = args.modes.split(",")
    questions = pick_questions(Path(args.questions), args.prompts)
    where = "own device" if origins[0] is None else f"stage {origins[0]}'s device"
    _progress(
        f"simulate: {args.stages} stages x {profile.name}, link {link}, originator on {where}, "
        f"{len(questions)} prompts x {args.max_tokens} tokens, modes {','.join(modes)}"
    )
    _progress(f"profile: {profile.note}")
    res, drafter = _simulate(
        env,
        questions,
        stages=args.stages,
        profile=profile,
        link=link,
        modes=modes,
        drafter=args.drafter,
        max_tokens=args.max_tokens,
        origins=origins,
        compute_scale=args.compute_scale,
        cores=args.cores,
        rate=args.rate,
        seed=args.seed,
        temperature=args.temperature,
    )
    summary = {m: summarize(r) for m, r in res.items()}
    flow = res.get("flow") or next(iter(res.values()))
    record = {
        "label": "simulated",
        "config": {k: v for k, v in vars(args).items() if k != "func"} | {"drafter": drafter},
        "profile": profile.to_json(),
        "summary": summary,
        "ratios": ratios(summary, "throughput" if args.rate > 0 else "decode_tokens_per_s"),
        "flowspec_reference": {"flow/chunk": FLOWSPEC_7B_FLOW_OVER_CHUNK, "label": "measured, published"},
        "timeline": [
            {
                "device": b.device,
                "kind": b.kind,
                "start": b.start,
                "end": b.end,
                "requests": list(b.requests),
                "rows": b.rows,
            }
            for b in flow[0].busy
        ]
        if flow
        else [],
        "requests": [
            {
                "request_id": t.request_id,
                "mode": t.mode,
                "new_tokens": t.new_tokens,
                "ttft": t.ttft,
                "decode_seconds": t.decode_seconds,
                "seconds": t.seconds,
                "reason": t.reason,
                "mean_accepted": t.stats.mean_accepted if t.stats else 0.0,
            }
            for rs in res.values()
            for r in rs
            for t in r.requests.values()
        ],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        _progress(f"record: {args.out}")
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"SIMULATED (not measured): {args.stages} stages, profile {profile.name}, link {link}, originator on "
        f"{where}, drafter {drafter}, {len(questions)} Spec-Bench prompts x {args.max_tokens} tokens, "
        f"T={args.temperature}, acceptance from the real {env.source.name} ({str(env.full.dtype)[6:]})"
    )
    print(f"profile: {profile.note}")
    print(table(summary, args.rate))
    return 0
