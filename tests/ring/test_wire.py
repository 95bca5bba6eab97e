"""Ring messages through the real codec: the one mapping in ``meshd/ring/wire.py``, both directions."""

from __future__ import annotations

import pytest
import torch

from meshd.ring.messages import PROMPT_PARENT, Close, Failure, PrefixRef, Prune, Result, Segment
from meshd.ring.wire import MAX_REASON, MESSAGE_TYPES, as_received, from_message, link_dtype, to_message
from models.budget import CostCurve
from peers.codec import Codec, Message, QuantizedRows

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


def test_the_first_segment_mark_reaches_every_stage():
    """Stages run a round's first segment before the request's queued fillers (ring/worker.py), so the
    mark must cross every hop, not only the originator's, and cost nothing on the others."""
    h = torch.randn(3, 8)
    first = Segment("5", [4, 5, 6], [3, 4, 4], [9, 10, 10], hidden=h, origin="peer-a", first=True)
    assert over_the_wire(first).first
    filler = Segment("5", [7], [5], [11], hidden=h[:1], origin="peer-a")
    assert not over_the_wire(filler).first and "first" not in to_message(filler, torch.float16).body
    assert over_the_wire(Segment("5", [8], [7], [12], tokens=[3], origin="peer-a", first=True)).first


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


def test_int8_hidden_states_cross_as_the_receiver_would_compute_them():
    """int8 on a link: the frame carries q8g32, the receiver gets fp32 ``q * scale``, and a hop that
    stays on the device (``as_received``) yields exactly those values."""
    torch.manual_seed(0)
    h = torch.randn(3, 64) * 4
    for msg in (Segment("5", [3, 4, 5], [2, 3, 3], [3, 4, 4], hidden=h, origin="a"), Result("5", [3, 4, 5], h)):
        wire = to_message(msg, torch.int8)
        assert isinstance(wire["hidden"], QuantizedRows)
        frame = CODEC.encode(wire)
        back = from_message(CODEC.decode(frame))
        assert back.hidden.dtype == torch.float32
        assert torch.equal(back.hidden, as_received(h, torch.int8))
        assert not torch.equal(back.hidden, h)  # really quantized
        assert (back.hidden - h).abs().max() <= (h.abs().amax(-1) / 127 / 2 * 1.0001).max()  # half a step
        back.hidden += 1  # a fresh tensor, not a view of the frame
    assert torch.equal(as_received(h, torch.float16), h.half())


def test_int8_frames_are_about_half_of_fp16():
    h = torch.randn(8, 576)
    seg = Segment("5", list(range(8)), [PROMPT_PARENT, *range(7)], list(range(8)), hidden=h, origin="a")
    fp16, int8 = (len(CODEC.encode(to_message(seg, dt))) for dt in (torch.float16, torch.int8))
    assert fp16 > 8 * 576 * 2 and int8 < 8 * QuantizedRows.row_bytes(576) + 200 and int8 < 0.58 * fp16


CURVE = CostCurve({1: 0.010, 8: 0.020, 64: 0.100})  # 20 ms for a typical 8-row segment


@pytest.mark.parametrize(
    "setting, mbit, want",
    [
        ("fp16", 1.0, torch.float16),  # never quantizes
        ("int8", None, torch.int8),  # always does
        ("auto", None, torch.float16),  # bandwidth unknown
        ("auto", 1000.0, torch.float16),  # 8 x 576 x 2 B at 1 Gbit/s = 0.07 ms < 2 ms (a tenth of the forward)
        ("auto", 40.0, torch.float16),  # 1.84 ms < 2 ms
        ("auto", 30.0, torch.int8),  # 2.46 ms > 2 ms
        ("auto", 20.0, torch.int8),  # 3.69 ms: the benchmark's 20 Mbit/s link
        ("auto", 1.0, torch.int8),
    ],
)
def test_link_dtype_rule(setting, mbit, want):
    spb = 8 / (mbit * 1e6) if mbit else None
    got = link_dtype(setting, torch.float16, hidden_size=576, seconds_per_byte=spb, stage_curve=CURVE)
    assert got == want


def test_link_dtype_auto_counts_the_float_width_and_needs_a_curve():
    spb = 8 / 80e6  # 8 x 576 rows at 80 Mbit/s: fp32 1.84 ms < 2 ms
    assert link_dtype("auto", torch.float32, hidden_size=576, seconds_per_byte=spb, stage_curve=CURVE) == torch.float32
    spb = 8 / 40e6  # fp32: 3.7 ms > 2 ms; fp16: 1.8 ms < 2 ms
    assert link_dtype("auto", torch.float32, hidden_size=576, seconds_per_byte=spb, stage_curve=CURVE) == torch.int8
    assert link_dtype("auto", torch.float16, hidden_size=576, seconds_per_byte=spb, stage_curve=CURVE) == torch.float16
    assert link_dtype("auto", torch.float16, hidden_size=576, seconds_per_byte=1.0, stage_curve=None) == torch.float16
    with pytest.raises(ValueError, match="expected one of auto, fp16, int8"):
        link_dtype("int4", torch.float16, hidden_size=576, seconds_per_byte=None, stage_curve=None)


def test_prefix_references_and_kept_contexts_survive_the_codec():
    ref = PrefixRef(epoch=3, length=32, hash=(1 << 63) - 5)
    seg = Segment("12", [32], [31], [32], tokens=[5], commit=True, origin="peer-a", prefix=ref)
    assert over_the_wire(seg) == seg
    again = Segment("12", [0], [PROMPT_PARENT], [0], tokens=[5], commit=True, origin="peer-a", restart=True)
    assert over_the_wire(again) == again
    close = Close("7", keep=(11, 12, 13), commit=(40, 41), epoch=3)
    assert over_the_wire(close) == close
    assert to_message(Close("7"), torch.float32).body == {}  # a plain close stays empty on the wire
    with pytest.raises(ValueError, match="epoch, length, hash"):
        from_message(Message("segment", {**to_message(seg, torch.float32).body, "prefix": [1, 2]}, request_id=12))
