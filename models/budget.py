"""How many drafted nodes a round should verify: a cost curve and observed acceptance decide.

A forward over T tokens costs cost(T). Verifying the n best nodes of a candidate tree yields
about 1 + alpha * sum(p_i) tokens, where p_i = exp(cumulative draft log-prob) and alpha
calibrates the drafter's confidence against what the target actually accepted. Picking n to
maximise tokens per second makes trees big on flat (GPU) curves and small on steep (CPU)
ones, and falls back to plain decoding (n = 0) when drafts stop paying for themselves.

Choosing n = 0 after drafting still pays for the draft. :meth:`TreeBudget.draft_now` decides
before drafting whether a round should draft at all (the rule is in its docstring), so a request
whose drafts do not pay (a weak head, an unfamiliar prompt) decodes plainly and probes again
now and then, and ``spec`` stays within a few percent of plain decoding.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping

from models.tree import Tree


class CostCurve:
    """Seconds of one forward over T tokens, interpolated linearly between measured points."""

    def __init__(self, points: Mapping[int, float]):
        if not points:
            raise ValueError("a cost curve needs at least one measured point")
        items = sorted((int(t), float(s)) for t, s in points.items())
        self.ts = [t for t, _ in items]
        self.secs = [s for _, s in items]

    def __call__(self, t: float) -> float:
        ts, ss = self.ts, self.secs
        if len(ts) == 1:
            return ss[0] * max(t, 1) / ts[0]
        if t <= ts[0]:
            return ss[0]
        i = bisect.bisect_left(ts, t)
        if i >= len(ts):  # extrapolate with the last segment's slope
            i = len(ts) - 1
        t0, t1, s0, s1 = ts[i - 1], ts[i], ss[i - 1], ss[i]
        return s0 + (s1 - s0) * (t - t0) / (t1 - t0)

    def to_dict(self) -> dict[int, float]:
        return dict(zip(self.ts, self.secs))

    def __add__(self, other: CostCurve) -> CostCurve:
        ts = sorted(set(self.ts) | set(other.ts))
        return CostCurve({t: self(t) + other(t) for t in ts})


class TreeBudget:
    """Per-request choice of the verified tree size, learning the drafter's calibration as it goes."""

    def __init__(
        self,
        cost: CostCurve,
        max_nodes: int = 64,
        alpha: float = 0.5,
        memory: float = 0.8,
        margin: float = 0.03,
        probe_min: int = 4,
        probe_max: int = 64,
    ):
        self.cost, self.max_nodes = cost, max_nodes
        self.alpha = alpha  # prior: drafts are half as good as they claim until shown otherwise
        self.memory = memory
        self._pred = 1.0
        self._seen = alpha
        self._last: int | None = None
        # the drafting gate (see draft_now): recency-weighted tokens and model-time of drafting rounds
        self.margin, self.probe_min, self.probe_max = margin, probe_min, probe_max
        self._tokens = 0.0
        self._time = 0.0
        self.drafting = True  # optimistic start: the first round drafts and measures
        self._interval = probe_min  # plain rounds before the next probe while drafting is off
        self._plain = 0  # plain rounds since drafting was last tried
        # measured verification seconds over the curve's prediction: a curve measured on a busier (or
        # idler) machine, or in other units, still compares right with the draft's measured seconds
        self._measured = 0.0
        self._predicted = 0.0

    def choose(
        self,
        tree: Tree,
        overhead: float = 0.0,
        cost: CostCurve | None = None,
        load_rows: int = 0,
        load_gain: float = 0.0,
    ) -> int:
        """Number of drafted nodes (besides the root) worth verifying from this candidate tree.

        ``load_rows``/``load_gain``: rows other requests put through the same forwards and the
        tokens those rows yield. Maximising the shared rate (load_gain + gain) / cost(load_rows + n)
        is FASER's rule: an idle ring lets a tree grow until its marginal node stops paying for
        itself; a loaded ring, already busy at a steeper point of the curve, gets smaller trees.
        """
        cost = cost or self.cost
        order = tree.score_order()[1 : self.max_nodes + 1]
        best_n, gain = 0, load_gain + 1.0
        best_rate = gain / (overhead + cost(load_rows + 1))
        for n, i in enumerate(order, start=1):
            gain += self.alpha * math.exp(tree.scores[i])
            rate = gain / (overhead + cost(load_rows + n + 1))
            if rate > best_rate:
                best_n, best_rate = n, rate
        self._last = best_n
        return best_n

    def keep_hint(self) -> int:
        """How many nodes the next draft should be able to supply: twice the last choice, so the
        tree can still grow when acceptance rises, and the whole budget before the first round."""
        return self.max_nodes if self._last is None else min(self.max_nodes, self._last + max(4, self._last // 2))

    def expected(self, tree: Tree) -> float:
        return sum(math.exp(s) for s in tree.scores[1:])

    def observe(self, predicted: float, accepted: int) -> None:
        """Fold one round in: ``predicted`` = sum of the verified nodes' draft probabilities."""
        if predicted <= 0:
            return
        self._pred = self.memory * self._pred + predicted
        self._seen = self.memory * self._seen + accepted
        self.alpha = min(2.0, max(0.02, self._seen / self._pred))

    # ---- the drafting gate ------------------------------------------------------------------------
    def draft_rate(self) -> float | None:
        """Tokens per second of model time this request's recent drafting rounds achieved (None: no data)."""
        return self._tokens / self._time if self._time > 0 else None

    def plain_rate(self) -> float:
        """Tokens per second of plain decoding: one token per forward over one row."""
        return 1.0 / self.cost(1)

    def draft_now(self) -> bool:
        """Whether this round should draft (True) or decode plainly with the target alone (False).

        The rule: a drafting round that verified ``rows`` rows (the root included) after drafting
        for ``overhead`` seconds cost ``overhead / scale + cost(rows)`` in the curve's units (``scale``:
        measured verification seconds per unit the curve predicts, so a curve measured on a busier
        machine still weighs the draft right) and yielded ``accepted + 1`` tokens; a plain round
        costs ``cost(1)`` and yields one. The request keeps exponentially weighted
        sums of its drafting rounds' tokens and costs, every round (plain ones too) multiplying the
        old sums by ``memory``, so the newest drafting round counts most. Drafting stays on while
        those sums' rate beats ``(1 + margin) / cost(1)``. When it is off, the request decodes
        plainly and drafts one probe round after ``probe_min`` plain rounds; each probe that
        fails to turn drafting back on doubles the wait (up to ``probe_max``), so a drafter that
        never pays costs about ``(overhead + cost(rows) - cost(1)) / (probe_max * cost(1))`` of
        plain decoding's time in the long run, and one that starts paying again (the text turns
        to copying, the head meets familiar ground) is back within ``probe_max`` rounds.
        """
        if self.drafting:
            return True
        return self._plain >= self._interval

    def scale(self) -> float:
        """Measured verification time per unit of the cost curve's prediction (1.0 until measured)."""
        return self._measured / self._predicted if self._predicted > 0 else 1.0

    def curve_units(self, seconds: float) -> float:
        """Wall-clock ``seconds`` (a draft's) in the cost curve's units, at the scale measured so far."""
        return seconds / self.scale()

    def _verified(self, rows: int, seconds: float | None) -> None:
        if seconds is not None and seconds > 0:
            self._measured = 0.9 * self._measured + seconds
            self._predicted = 0.9 * self._predicted + self.cost(rows)

    def record_plain(self, seconds: float | None = None) -> None:
        """One round decoded without drafting (``seconds``: its verification's wall time, if measured)."""
        self._verified(1, seconds)
        self._tokens *= self.memory
        self._time *= self.memory
        self._plain += 1

    def record_draft(self, *, rows: int, tokens: int, overhead: float, seconds: float | None = None) -> None:
        """One drafting round: ``rows`` verified rows (root included), ``tokens`` emitted (accepted
        drafts + 1), ``overhead`` the wall-clock seconds spent drafting, ``seconds`` the verification's
        (when measured: they calibrate the curve's scale, see :meth:`curve_units`)."""
        self._verified(rows, seconds)
        probing = not self.drafting
        self._tokens = self.memory * self._tokens + tokens
        self._time = self.memory * self._time + self.curve_units(overhead) + self.cost(rows)
        self._plain = 0
        self.drafting = self._tokens / self._time > (1.0 + self.margin) * self.plain_rate()
        if self.drafting:
            self._interval = self.probe_min
        elif probing:  # a failed probe: wait twice as long before the next one
            self._interval = min(self.probe_max, 2 * self._interval)
