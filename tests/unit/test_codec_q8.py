"""Row-quantized tensors (int8 + one fp32 scale per 32 values of a row) on the wire: exact round trip of
what was sent, the error bound against the float original, and hostile q8g32 frames rejected with a reason."""

from __future__ import annotations

import cbor2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peers.codec import PROTO_VERSION, Q8_GROUP, Codec, Message, QuantizedRows, TensorError

CODEC = Codec(max_frame=1 << 20)
HIDDEN = 576  # the embedded model's hidden size


def through(x: torch.Tensor) -> QuantizedRows:
    msg = Message("result", {"nodes": list(range(x.shape[0])), "hidden": QuantizedRows.quantize(x)}, request_id=3)
    got = CODEC.decode(CODEC.encode(msg))["hidden"]
    assert isinstance(got, QuantizedRows)
    return got


def steps(q: QuantizedRows) -> torch.Tensor:
    """Each element's quantization step: its group's scale."""
    return q.scales.repeat_interleave(Q8_GROUP, dim=-1)[..., : q.shape[-1]]


def assert_within_half_a_step(x: torch.Tensor, q: QuantizedRows) -> None:
    """|x - q * scale| <= scale / 2 per element; the slack is fp32 rounding of x / scale and of
    q * scale (each at most half an ulp of values below 128 * scale, and at least the smallest
    subnormal, 2^-149, for groups so tiny their scales are subnormal), not a loosened bound."""
    err = (x.float() - q.dequantize()).abs()
    step = steps(q)
    slack = 2 * torch.finfo(torch.float32).eps * 128 * step + 2.0**-149
    assert bool((err <= step / 2 + slack).all()), float((err - step / 2).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_and_error_bound(dtype):
    torch.manual_seed(0)
    x = (torch.randn(9, HIDDEN) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    x[4, 7] = 300.0  # an outlier channel, as real hidden states have: only its own group gets a coarser step
    x[5] = 0.0  # an all-zero row: scales 0, decodes to zeros
    q = QuantizedRows.quantize(x)
    got = through(x)
    assert torch.equal(got.values, q.values) and torch.equal(got.scales, q.scales)  # the wire changes nothing
    assert got.values.dtype == torch.int8 and got.scales.dtype == torch.float32
    assert got.scales.shape == (9, HIDDEN // Q8_GROUP)
    grouped = x.float().unflatten(-1, (-1, Q8_GROUP))
    assert torch.equal(got.scales, grouped.abs().amax(-1) / 127)  # symmetric: each group's largest |value| -> 127
    assert int(got.values[4, :Q8_GROUP].abs().max()) == 127 and got.scales[4, 0] == 300.0 / 127
    assert float(got.scales[4, 1:].max()) < 0.05 * float(got.scales[4, 0])  # the outlier's neighbours only
    assert torch.equal(got.dequantize()[5], torch.zeros(HIDDEN))
    assert_within_half_a_step(x, got)
    assert got.dequantize(dtype).dtype == dtype
    assert torch.equal(got.dequantize(dtype), got.dequantize().to(dtype))  # fp32 first, whatever the receiver


def test_rows_quantize_independently():
    """A row's bytes depend on that row alone, so a hidden state quantizes the same in any segment."""
    torch.manual_seed(1)
    x = torch.randn(6, HIDDEN)
    whole = QuantizedRows.quantize(x)
    for lo, hi in [(0, 1), (2, 5), (5, 6)]:
        part = QuantizedRows.quantize(x[lo:hi])
        assert torch.equal(part.values, whole.values[lo:hi]) and torch.equal(part.scales, whole.scales[lo:hi])


def test_bytes_per_row_about_half_of_fp16():
    x = torch.randn(8, HIDDEN)
    fp16 = len(CODEC.encode(Message("result", {"nodes": list(range(8)), "hidden": x.half()})))
    int8 = len(CODEC.encode(Message("result", {"nodes": list(range(8)), "hidden": QuantizedRows.quantize(x)})))
    assert QuantizedRows.quantize(x).nbytes == 8 * QuantizedRows.row_bytes(HIDDEN) == 8 * (HIDDEN + 4 * HIDDEN // 32)
    assert int8 < 0.58 * fp16, (int8, fp16)  # 648 vs 1152 bytes a row plus the same small envelope


def test_a_short_last_group_and_a_row_narrower_than_a_group():
    """Rows whose width is not a multiple of the group: the last group is shorter and has its own scale."""
    x = torch.tensor([[1.0] * 32 + [0.5, -0.25, 0.0], [3.0] * 32 + [0.0, 0.0, 0.0]])
    got = through(x)
    assert got.scales.shape == (2, 2) and QuantizedRows.row_bytes(35) == 35 + 8
    assert torch.equal(got.scales[:, 1], torch.tensor([0.5 / 127, 0.0]))
    assert torch.equal(got.dequantize()[1, 32:], torch.zeros(3))
    assert_within_half_a_step(x, got)
    narrow = torch.tensor([[2.0, -1.0, 0.5]])
    assert through(narrow).scales.shape == (1, 1)
    assert_within_half_a_step(narrow, through(narrow))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 40),
    data=st.data(),
)
def test_bound_holds_for_any_finite_rows(rows, cols, data):
    vals = data.draw(
        st.lists(
            st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32),
            min_size=rows * cols,
            max_size=rows * cols,
        )
    )
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)
    assert_within_half_a_step(x, through(x))


