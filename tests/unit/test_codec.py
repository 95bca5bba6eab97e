"""The wire codec: every dtype round-trips, and nothing a peer sends can crash or bloat the decoder."""

from __future__ import annotations

import contextlib
import time

import cbor2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peers.codec import (
    PROTO_VERSION,
    Codec,
    CodecError,
    FrameTooLarge,
    Kind,
    MalformedFrame,
    Message,
    Registry,
    SchemaError,
    TensorError,
    UnknownMessageType,
    VersionMismatch,
    optional,
)

CODEC = Codec(max_frame=1 << 20)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.int32, torch.bool]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, dtype=dtype)


def wire(**body) -> bytes:
    return cbor2.dumps({"v": PROTO_VERSION, "t": "result", "e": 0, "r": 0, "nodes": [], **body})


DEEP: list = [1]
for _ in range(40):
    DEEP = [DEEP]


def tensor_wire(dtype="fp16", shape=(2, 3), nbytes=12) -> dict:
    return {"dtype": dtype, "shape": list(shape), "bytes": b"\0" * nbytes}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 576), (3,), (), (0, 4), (2, 3, 4)], ids=str)
def test_tensor_round_trip_every_dtype(dtype, shape):
    t = make_tensor(dtype, shape)
    msg = Message("result", {"queue": 7, "hidden": t, "nodes": [1, 2]}, epoch=3, request_id=99)
    back = CODEC.decode(CODEC.encode(msg))
    assert (back.type, back.epoch, back.request_id, back["queue"], back["nodes"]) == ("result", 3, 99, 7, [1, 2])
    assert back["hidden"].dtype == dtype and back["hidden"].shape == t.shape
    assert torch.equal(back["hidden"], t)


def test_non_contiguous_and_bf16_bits_survive():
    t = torch.randn(8, 6).to(torch.bfloat16).t()  # transposed view: not contiguous
    back = CODEC.decode(CODEC.encode(Message("result", {"nodes": [], "hidden": t})))["hidden"]
    assert torch.equal(back.view(torch.int16), t.contiguous().view(torch.int16))


def test_segment_with_tree_metadata_round_trips():
    msg = Message(
        "segment",
        {"hidden": torch.randn(4, 8, dtype=torch.float16), "positions": [5, 6, 6, 7],
         "parents": [-1, 0, 0, 1], "nodes": [0, 1, 2, 3], "origin": "a1b2", "commit": False},
        epoch=1, request_id=12,
    )  # fmt: skip
    back = CODEC.decode(CODEC.encode(msg))
    assert back["parents"] == [-1, 0, 0, 1] and back["origin"] == "a1b2" and back["commit"] is False


def test_daemon_can_register_its_own_type():
    reg = Registry()
    reg.register("kv_stats", layers=Kind.INTS, tensors=Kind.TENSORS, note=optional(Kind.STR))
    codec = Codec(reg)
    msg = Message("kv_stats", {"layers": [1, 2], "tensors": {"a": torch.ones(2, dtype=torch.int32)}})
    back = codec.decode(codec.encode(msg))
    assert back["layers"] == [1, 2] and torch.equal(back["tensors"]["a"], torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="already registered"):
        reg.register("kv_stats")
    with pytest.raises(ValueError, match="envelope"):
        reg.register("x", e=Kind.INT)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"\xff\x00garbage", MalformedFrame),
        (b"", MalformedFrame),
        (cbor2.dumps([1, 2, 3]), MalformedFrame),
        (cbor2.dumps({"v": PROTO_VERSION + 1, "t": "close", "e": 0, "r": 0}), VersionMismatch),
        (cbor2.dumps({"v": PROTO_VERSION, "t": "no_such_type", "e": 0, "r": 0}), UnknownMessageType),
        (cbor2.dumps({"v": PROTO_VERSION, "t": "close", "e": -1, "r": 0}), SchemaError),
        (cbor2.dumps({"v": PROTO_VERSION, "t": "close", "e": "1", "r": 0}), SchemaError),
        (wire(queue="7", hidden=tensor_wire()), SchemaError),  # wrong field type
        (wire(queue=True, hidden=tensor_wire()), SchemaError),  # bool is not an int here
        (wire(queue=1), SchemaError),  # missing field (hidden)
        (wire(queue=1, hidden=tensor_wire(), extra=1), SchemaError),  # unknown field
        (wire(queue=1, hidden=tensor_wire(nbytes=11)), TensorError),  # shape/bytes mismatch
        (wire(queue=1, hidden=tensor_wire(shape=(2**40, 2**40))), TensorError),  # huge declared shape
        (wire(queue=1, hidden=tensor_wire(shape=(-2, -3))), TensorError),
        (wire(queue=1, hidden=tensor_wire(dtype="fp64", nbytes=48)), TensorError),
        (wire(queue=1, hidden={"dtype": "bool", "shape": [2], "bytes": b"\x00\x07"}), TensorError),
        (wire(queue=1, hidden=[1, 2]), TensorError),
        (wire(queue=1, hidden=tensor_wire(), nodes=[1, "2"]), SchemaError),
        (wire(queue=1, hidden=tensor_wire()) + b"\x00", MalformedFrame),  # trailing bytes
        (b"\xa2" + cbor2.dumps("v") + cbor2.dumps(1) + cbor2.dumps("v") + cbor2.dumps(1), MalformedFrame),  # dup key
        (wire(queue=1, hidden=tensor_wire(), meta={"x": DEEP}), MalformedFrame),  # nesting beyond the limit
    ],
)
def test_decoder_rejects_with_typed_error(frame, error):
    with pytest.raises(error):
        CODEC.decode(frame)


