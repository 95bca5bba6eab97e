"""Ring messages through the real codec: the one mapping in ``meshd/ring/wire.py``, both directions."""

from __future__ import annotations

import pytest
import torch

from meshd.ring.messages import PROMPT_PARENT, Close, Failure, Prune, Result, Segment
from meshd.ring.wire import MAX_REASON, MESSAGE_TYPES, from_message, to_message
from peers.codec import Codec, Message

CODEC = Codec()


def over_the_wire(msg, wire_dtype=torch.float16):
    return from_message(CODEC.decode(CODEC.encode(to_message(msg, wire_dtype))))


def test_every_ring_message_survives_the_codec():
    tokens = Segment("12", [0, 1], [PROMPT_PARENT, 0], [0, 1], tokens=[5, 6], commit=True, origin="peer-a")
    assert over_the_wire(tokens) == tokens
    h = torch.randn(2, 8)
    hidden = Segment("12", [3, 4], [2, 3], [3, 4], hidden=h, origin="peer-a")
    back = over_the_wire(hidden)
    assert (back.request_id, back.node_ids, back.parents, back.positions) == ("12", [3, 4], [2, 3], [3, 4])
    assert back.tokens is None and not back.commit and back.origin == "peer-a"
    assert back.hidden.dtype == torch.float16 and torch.equal(back.hidden, h.half())  # sent as the wire dtype
    prune = over_the_wire(Prune("7", upto=9, keep=[3, 5], commit=[3]))
    assert (prune.request_id, prune.upto, prune.keep, prune.commit) == ("7", 9, [3, 5], [3])
    assert prune.dead(4) and not prune.dead(5) and not prune.dead(10)
    res = over_the_wire(Result("7", [3, 5], h, stage_queue=11), torch.float32)
    assert (res.request_id, res.node_ids, res.stage_queue) == ("7", [3, 5], 11) and torch.equal(res.hidden, h)
    assert over_the_wire(Close("7")) == Close("7")


def test_codec_types_and_bodies():
    msgs = [
        to_message(Segment("1", [0], [PROMPT_PARENT], [0], tokens=[5]), torch.float32),
        to_message(Prune("1", 0, [], []), torch.float32),
        to_message(Result("1", [0], torch.zeros(1, 4)), torch.float32),
        to_message(Close("1"), torch.float32),
        to_message(Failure("1", "bad_segment", "x" * 600), torch.float32),
    ]
    assert tuple(m.type for m in msgs) == MESSAGE_TYPES
    assert all(m.request_id == 1 for m in msgs)
    assert msgs[3].body == {}
    assert "hidden" not in msgs[0].body and msgs[0].body["tokens"] == [5]  # the first stage embeds
    back = from_message(CODEC.decode(CODEC.encode(msgs[4])))
    assert back == Failure("1", "bad_segment", "x" * MAX_REASON)  # a stage's refusal, its reason bounded


def test_decoded_hidden_states_do_not_share_the_frame():
    frame = CODEC.encode(to_message(Result("1", [0], torch.zeros(1, 4)), torch.float32))
    res = from_message(CODEC.decode(frame))
    res.hidden += 1  # the originator and stages may write; a view of the immutable frame would refuse or alias
    assert torch.equal(res.hidden, torch.ones(1, 4))


def test_not_ring_messages_are_refused():
    with pytest.raises(ValueError, match="'heartbeat' is not a ring message"):
        from_message(Message("heartbeat", {"ts": 1.0}))
    with pytest.raises(TypeError, match="not a ring message"):
        to_message("7", torch.float32)
