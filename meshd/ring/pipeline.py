"""The mesh without sockets: stages as local objects, driven by the same scheduler as the daemon.

Tests use it to check every mode against plain greedy decoding; ``meshd generate --stages K``
uses it to compare modes on one machine. Stages run one after another here (one process), so
it shows correctness and round counts, not pipelined wall-clock speed; the simulator adds time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshd.ring.interpreter import Delivery, ToClient, ToEveryStage, ToOriginator, ToStage, forward, interpret
from meshd.ring.messages import PREFIX_MISS
from meshd.ring.scheduler import Action, Emit, Originator, Request
from meshd.ring.validate import FrameRejected
from meshd.ring.worker import StageWorker
from models.budget import CostCurve
from models.drafters import Drafter
from models.engine import Stats
from models.prefixcache import PrefixBook
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    stats: Stats | None = None
    error: str | None = None


class InProcessPipeline:
    """``stages[0]`` receives what the originator sends; the last stage's output goes back to it."""

    def __init__(
        self,
        originator: Originator,
        workers: list[StageWorker],
        on_emit: Callable[[str, list[int]], None] | None = None,
    ):
        self.originator, self.workers, self.on_emit = originator, workers, on_emit
        self.outcomes: dict[str, Outcome] = {}

    def dispatch(self, actions: list[Action]) -> None:
        for d in interpret(actions):
            self._deliver(d)

    def _deliver(self, d: Delivery) -> None:
        if isinstance(d, ToStage):
            try:
                self.workers[d.index].handle(d.message)
            except FrameRejected as exc:
                if exc.code != PREFIX_MISS:
                    raise
                self.dispatch(self.originator.prefix_miss(exc.request_id))
        elif isinstance(d, ToEveryStage):
            for w in self.workers:
                w.handle(d.message)
        elif isinstance(d, ToOriginator):  # the tokens and prune first, then the next round's draft
            self.dispatch(self.originator.verify_result(d.message))
            self.dispatch(self.originator.follow_up(d.message.request_id))
        else:
            self._to_client(d)

    def _to_client(self, d: ToClient) -> None:
        a, o = d.event, self.outcomes.setdefault(d.event.request_id, Outcome())
        if isinstance(a, Emit):
            o.tokens.extend(a.tokens)
            if self.on_emit:
                self.on_emit(a.request_id, a.tokens)
        else:
            o.reason, o.stats, o.error = a.reason, a.stats, a.error

    def submit(self, req: Request) -> None:
        self.outcomes[req.request_id] = Outcome()
        self.dispatch(self.originator.submit(req))

    def step(self) -> bool:
        """Every stage once, in ring order, then the originator's idle work; whether anything ran."""
        busy = False
        for k, w in enumerate(self.workers):
            for out in w.step():
                busy = True
                self._deliver(forward(out, k, len(self.workers), w.rows_besides(out.request_id)))
        if self.originator.idle_work():  # after the stages' steps, with their segments in flight
            busy = True
            self.dispatch(self.originator.idle())
        return busy

    def lose_ring(self) -> None:
        """Every stage is gone with what it held (the mesh lost a peer): live requests pause."""
        self.workers = []
        self.dispatch(self.originator.on_ring_lost())

    def new_ring(self, workers: list[StageWorker], curves: Sequence[CostCurve]) -> None:
        """A new ring of ``workers`` (fresh, possibly split otherwise): paused requests resume on it."""
        self.workers = workers
        self.dispatch(self.originator.on_ring(curves))

    def run(self, max_steps: int = 1_000_000) -> dict[str, Outcome]:
        """Step every stage in ring order until no work is left."""
        for _ in range(max_steps):
            if not self.step():
                break
        for rid, o in self.outcomes.items():
            if o.reason is None:
                o.reason, o.error = "error", f"request {rid} stalled with no work in the ring"
        return self.outcomes


def build_local_pipeline(
    source: ModelSource,
    n_stages: int,
    drafter_factory: Callable[[], Drafter] | None,
    dtype: str = "fp32",
    curves: CostCurve | Sequence[CostCurve] | None = None,
    full: Stage | None = None,
    prefix_bytes: int = 0,
    **originator_kw: Any,
) -> InProcessPipeline:
    """Cut one loaded model (``full``, or loaded from ``source``) into ``n_stages`` in-process
    stages sharing its weights.

    ``curves`` are the stages' cost curves, one per stage; a single whole-model curve gives each
    stage a share proportional to its layer count, and none a made-up whole-model curve.
    ``prefix_bytes``: each stage keeps this many bytes of finished requests' KV for reuse (0: off).
    """
    full = full or Stage.load(source, dtype=dtype)
    workers, curves = local_stages(full, n_stages, curves, prefix_bytes)
    if prefix_bytes:
        originator_kw.setdefault("prefix_book", PrefixBook(prefix_bytes))
    orig = Originator(full, drafter_factory, curves, **originator_kw)
    return InProcessPipeline(orig, workers)


def local_stages(
    full: Stage, n_stages: int, curves: CostCurve | Sequence[CostCurve] | None = None, prefix_bytes: int = 0
) -> tuple[list[StageWorker], list[CostCurve]]:
    """``full`` cut into ``n_stages`` fresh workers sharing its weights, and their cost curves (see
    :func:`build_local_pipeline`)."""
    n = full.cfg.n_layers
    ranges = LayerRange.split(n, n_stages)
    workers = [
        StageWorker(full.slice(r), embed=full.embed if r.first == 0 else None, prefix_bytes=prefix_bytes)
        for r in ranges
    ]
    if curves is None:
        curves = [CostCurve({1: r.n_layers / n, 64: 2 * r.n_layers / n}) for r in ranges]
    elif isinstance(curves, CostCurve):
        curves = [CostCurve({t: curves(t) * r.n_layers / n for t in curves.ts}) for r in ranges]
    return workers, list(curves)
