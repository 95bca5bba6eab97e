"""The one wire format between peers: a CBOR map with a typed, schema-checked body.

Every frame is ``{v: protocol version, t: message type, e: plan epoch, r: request id, ...body}``.
Bodies are checked against a per-type schema on both encode and decode, so a bug on the sending
side fails where it happens and a hostile or corrupt frame becomes a :class:`CodecError` on the
receiving side instead of an exception deep inside the scheduler. Size checks happen before
anything is allocated for a tensor: the frame limit bounds every byte string, and a tensor's
declared shape must match its byte count exactly.

Tensors travel as ``{dtype, shape, bytes}`` in little-endian (every supported device is). Decoded
tensors share memory with the decoded byte string (no second copy); treat them as read-only and
``.clone()`` before writing in place. Hidden states may instead travel row-quantized
(:class:`QuantizedRows`: int8 values plus one fp32 scale per 32 values, 56 % of fp16's bytes); those
decode to a :class:`QuantizedRows` and become floats only through its ``dequantize``, the one
definition of what a receiver computes with. torch is imported on first tensor use so processes
that only run the mesh layer never pay for it.
"""

from __future__ import annotations

import enum
import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

if TYPE_CHECKING:
    import torch

# 2: no seq in segment and result; plan stages as half-open [node, first, stop]
# 3: frames sealed after the handshake (peers/channel.py); epochs bounded; plan_propose carries the fingerprint
# 4: tensors may travel as dtype "q8row" (int8 with per-row fp32 scales), which a version-3 peer rejects
# 5: segments may carry a prefix reference and a restart flag, closes the prefixes to keep (prefix caches)
# 6: segments may carry a first flag (a round's first segment: every stage runs it before queued fillers)
# 7: int8 hidden states travel as "q8g32" (one fp32 scale per 32 values of a row) instead of "q8row"
PROTO_VERSION = 7
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
MAX_TENSOR_DIMS = 8
MAX_DEPTH = 32  # nesting; real messages need about 4
_ENVELOPE = ("v", "t", "e", "r")
_U64 = 2**64
# Plan epochs grow by one per re-plan; 2^32 is more than a mesh re-planning every second uses in a
# century, and leaves room above it so ``epoch + 1`` never overflows the envelope's 64 bits.
MAX_EPOCH = 2**32


class CodecError(ValueError):
    """A frame that cannot be accepted; ``code`` names the reason in ``error`` replies."""

    code = "bad_frame"


class FrameTooLarge(CodecError):
    code = "frame_too_large"


class MalformedFrame(CodecError):
    code = "malformed"


class VersionMismatch(CodecError):
    code = "version"


class UnknownMessageType(CodecError):
    code = "unknown_type"


class SchemaError(CodecError):
    code = "schema"


class TensorError(SchemaError):
    code = "tensor"


class Kind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    STR = "str"
    BYTES = "bytes"
    BOOL = "bool"
    TENSOR = "tensor"
    TENSORS = "map of str to tensor"
    INTS = "list of int"
    FLOATS = "list of float"
    STRS = "list of str"
    MAP = "map"
    LIST = "list"


@dataclass(frozen=True)
class Field:
    kind: Kind
    required: bool = True


def optional(kind: Kind) -> Field:
    return Field(kind, required=False)


@dataclass(frozen=True)
class MessageSpec:
    name: str
    fields: Mapping[str, Field]
    # Control messages are consumed by the mesh layer; the others are handed to the daemon.
    control: bool = False


class Registry:
    """Message types by name. The daemon registers its own data-plane types next to the built-ins."""

    def __init__(self) -> None:
        self._specs: dict[str, MessageSpec] = {}

    def register(self, name: str, *, control: bool = False, **fields: Kind | Field) -> MessageSpec:
        if name in self._specs:
            raise ValueError(f"message type {name!r} is already registered")
        bad = [k for k in fields if k in _ENVELOPE]
        if bad:
            raise ValueError(f"field names {bad} clash with the envelope keys {_ENVELOPE}")
        spec = MessageSpec(name, {k: f if isinstance(f, Field) else Field(f) for k, f in fields.items()}, control)
        self._specs[name] = spec
        return spec

    def spec(self, name: str) -> MessageSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownMessageType(f"unknown message type {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)


@dataclass
class Message:
    type: str
    body: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    request_id: int = 0

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)


