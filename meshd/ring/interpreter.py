"""The one reading of the scheduler's actions: where each goes, as plain data.

The daemon's runtime, the in-process pipeline and the simulator all drive the same
:class:`~meshd.ring.scheduler.Originator` and :class:`~meshd.ring.worker.StageWorker`; they differ
only in how a message crosses to a stage (a link, a method call, a simulated wire) and in what the
client is (an API handle, an outcome record, a trace). So the meaning of an action is decided here
once, and each driver only moves the deliveries:

- a segment goes to the ring's first stage,
- a prune or a close goes to every stage,
- emitted tokens and the finish go to the client,
- a stage's output goes to the next stage, or from the last stage back to its originator.

No I/O and no clock here; the order of the deliveries is the order of the actions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshd.ring.messages import Close, Prune, Result, Segment
from meshd.ring.scheduler import Action, CloseSessions, Emit, Finish, SendPrune, SendSegment


@dataclass(frozen=True)
class ToStage:
    """``message`` for the stage at ``index`` in ring order."""

    index: int
    message: Segment


@dataclass(frozen=True)
class ToEveryStage:
    """``message`` for every stage of the ring, in ring order."""

    message: Prune | Close


@dataclass(frozen=True)
class ToOriginator:
    """A result for the peer that originated the request (``origin`` None: this peer)."""

    origin: str | None
    message: Result


@dataclass(frozen=True)
class ToClient:
    """Tokens or the outcome for whoever submitted the request."""

    event: Emit | Finish


Delivery = ToStage | ToEveryStage | ToOriginator | ToClient


def interpret(actions: Iterable[Action]) -> list[Delivery]:
    """The deliveries that carry out ``actions``, in the same order."""
    out: list[Delivery] = []
    for a in actions:
        if isinstance(a, SendSegment):
            out.append(ToStage(0, a.segment))
        elif isinstance(a, SendPrune):
            out.append(ToEveryStage(a.prune))
        elif isinstance(a, CloseSessions):
            out.append(ToEveryStage(Close(a.request_id, a.keep, a.commit, a.epoch)))
        elif isinstance(a, (Emit, Finish)):
            out.append(ToClient(a))
        else:
            raise TypeError(f"not a scheduler action: {type(a).__name__}")
    return out


def forward(out: Segment, stage: int, n_stages: int, queue_rows: int) -> ToStage | ToOriginator:
    """Where stage ``stage``'s output ``out`` goes next: the next stage, or (from the last stage) a
    result to the originator, reporting ``queue_rows`` (the other requests' rows at the last stage,
    :meth:`~meshd.ring.worker.StageWorker.rows_besides`) as load."""
    if stage + 1 < n_stages:
        return ToStage(stage + 1, out)
    return ToOriginator(out.origin, Result.of(out, queue_rows))
