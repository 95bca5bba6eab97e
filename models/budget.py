"""How many drafted nodes a round should verify: a cost curve and observed acceptance decide.

A forward over T tokens costs cost(T). Verifying the n best nodes of a candidate tree yields
about 1 + alpha * sum(p_i) tokens, where p_i = exp(cumulative draft log-prob) and alpha
calibrates the drafter's confidence against what the target actually accepted. Picking n to
maximise tokens per second makes trees big on flat (GPU) curves and small on steep (CPU)
ones, and falls back to plain decoding (n = 0) when drafts stop paying for themselves.
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

    def __init__(self, cost: CostCurve, max_nodes: int = 64, alpha: float = 0.5, memory: float = 0.8):
        self.cost, self.max_nodes = cost, max_nodes
        self.alpha = alpha  # prior: drafts are half as good as they claim until shown otherwise
        self.memory = memory
        self._pred = 1.0
        self._seen = alpha
        self._last: int | None = None

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