# --- tensors -------------------------------------------------------------------------------------

_DTYPE_NAMES = ("fp16", "bf16", "fp32", "int64", "int32", "bool")


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "int64": torch.int64,
        "int32": torch.int32,
        "bool": torch.bool,
    }


# The per-link choice of hidden-state precision (meshd/ring/wire.py decides, the codec encodes).
WIRE_ACTIVATIONS = ("auto", "fp16", "int8")
WIRE_ACTIVATIONS_HELP = (
    "how hidden states cross links: fp16 (fp32 when the model computes in fp32); int8 (one fp32 scale per 32 "
    "values, a little over half of fp16's bytes, slightly different numbers); auto (int8 on a link whose known "
    "bandwidth makes a typical segment's fp16 wire time more than a tenth of this stage's forward over it, else fp16)"
)
Q8 = "q8g32"  # int8 values, one fp32 scale per group of Q8_GROUP values of a row (the last dimension)
Q8_GROUP = 32


def _groups(cols: int) -> int:
    return -(-cols // Q8_GROUP)


@dataclass(frozen=True, eq=False)
class QuantizedRows:
    """A float tensor as int8 values with one symmetric scale per group of ``Q8_GROUP`` consecutive
    values of a row (the row's last group may be shorter): ``x ~ q * scale``.

    ``scale = max|group| / 127`` in fp32 and ``q = round(x / scale)``, so every element is off by at
    most ``scale / 2`` (plus fp32 rounding of the division); an all-zero group has scale 0 and
    decodes to zeros. Groups, not whole rows: hidden states carry a few outlier channels far larger
    than the rest, and one scale per row gave every other value of such a row a step of outlier / 127
    (SmolLM2-135M cut into 5 stages: top-1 agreement with the float wire 92.0 % and KL 0.051 with a
    scale per row, 97.2 % and 0.004 with a scale per 32 values, docs/benchmarks.md), for 72 more bytes
    per row of 576. Within rows, not across them: a row's bytes depend on that row alone, so the same
    hidden state quantizes the same way whatever segment it travels in (the speculation oracle relies
    on it, see docs/design.md).
    """

    values: torch.Tensor  # int8, shape (..., cols)
    scales: torch.Tensor  # fp32, shape (..., ceil(cols / Q8_GROUP))

    @staticmethod
    def row_bytes(cols: int) -> int:
        """Bytes one row of ``cols`` values takes on the wire: a byte per value, 4 per group's scale."""
        return cols + 4 * _groups(cols)

    @classmethod
    def quantize(cls, x: torch.Tensor) -> QuantizedRows:
        import torch

        if x.dim() == 0 or not x.is_floating_point():
            raise TensorError(f"row quantization needs a float tensor with at least one dimension, got {x.dtype}")
        xf = x.detach().to(torch.float32)
        cols = xf.shape[-1]
        grouped = torch.nn.functional.pad(xf, (0, _groups(cols) * Q8_GROUP - cols)).unflatten(-1, (-1, Q8_GROUP))
        amax = grouped.abs().amax(dim=-1) if cols else xf.new_zeros((*xf.shape[:-1], 0))
        # a group of subnormals whose scale would underflow to 0 gets the smallest one, keeping the bound
        scales = torch.where(amax > 0, (amax / 127.0).clamp_min(2.0**-149), 0.0)
        if not bool(torch.isfinite(amax).all()):
            raise TensorError("cannot row-quantize a tensor holding inf or nan")
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        values = torch.round(grouped / divisor).clamp_(-127, 127).to(torch.int8).flatten(-2)[..., :cols]
        return cls(values.contiguous(), scales)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new float tensor: ``q * scale`` in fp32 (always, so every receiver computes the same
        values), then cast to ``dtype`` (the receiver's compute dtype) if given."""
        import torch

        cols = self.values.shape[-1]
        step = self.scales.repeat_interleave(Q8_GROUP, dim=-1)[..., :cols]
        out = self.values.to(torch.float32) * step
        return out if dtype is None or dtype == torch.float32 else out.to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (values and scales)."""
        return self.values.nbytes + self.scales.nbytes


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's elements, little-endian, in row-major order."""
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def encode_tensor(t: torch.Tensor | QuantizedRows) -> dict[str, Any]:
    if isinstance(t, QuantizedRows):
        return {"dtype": Q8, "shape": list(t.shape), "bytes": _raw(t.values), "scales": _raw(t.scales)}
    names = {v: k for k, v in _torch_dtypes().items()}
    if t.dtype not in names:
        raise TensorError(f"cannot send a {t.dtype} tensor; supported: {', '.join(_DTYPE_NAMES)}")
    return {"dtype": names[t.dtype], "shape": list(t.shape), "bytes": _raw(t)}


def _frombuffer(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    import torch

    if not data:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The buffer is immutable bytes; sharing it is the point (see module docstring).
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_quantized(obj: dict[str, Any], where: str) -> QuantizedRows:
    shape, data, scales = obj["shape"], obj["bytes"], obj["scales"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_TENSOR_DIMS:
        raise TensorError(f"{where}: a {Q8} tensor needs a shape of 1 to {MAX_TENSOR_DIMS} dimensions")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise TensorError(f"{where}: shape must be a list of non-negative ints")
    if not isinstance(data, bytes) or not isinstance(scales, bytes):
        raise TensorError(f"{where}: bytes and scales must be byte strings")
    if math.prod(shape) != len(data):
        raise TensorError(f"{where}: shape {shape} of {Q8} needs {math.prod(shape)} bytes, frame has {len(data)}")
    groups = math.prod(shape[:-1]) * _groups(shape[-1])
    if groups * 4 != len(scales):
        raise TensorError(
            f"{where}: {groups} groups of up to {Q8_GROUP} values need {groups * 4} bytes of fp32 scales, "
            f"frame has {len(scales)}"
        )
    import torch

    values = _frombuffer(data, torch.int8, shape)
    scale_t = _frombuffer(scales, torch.float32, [*shape[:-1], _groups(shape[-1])])
    if groups and not bool((torch.isfinite(scale_t) & (scale_t >= 0)).all()):
        raise TensorError(f"{where}: group scales must be finite and non-negative")
    if values.numel() and int(values.min()) < -127:
        raise TensorError(f"{where}: {Q8} values must lie in -127..127")
    return QuantizedRows(values, scale_t)


def decode_tensor(obj: Any, where: str = "tensor") -> torch.Tensor | QuantizedRows:
    if isinstance(obj, dict) and obj.get("dtype") == Q8:
        if set(obj) != {"dtype", "shape", "bytes", "scales"}:
            raise TensorError(f"{where}: a {Q8} tensor is a map with exactly dtype, shape, bytes and scales")
        return _decode_quantized(obj, where)
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "bytes"}:
        raise TensorError(f"{where}: expected a map with exactly dtype, shape and bytes (and scales for {Q8})")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["bytes"]
    if dtype not in _DTYPE_NAMES:
        raise TensorError(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(_DTYPE_NAMES)}, {Q8}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorError(f"{where}: shape must be a list of at most {MAX_TENSOR_DIMS} non-negative ints")
    if not isinstance(data, bytes):
        raise TensorError(f"{where}: bytes must be a byte string")
    import torch

    tdtype = _torch_dtypes()[dtype]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    # Python ints: a huge declared shape cannot overflow, and it never matches a bounded frame.
    expected = math.prod(shape) * itemsize
    if expected != len(data):
        raise TensorError(f"{where}: shape {shape} of {dtype} needs {expected} bytes, frame has {len(data)}")
    if dtype == "bool" and data and max(data) > 1:
        raise TensorError(f"{where}: bool tensor holds bytes other than 0 and 1")
    return _frombuffer(data, tdtype, shape)


# --- validation ----------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return type(x) is int


def _is_float(x: Any) -> bool:
    return type(x) in (int, float)


def _is_tensor(x: Any) -> bool:
    return type(x).__name__ == "Tensor" and type(x).__module__.startswith("torch")


def _check(kind: Kind, value: Any, where: str, decoding: bool) -> Any:
    """Return the value as the receiving code sees it, or raise SchemaError saying what is wrong."""
    ok: bool
    if kind is Kind.INT:
        ok = _is_int(value)
    elif kind is Kind.FLOAT:
        ok = _is_float(value)
        value = float(value) if ok else value
    elif kind is Kind.STR:
        ok = isinstance(value, str)
    elif kind is Kind.BYTES:
        ok = isinstance(value, bytes)
    elif kind is Kind.BOOL:
        ok = isinstance(value, bool)
    elif kind is Kind.TENSOR:
        if decoding:
            return decode_tensor(value, where)
        ok = _is_tensor(value) or isinstance(value, QuantizedRows)
    elif kind is Kind.TENSORS:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        if ok:
            return {k: _check(Kind.TENSOR, v, f"{where}.{k}", decoding) for k, v in value.items()}
    elif kind is Kind.INTS:
        ok = isinstance(value, list) and all(_is_int(x) for x in value)
    elif kind is Kind.FLOATS:
        ok = isinstance(value, list) and all(_is_float(x) for x in value)
        value = [float(x) for x in value] if ok else value
    elif kind is Kind.STRS:
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    elif kind is Kind.MAP:
        ok = isinstance(value, dict)
    else:  # Kind.LIST
        ok = isinstance(value, list)
    if not ok:
        raise SchemaError(f"{where}: expected {kind.value}, got {type(value).__name__}")
    return value


def _check_body(spec: MessageSpec, body: Mapping[str, Any], decoding: bool) -> dict[str, Any]:
    unknown = sorted(set(body) - set(spec.fields))
    if unknown:
        raise SchemaError(f"{spec.name}: unknown fields {unknown}")
    out: dict[str, Any] = {}
    for name, f in spec.fields.items():
        if name not in body:
            if f.required:
                raise SchemaError(f"{spec.name}: missing field {name!r}")
            continue
        out[name] = _check(f.kind, body[name], f"{spec.name}.{name}", decoding)
    return out


def _wire(kind: Kind, value: Any) -> Any:
    if kind is Kind.TENSOR:
        return encode_tensor(value)
    if kind is Kind.TENSORS:
        return {k: encode_tensor(v) for k, v in value.items()}
    return value


class Codec:
    """Encode and decode frames for one registry under one size limit."""

    def __init__(self, registry: Registry | None = None, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.registry = registry or REGISTRY
        self.max_frame = max_frame

    def encode(self, msg: Message) -> bytes:
        spec = self.registry.spec(msg.type)
        body = _check_body(spec, msg.body, decoding=False)
        if not (
            _is_int(msg.epoch)
            and 0 <= msg.epoch <= MAX_EPOCH
            and _is_int(msg.request_id)
            and 0 <= msg.request_id < _U64
        ):
            raise SchemaError(
                f"{msg.type}: epoch must be an int in 0..{MAX_EPOCH} and request_id an unsigned 64-bit int "
                f"(got {msg.epoch!r}, {msg.request_id!r})"
            )
        wire = {"v": PROTO_VERSION, "t": msg.type, "e": msg.epoch, "r": msg.request_id}
        wire.update({k: _wire(spec.fields[k].kind, v) for k, v in body.items()})
        frame = cbor2.dumps(wire)
        if len(frame) > self.max_frame:
            raise FrameTooLarge(f"{msg.type}: frame of {len(frame)} bytes exceeds the limit of {self.max_frame}")
        return frame

    def decode(self, frame: bytes) -> Message:
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise MalformedFrame(f"expected a binary frame, got {type(frame).__name__}")
        if len(frame) > self.max_frame:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the limit of {self.max_frame}")
        fp = io.BytesIO(frame)
        try:
            wire = cbor2.CBORDecoder(fp, max_depth=MAX_DEPTH, allow_duplicate_keys=False).decode()
        except Exception as exc:  # cbor2 raises assorted errors on garbage; all mean the same here.
            raise MalformedFrame(f"not a CBOR frame: {exc}") from None
        if fp.tell() != len(frame):
            raise MalformedFrame(f"{len(frame) - fp.tell()} stray bytes after the CBOR item")
        if not isinstance(wire, dict):
            raise MalformedFrame(f"frame is a {type(wire).__name__}, not a map")
        v, t, e, r = (wire.get(k) for k in _ENVELOPE)
        if not _is_int(v):
            raise MalformedFrame("frame has no integer protocol version 'v'")
        if v != PROTO_VERSION:
            raise VersionMismatch(f"peer speaks protocol {v}, this daemon speaks {PROTO_VERSION}")
        if not isinstance(t, str):
            raise MalformedFrame("frame has no message type 't'")
        spec = self.registry.spec(t)
        if not (_is_int(e) and 0 <= e <= MAX_EPOCH and _is_int(r) and 0 <= r < _U64):
            raise SchemaError(f"{t}: epoch 'e' must be an int in 0..{MAX_EPOCH} and request id 'r' a non-negative int")
        body = _check_body(spec, {k: val for k, val in wire.items() if k not in _ENVELOPE}, decoding=True)
        return Message(t, body, e, r)


REGISTRY = Registry()
_reg = REGISTRY.register

# Handshake (see link.py): challenge -> auth -> welcome; peer_info refreshes the hello later.
_reg("challenge", control=True, nonce=Kind.BYTES)
_reg("auth", control=True, nonce=Kind.BYTES, mac=Kind.BYTES, hello=Kind.MAP)
_reg("welcome", control=True, mac=Kind.BYTES, hello=Kind.MAP)
_reg("peer_info", control=True, hello=Kind.MAP)
# Membership and plan negotiation; the plan epoch rides in the envelope.
_reg("heartbeat", control=True, ts=Kind.FLOAT)
_reg("plan_propose", control=True, stages=Kind.LIST, members=Kind.STRS, n_layers=Kind.INT, fingerprint=Kind.STR)
# refused: the epoch of the proposal a negative ack refuses (``e`` is then the refuser's own epoch)
_reg("plan_ack", control=True, ok=Kind.BOOL, reason=optional(Kind.STR), refused=optional(Kind.INT))
_reg("plan_commit", control=True)
# Data plane: meshd/ring/messages.py is the in-memory form, meshd/ring/wire.py the mapping; request id in the
# envelope. Node ids are request-global and only grow, so prunes apply the same whatever order they meet the
# segments in.
_reg(
    "segment",
    origin=Kind.STR,  # node id of the originator: the last stage returns the result there
    nodes=Kind.INTS,
    parents=Kind.INTS,
    positions=Kind.INTS,
    tokens=optional(Kind.INTS),  # the first stage embeds tokens itself ...
    hidden=optional(Kind.TENSOR),  # ... later stages get the previous stage's hidden states (float or q8g32)
    commit=optional(Kind.BOOL),  # prompt chunks: committed context on arrival
    prefix=optional(Kind.INTS),  # [epoch, length, hash]: starts after a prefix the stages keep
    restart=optional(Kind.BOOL),  # the prompt again from its start after a prefix miss
    first=optional(Kind.BOOL),  # a round's first segment: the originator waits on it, stages run it first
)
_reg("prune", upto=Kind.INT, keep=Kind.INTS, commit=Kind.INTS)
_reg("result", nodes=Kind.INTS, hidden=Kind.TENSOR, queue=optional(Kind.INT))
# closes the request's session at a stage; a finished one may ask it to keep its context's KV first:
# chain hashes of the context's blocks (plan epoch keep_epoch) and the last round's accepted nodes
_reg("close", keep=optional(Kind.INTS), commit=optional(Kind.INTS), keep_epoch=optional(Kind.INT))
_reg("error", code=Kind.STR, message=Kind.STR)