def test_oversized_frames_rejected_both_ways():
    codec = Codec(max_frame=4096)
    big = Message("result", {"nodes": [], "hidden": torch.zeros(4096, dtype=torch.float16)})
    with pytest.raises(FrameTooLarge):
        codec.encode(big)
    with pytest.raises(FrameTooLarge):
        codec.decode(CODEC.encode(big))


def test_encoder_checks_what_the_sender_builds():
    with pytest.raises(SchemaError):
        CODEC.encode(Message("prune", {"upto": 1, "commit": [2]}))
    with pytest.raises(TensorError):
        CODEC.encode(Message("result", {"nodes": [], "hidden": torch.zeros(2, dtype=torch.float64)}))
    with pytest.raises(UnknownMessageType):
        CODEC.encode(Message("nope"))


# --- fuzzing -------------------------------------------------------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def assert_rejected_or_valid(frame: bytes) -> None:
    """Any outcome but a non-CodecError exception is fine: that would be a crash on input."""
    with contextlib.suppress(CodecError):
        CODEC.decode(frame)


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(frame):
    assert_rejected_or_valid(frame)


@FUZZ
@given(st.data())
def test_fuzz_truncated_valid_frames(data):
    t = make_tensor(data.draw(st.sampled_from(DTYPES)), (data.draw(st.integers(0, 5)), 3))
    frame = CODEC.encode(
        Message("segment", {"hidden": t, "positions": [1], "parents": [-1], "nodes": [0], "origin": "x"})
    )
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(CodecError):
        CODEC.decode(frame[:cut])


@FUZZ
@given(
    st.sampled_from(["segment", "prune", "result", "close", "error", "heartbeat", "plan_propose", "auth", "zzz"]),
    st.dictionaries(
        st.sampled_from(["queue", "hidden", "positions", "parents", "keep", "code", "ts", "hello"]), cbor_values
    ),
)
def test_fuzz_wrong_field_types(mtype, body):
    assert_rejected_or_valid(cbor2.dumps({"v": PROTO_VERSION, "t": mtype, "e": 0, "r": 0, **body}))


@FUZZ
@given(
    st.sampled_from(["fp16", "bf16", "fp32", "int64", "int32", "bool", "u8", 3]),
    st.lists(st.integers(-(2**62), 2**62), max_size=10),
    st.binary(max_size=64),
)
def test_fuzz_declared_shapes_never_allocate_beyond_the_frame(dtype, shape, data):
    frame = wire(queue=0, hidden={"dtype": dtype, "shape": shape, "bytes": data})
    try:
        out = CODEC.decode(frame)
    except CodecError:
        return
    t = out["hidden"]
    assert t.numel() * t.element_size() == len(data) <= len(frame)


# --- measurement for the closing note ------------------------------------------------------------


def test_measure_segment_codec_cost(capsys):
    """16 x 576 fp16 hidden states with tree metadata: the typical FlowSpec segment."""
    msg = Message(
        "segment",
        {"hidden": torch.randn(16, 576).half(), "positions": list(range(40, 56)),
         "parents": [-1, *range(15)], "nodes": list(range(16)), "origin": "0123456789abcdef"},
        epoch=2, request_id=1234,
    )  # fmt: skip
    frame = CODEC.encode(msg)
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        CODEC.decode(CODEC.encode(msg))
    per = (time.perf_counter() - t0) / n
    with capsys.disabled():
        print(f"\n[measure] 16x576 fp16 segment: {len(frame)} bytes on the wire, encode+decode {per * 1e6:.0f} us")
    assert len(frame) < 16 * 576 * 2 + 200