def test_quantize_refuses_what_it_cannot_represent():
    with pytest.raises(TensorError, match="inf or nan"):
        QuantizedRows.quantize(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(TensorError, match="float tensor"):
        QuantizedRows.quantize(torch.ones(2, 3, dtype=torch.int64))


def frame(tensor: dict) -> bytes:
    return cbor2.dumps({"v": PROTO_VERSION, "t": "result", "e": 0, "r": 1, "nodes": [0], "hidden": tensor})


@pytest.mark.parametrize(
    "tensor, reason",
    [
        ({"dtype": "q8g32", "shape": [1, 4], "bytes": b"\x01" * 4, "scales": b"\x00" * 8}, "fp32 scales"),
        ({"dtype": "q8g32", "shape": [2, 40], "bytes": b"\x01" * 80, "scales": b"\x00" * 8}, "need 16 bytes"),
        # version 4-6's encoding, one scale per row: gone with version 7
        ({"dtype": "q8row", "shape": [1, 4], "bytes": b"\x01" * 4, "scales": b"\x00" * 4}, "exactly dtype, shape"),
        ({"dtype": "q8g32", "shape": [1, 4], "bytes": b"\x01" * 3, "scales": b"\x00" * 4}, "needs 4 bytes"),
        ({"dtype": "q8g32", "shape": [], "bytes": b"\x01", "scales": b""}, "shape of 1 to"),
        ({"dtype": "q8g32", "shape": [1, 2], "bytes": b"\x80\x00", "scales": b"\x00" * 4}, "-127..127"),
        (
            {"dtype": "q8g32", "shape": [1, 1], "bytes": b"\x01", "scales": torch.tensor([-1.0]).numpy().tobytes()},
            "finite and non-negative",
        ),
        (
            {
                "dtype": "q8g32",
                "shape": [1, 1],
                "bytes": b"\x01",
                "scales": torch.tensor([float("nan")]).numpy().tobytes(),
            },
            "finite and non-negative",
        ),
        ({"dtype": "q8g32", "shape": [1, 1], "bytes": b"\x01"}, "exactly dtype, shape, bytes and scales"),
        ({"dtype": "fp16", "shape": [1], "bytes": b"\x00\x00", "scales": b""}, "exactly dtype, shape and bytes"),
    ],
)
def test_hostile_q8_frames_are_rejected(tensor, reason):
    with pytest.raises(TensorError, match=reason):
        CODEC.decode(frame(tensor))
