"""Ring messages on the wire: the one mapping between :mod:`meshd.ring.messages` and codec messages.

The field schemas are registered in :mod:`peers.codec` (the mesh layer validates every frame
before the daemon sees it); this module is the only place that knows which ring message becomes
which codec message and back. Request ids are strings in the ring and unsigned 64-bit ints in
the frame envelope; the plan epoch is the link's business, not the ring's.
"""

from __future__ import annotations

from typing import Any

import torch

from meshd.ring.messages import Close, Failure, Prune, Result, RingMessage, Segment
from peers.codec import Message

# codec message types that carry ring messages (the daemon subscribes to these on the mesh)
MESSAGE_TYPES = ("segment", "prune", "result", "close", "error")
MAX_REASON = 500  # characters of a failure's reason that travel: enough to act on, too few to flood


def to_message(msg: RingMessage, wire_dtype: torch.dtype) -> Message:
    """``msg`` as a codec message; hidden states travel as ``wire_dtype``."""
    if not isinstance(msg, (Segment, Prune, Result, Close, Failure)):
        raise TypeError(f"not a ring message: {type(msg).__name__}")
    rid = int(msg.request_id)
    if isinstance(msg, Segment):
        body: dict[str, Any] = {
            "origin": msg.origin or "",
            "nodes": msg.node_ids,
            "parents": msg.parents,
            "positions": msg.positions,
            "commit": msg.commit,
        }
        if msg.hidden is not None:
            body["hidden"] = msg.hidden.to(wire_dtype)
        else:
            body["tokens"] = msg.tokens
        return Message("segment", body, request_id=rid)
    if isinstance(msg, Prune):
        return Message("prune", {"upto": msg.upto, "keep": msg.keep, "commit": msg.commit}, request_id=rid)
    if isinstance(msg, Result):
        body = {"nodes": msg.node_ids, "hidden": msg.hidden.to(wire_dtype), "queue": msg.stage_queue}
        return Message("result", body, request_id=rid)
    if isinstance(msg, Failure):
        return Message("error", {"code": msg.code, "message": msg.reason[:MAX_REASON]}, request_id=rid)
    return Message("close", {}, request_id=rid)


def from_message(msg: Message) -> RingMessage:
    """The ring message a decoded (schema-checked) codec message carries.

    Decoded tensors share memory with the frame (see :mod:`peers.codec`); they are cloned here
    because stages and the originator keep and slice them.
    """
    rid = str(msg.request_id)
    b = msg.body
    if msg.type == "segment":
        hidden = b.get("hidden")
        return Segment(
            rid,
            list(b["nodes"]),
            list(b["parents"]),
            list(b["positions"]),
            tokens=b.get("tokens"),
            hidden=hidden.clone() if hidden is not None else None,
            commit=bool(b.get("commit", False)),
            origin=b["origin"] or None,
        )
    if msg.type == "prune":
        return Prune(rid, int(b["upto"]), list(b["keep"]), list(b["commit"]))
    if msg.type == "result":
        return Result(rid, list(b["nodes"]), b["hidden"].clone(), int(b.get("queue") or 0))
    if msg.type == "close":
        return Close(rid)
    if msg.type == "error":  # a stage's refusal, or the mesh's (a stale epoch); request id 0: about no request
        return Failure(rid, b["code"], b["message"][:MAX_REASON])
    raise ValueError(f"{msg.type!r} is not a ring message")
