"""Ring messages on the wire: the one mapping between :mod:`meshd.ring.messages` and codec messages.

The field schemas are registered in :mod:`peers.codec` (the mesh layer validates every frame
before the daemon sees it); this module is the only place that knows which ring message becomes
which codec message and back. Request ids are strings in the ring and unsigned 64-bit ints in
the frame envelope; the plan epoch is the link's business, not the ring's.

It also owns how precise hidden states are on a link (:func:`link_dtype`): a float dtype, or
``torch.int8`` for int8 with a scale per 32 values (:class:`peers.codec.QuantizedRows`), and what the
receiver computes with after a hop (:func:`as_received`), so a hop that stays on this device
changes the numbers exactly as a real link would.
"""

from __future__ import annotations

from typing import Any

import torch

from meshd.ring.messages import Close, Failure, PrefixRef, Prune, Result, RingMessage, Segment
from models.budget import CostCurve
from peers.codec import WIRE_ACTIVATIONS, Message, QuantizedRows

# codec message types that carry ring messages (the daemon subscribes to these on the mesh)
MESSAGE_TYPES = ("segment", "prune", "result", "close", "error")
MAX_REASON = 500  # characters of a failure's reason that travel: enough to act on, too few to flood

TYPICAL_ROWS = 8  # the segment size auto judges a link by: a draft tree's width or a few flow steps
AUTO_INT8_RATIO = 0.1  # auto: int8 once fp16 wire time exceeds this fraction of the stage's forward time


def link_dtype(
    setting: str,
    float_dtype: torch.dtype,
    *,
    hidden_size: int,
    seconds_per_byte: float | None,
    stage_curve: CostCurve | None,
) -> torch.dtype:
    """The dtype hidden states cross one link as; ``torch.int8`` means int8 with a scale per 32 values.

    ``fp16`` sends ``float_dtype`` (fp16, or fp32 for a model computing in fp32); ``int8`` always
    quantizes. ``auto`` picks int8 when ``TYPICAL_ROWS`` rows of ``hidden_size`` in ``float_dtype``
    take longer on the link (``seconds_per_byte``, from its bandwidth) than ``AUTO_INT8_RATIO`` times
    the sending stage's forward over ``TYPICAL_ROWS`` rows (``stage_curve``): then the link is a real
    share of each hop, and halving its bytes shortens every round. With the bandwidth or the curve
    unknown it keeps ``float_dtype``. Quantizing a segment costs far less than its forward, so it is
    not weighed.
    """
    if setting not in WIRE_ACTIVATIONS:
        raise ValueError(f"wire activations {setting!r}: expected one of {', '.join(WIRE_ACTIVATIONS)}")
    if setting == "int8":
        return torch.int8
    if setting == "fp16" or seconds_per_byte is None or stage_curve is None:
        return float_dtype
    itemsize = torch.empty((), dtype=float_dtype).element_size()
    wire = TYPICAL_ROWS * hidden_size * itemsize * seconds_per_byte
    return torch.int8 if wire > AUTO_INT8_RATIO * stage_curve(TYPICAL_ROWS) else float_dtype


def on_the_wire(hidden: torch.Tensor, wire_dtype: torch.dtype) -> torch.Tensor | QuantizedRows:
    """What a codec message carries for ``hidden`` on a link of ``wire_dtype``."""
    return QuantizedRows.quantize(hidden) if wire_dtype == torch.int8 else hidden.to(wire_dtype)


def as_received(hidden: torch.Tensor, wire_dtype: torch.dtype) -> torch.Tensor:
    """What the receiver of ``hidden`` computes with after a link of ``wire_dtype``: the same values a
    real link delivers (int8 dequantizes to fp32; the receiver casts to its own dtype as for any hop)."""
    return QuantizedRows.quantize(hidden).dequantize() if wire_dtype == torch.int8 else hidden.to(wire_dtype)


def to_message(msg: RingMessage, wire_dtype: torch.dtype) -> Message:
    """``msg`` as a codec message; hidden states travel as ``wire_dtype`` (``torch.int8``: int8 with
    a scale per 32 values, see :func:`on_the_wire`)."""
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
            body["hidden"] = on_the_wire(msg.hidden, wire_dtype)
        else:
            body["tokens"] = msg.tokens
        if msg.prefix is not None:
            body["prefix"] = [msg.prefix.epoch, msg.prefix.length, msg.prefix.hash]
        if msg.restart:
            body["restart"] = True
        if msg.first:
            body["first"] = True
        return Message("segment", body, request_id=rid)
    if isinstance(msg, Prune):
        return Message("prune", {"upto": msg.upto, "keep": msg.keep, "commit": msg.commit}, request_id=rid)
    if isinstance(msg, Result):
        body = {"nodes": msg.node_ids, "hidden": on_the_wire(msg.hidden, wire_dtype), "queue": msg.stage_queue}
        return Message("result", body, request_id=rid)
    if isinstance(msg, Failure):
        return Message("error", {"code": msg.code, "message": msg.reason[:MAX_REASON]}, request_id=rid)
    body = {"keep": list(msg.keep), "commit": list(msg.commit), "keep_epoch": msg.epoch} if msg.keep else {}
    return Message("close", body, request_id=rid)


def from_message(msg: Message) -> RingMessage:
    """The ring message a decoded (schema-checked) codec message carries.

    Decoded tensors share memory with the frame (see :mod:`peers.codec`); they are cloned here
    because stages and the originator keep and slice them. Row-quantized hidden states become fp32
    (:func:`received`); each receiver then casts them to the dtype it computes in.
    """
    rid = str(msg.request_id)
    b = msg.body
    if msg.type == "segment":
        hidden = b.get("hidden")
        prefix = b.get("prefix")
        if prefix is not None and len(prefix) != 3:
            raise ValueError(f"a segment's prefix is [epoch, length, hash], not {len(prefix)} numbers")
        return Segment(
            rid,
            list(b["nodes"]),
            list(b["parents"]),
            list(b["positions"]),
            tokens=b.get("tokens"),
            hidden=received(hidden) if hidden is not None else None,
            commit=bool(b.get("commit", False)),
            origin=b["origin"] or None,
            prefix=PrefixRef(*prefix) if prefix is not None else None,
            restart=bool(b.get("restart", False)),
            first=bool(b.get("first", False)),
        )
    if msg.type == "prune":
        return Prune(rid, int(b["upto"]), list(b["keep"]), list(b["commit"]))
    if msg.type == "result":
        return Result(rid, list(b["nodes"]), received(b["hidden"]), int(b.get("queue") or 0))
    if msg.type == "close":
        return Close(rid, tuple(b.get("keep") or ()), tuple(b.get("commit") or ()), int(b.get("keep_epoch") or 0))
    if msg.type == "error":  # a stage's refusal, or the mesh's (a stale epoch); request id 0: about no request
        return Failure(rid, b["code"], b["message"][:MAX_REASON])
    raise ValueError(f"{msg.type!r} is not a ring message")


def received(hidden: torch.Tensor | QuantizedRows) -> torch.Tensor:
    """A decoded hidden-state field as a tensor the ring may keep: dequantized, or a private copy."""
    return hidden.dequantize() if isinstance(hidden, QuantizedRows) else hidden.clone()
