"""How long a segment takes around the ring, learned from the segments themselves (sans-IO).

The continuous pipeline needs two times to decide how many segments of a request to keep in flight
and how big to make them:

- ``latency(m)``: from sending a segment of m rows to verifying it, with nothing ahead of it: every
  stage's forward over m rows, plus per hop the link's latency and the wire time of m rows, plus the
  originator's own work on it (LM head, verification, drafting);
- ``step(m)``: the slowest single step such a segment passes through, which is how often the ring
  can take a new one: one stage's forward, one hop's wire time, or the originator's work per segment.
  An originator that is also a stage's device (meshd: any peer originates, in the same torch thread
  as its stage) does both one after the other, so there that step is the stage's forward plus the
  originator's work.

``slots(m) = ceil(latency(m) / step(m))`` segments keep every step busy. The compute part comes from the
stages' published cost curves; the link part (``hop + wire * m`` summed over the hops) is not
configured but fitted online from the send and return times of segments that went around alone,
so a real link's speed is measured. Times come from the clock the caller reads; nothing here reads one.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from models.budget import CostCurve

MAX_ROWS = 256  # the widest segment the curves below are tabulated for
# the narrowest prefill chunk worth a forward of its own: below it a segment's handling outside the forward,
# which the stages' curves do not hold, outweighs what pipelining saves (2 CPU daemons, 900-row prompts:
# 9-row chunks 5 % slower than 64-row ones)
MIN_PREFILL_ROWS = 16
UNMEASURED_PREFILL_ROWS = 64  # the widest prefill chunk before the links are measured


@dataclass
class _Sent:
    at: float
    rows: int
    alone: bool  # nothing else of this request was in flight: its round trip is a clean latency sample


class RingTimer:
    """Online model of the ring's latency and throughput for one originator.

    ``memory`` is the weight the past keeps per new sample (the link part is a least-squares fit of
    ``extra(m) = a + b * m`` with exponential forgetting); ``prior`` is how many samples' worth of
    weight the prior (a free link) starts with, so one noisy sample cannot swing the model.
    """

    def __init__(
        self,
        stage_curves: Sequence[CostCurve],
        *,
        memory: float = 0.9,
        prior: float = 1.0,
        local: int | None = None,
    ):
        if not stage_curves:
            raise ValueError("a ring needs at least one stage")
        if local is not None and not 0 <= local < len(stage_curves):
            raise ValueError(f"local stage {local}: the ring has stages 0..{len(stage_curves) - 1}")
        # the stage that runs on the originator's own device (None: a device of its own), whose forwards
        # and the originator's work share one thread
        self.local = stage_curves[local] if local is not None else None
        self.hops = len(stage_curves)  # stage 0 ... last stage, then back to the originator
        ts = sorted({1, MAX_ROWS, *(t for c in stage_curves for t in c.ts)})
        self.compute = CostCurve({t: sum(c(t) for c in stage_curves) for t in ts})
        self.slowest = CostCurve({t: max(c(t) for c in stage_curves) for t in ts})
        # the widest forward every stage's curve was measured at: wider ones are extrapolated
        self.measured_rows = min(max(c.ts) for c in stage_curves)
        self.memory = memory
        # decayed sufficient statistics of (rows, extra seconds) samples; the prior is "no link cost"
        self._w, self._x, self._y, self._xx, self._xy = prior, prior * 1.0, 0.0, prior * 1.0, 0.0
        self.origin_seconds = 0.0  # the originator's work per segment (head, verification, drafting)
        self._work_seen = False
        self.samples = 0
        self._sent: dict[Hashable, _Sent] = {}

    # ---- observations ---------------------------------------------------------------------
    def sent(self, key: Hashable, rows: int, at: float, alone: bool) -> None:
        self._sent[key] = _Sent(at, rows, alone)

    def returned(self, key: Hashable, at: float) -> float | None:
        """Segment ``key`` came back at ``at``: its round trip (None for an unknown key)."""
        s = self._sent.pop(key, None)
        if s is None:
            return None
        trip = at - s.at
        if s.alone:
            self._fit(s.rows, trip - self.compute(s.rows) - self.origin_seconds)
        return trip

    def dropped(self, key: Hashable) -> None:
        """Segment ``key`` will not come back (every row pruned): no sample."""
        self._sent.pop(key, None)

    def carry_link(self, other: RingTimer) -> None:
        """Start from what ``other`` (a timer of the same ring) has fitted of its links, as a daemon's timer
        knows them from the requests it served before."""
        self._w, self._x, self._y, self._xx, self._xy = other._w, other._x, other._y, other._xx, other._xy
        self.samples = other.samples

    def originator_work(self, seconds: float) -> None:
        """One segment's worth of originator work was measured (exponential average)."""
        if self._work_seen:
            self.origin_seconds = self.memory * self.origin_seconds + (1.0 - self.memory) * seconds
        else:
            self.origin_seconds, self._work_seen = seconds, True

    def _fit(self, rows: int, extra: float) -> None:
        d = self.memory
        self._w, self._x, self._y = d * self._w + 1, d * self._x + rows, d * self._y + extra
        self._xx, self._xy = d * self._xx + rows * rows, d * self._xy + rows * extra
        self.samples += 1

    # ---- the model --------------------------------------------------------------------------
    def link(self) -> tuple[float, float]:
        """(seconds per segment, seconds per row) the links add to a round trip, summed over the hops;
        never negative (noise cannot make a link faster than free)."""
        w, x, y, xx, xy = self._w, self._x, self._y, self._xx, self._xy
        den = w * xx - x * x
        b = (w * xy - x * y) / den if den > 1e-9 * w * xx else 0.0
        b = max(0.0, b)
        a = max(0.0, (y - b * x) / w)
        return a, b

    def latency(self, rows: int) -> float:
        a, b = self.link()
        return self.compute(rows) + a + b * rows + self.origin_seconds

    def step(self, rows: int) -> float:
        _, b = self.link()
        own = self.origin_seconds + (self.local(rows) if self.local is not None else 0.0)
        return max(self.slowest(rows), b * rows / self.hops, own, 1e-9)

    def prefill_chunks(self, rows: int, widest: int = MAX_ROWS) -> int:
        """How many near-equal chunks a prefill of ``rows`` rows should be cut into: the count whose last
        chunk is modelled back soonest when they are sent back to back. The first chunk takes the ring's
        latency (without the originator's work: a prefill's rows are only stored), each further one a
        slowest step behind it (a stage's forward or a hop's wire time), so a flat, memory-bound curve
        sends a prompt whole (a forward over 200 rows costs what one row costs) and a steep one cuts it
        where pipelining the stages saves more than the extra forwards cost. Chunks hold at most
        ``widest`` rows and no more than every stage's curve was measured at (a daemon measures up to 64
        rows; past that, a CPU's forward grows faster than the curve's last slope says), and, where the
        prompt allows, at least :data:`MIN_PREFILL_ROWS`. Until a segment has gone around alone the links
        are unknown (the fit's prior is a free link), and a wide chunk would pay every hop's wire time in
        turn: then chunks hold at most :data:`UNMEASURED_PREFILL_ROWS`."""
        if rows <= 0:
            return 0
        widest = min(widest, self.measured_rows)
        if not self.samples:
            widest = min(widest, UNMEASURED_PREFILL_ROWS)
        a, b = self.link()
        fewest = math.ceil(rows / max(1, widest))
        most = max(fewest, rows // MIN_PREFILL_ROWS)
        best_n, best_s = fewest, math.inf
        for n in range(fewest, most + 1):
            c = math.ceil(rows / n)
            step = max(self.slowest(c), b * c / self.hops)
            seconds = self.compute(c) + a + b * c + (n - 1) * step
            if seconds < best_s * (1 - 1e-9):
                best_n, best_s = n, seconds
        return best_n

    def slots(self, rows: int, most: int) -> int:
        """Segments in flight that keep the slowest step busy, from 1 to ``most``."""
        return max(1, min(most, math.ceil(self.latency(rows) / self.step(rows) - 1e-9)))

    def latency_curve(self) -> CostCurve:
        """``latency`` as a cost curve, for sizing a segment that must come back fast."""
        return CostCurve({t: self.latency(t) for t in (1, 2, 4, 8, 16, 32, 64, 128, MAX_ROWS)})

    def step_curve(self) -> CostCurve:
        """``step`` as a cost curve, for sizing a segment that only has to keep the ring busy."""
        return CostCurve({t: self.step(t) for t in (1, 2, 4, 8, 16, 32, 64, 128, MAX_ROWS)})
