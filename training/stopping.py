"""SIGTERM and Ctrl-C end a ``meshd train-draft`` run the way its time budget does: at the next point
where the work done so far can be kept.

Why: a run takes hours, and its loops already stop cleanly for a time budget (generation keeps every
finished answer, the feature prefill keeps the sequences it made, training saves a checkpoint at the
batch it reached). Killing the process instead loses up to two minutes of answers and a shard of
features, and interrupting the optimiser between its tensor updates could leave a checkpoint no run
should resume from. So a first SIGTERM (systemd, ``kill``) or Ctrl-C only asks the loops to stop; a
second one interrupts at once, for a user who will not wait. Where a phase has nothing to keep
(loading the model, writing a prompt set) the run sets ``graceful`` off and the first signal
interrupts at once. A Ctrl-C the shell told the process to ignore (a background job) stays ignored.

Nothing here imports torch.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from training.log import log


class StopRequest:
    """Whether a stop was asked for (call it: the loops' stop test), and by which signal (``name``)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        """Whether the running phase keeps its work on a stop (else a signal interrupts at once)."""

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + self.signum if self.signum is not None else 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None or not self.graceful:  # stop now
            self.signum = signum
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(self.exit_code)
        self.signum = signum
        log(
            f"{signal.Signals(signum).name}: stopping at the next point where the work done so far is kept "
            "(send it again to stop at once, losing what is in progress)"
        )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Route SIGTERM and SIGINT here while the block runs (main thread only, as Python requires);
        the handlers before are restored after."""
        wanted = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            wanted.append(signal.SIGINT)
        before = {s: signal.signal(s, self._handle) for s in wanted}
        try:
            yield self
        finally:
            for s, h in before.items():
                signal.signal(s, h)


def either(*tests: Callable[[], bool]) -> Callable[[], bool]:
    """One stop test, true when any of ``tests`` is (a signal's stop request, a time budget's deadline)."""
    return lambda: any(t() for t in tests)
