"""``meshd train-draft --time-budget``: one wall-clock budget for the whole run, split between its phases.

The run has three phases: generating self-distilled data (the target answers prompts), training the
head on it, and the held-out report. With a budget, each gets a deadline on one clock that starts
when the command does (model loading counts):

- generation stops at ``GENERATION_SHARE`` of the budget, or earlier once ``--tokens`` are stored;
- training runs until the report's reserve begins (everything generation left unused rolls over to
  it), its learning-rate schedule annealed by time so the head it stops with is a finished one;
- the report gets ``REPORT_SHARE`` at the end, only when a report will run (Spec-Bench given); with
  less than ``MIN_REPORT_SECONDS`` left it is skipped, otherwise cut to what fits.

Why 60 / 30 / 10: a head learns more from more distinct answers than from more passes over the same
ones, and data is the expensive half on a CPU (each answer token is a forward of the whole target,
while training touches one layer): the shipped head's run spent 2241 s generating and 850 s training
(72 : 28, ``models/heads/smollm2-135m-instruct/report.json``). Generation keeps the larger share but
not all of it, so training still gets at least a third of the budget for a few passes, and data
stored by an earlier run (generation is resumable) leaves its share to training. The report only
measures the head, so it gets the smallest share and is the first thing cut.

Nothing here imports torch: the command line parses durations with it before loading anything.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GENERATION_SHARE = 0.6
REPORT_SHARE = 0.1
MIN_REPORT_SECONDS = 20.0
"""Below this the held-out report (its rollouts and replay) could not measure anything worth keeping."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``2h``, ``1h30m`` or a bare number of seconds; refuses zero and garbage."""
    spec = text.strip().lower().replace(" ", "")
    try:
        seconds = float(spec)
    except ValueError:
        parts = _PART.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise ValueError(f"duration {text!r}: expected e.g. 90s, 30m, 2h or 1h30m") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"duration {text!r}: must be a positive, finite time")
    return seconds


def format_duration(seconds: float) -> str:
    """``1h05m``, ``12m30s``, ``45s``: how progress lines state a share of the budget."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class TimeBudget:
    """Deadlines (on ``clock``) for each phase of one run; ``report`` says whether a report phase exists."""

    seconds: float
    report: bool
    clock: Callable[[], float] = time.perf_counter
    start: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.clock()

    @property
    def report_reserve(self) -> float:
        return REPORT_SHARE * self.seconds if self.report else 0.0

    @property
    def generation_deadline(self) -> float:
        return self.start + GENERATION_SHARE * self.seconds

    @property
    def training_deadline(self) -> float:
        return self.end - self.report_reserve

    @property
    def end(self) -> float:
        return self.start + self.seconds

    def left(self, deadline: float | None = None) -> float:
        """Seconds until ``deadline`` (default: the end of the budget), never negative."""
        return max(0.0, (self.end if deadline is None else deadline) - self.clock())

    def spent(self) -> float:
        return self.clock() - self.start

    def over(self, deadline: float) -> Callable[[], bool]:
        """A stop test for a loop: true once ``deadline`` has passed."""
        return lambda: self.clock() >= deadline

    def report_fits(self) -> bool:
        """Whether the held-out report still has time enough to say anything (else it is skipped)."""
        return self.report and self.left() >= MIN_REPORT_SECONDS

    def describe(self) -> str:
        """The split, as the first progress line states it."""
        gen = GENERATION_SHARE * self.seconds
        text = (
            f"time budget {format_duration(self.seconds)}: generation up to {format_duration(gen)} "
            f"({GENERATION_SHARE:.0%}), training until {format_duration(self.seconds - self.report_reserve)} "
            "plus what generation leaves unused"
        )
        if self.report:
            return text + f"; held-out report the last {format_duration(self.report_reserve)} ({REPORT_SHARE:.0%})"
        return text + "; no held-out report (no Spec-Bench file)"
