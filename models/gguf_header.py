"""A GGUF file's header read without materializing its tokenizer: metadata values, tensor index.

gguf-py's ``GGUFReader`` turns every element of every array (50k tokens, 50k merges, their types
and scores) into numpy views: ~150 MB of small objects and seconds of parsing on each start, most
of a small daemon's memory before its first layer. Loading needs the scalar metadata and the
tensors' names, types, shapes and mapped bytes; large arrays are skipped here with only their
length kept. Tensor data is laid out as gguf-py lays it out (``gguf.quants`` reads it).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_MAGIC = 0x46554747  # "GGUF", little-endian
_SCALARS = {  # value type -> (struct format, numpy dtype)
    0: ("B", "<u1"),
    1: ("b", "<i1"),
    2: ("H", "<u2"),
    3: ("h", "<i2"),
    4: ("I", "<u4"),
    5: ("i", "<i4"),
    6: ("f", "<f4"),
    7: ("?", "<u1"),
    10: ("Q", "<u8"),
    11: ("q", "<i8"),
    12: ("d", "<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_FLOATS = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
}
ARRAY_LIMIT = 1024
"""Arrays longer than this (the tokenizer's lists) are skipped; only their length is kept."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as loading needs it: ``shape`` in GGUF order (fastest dim first), ``data`` the
    mapped bytes (``uint8`` blocks of ``(rows, bytes per row)`` for quantized types)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        """How many weights the tensor holds (the model's parameter count sums these)."""
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    fields: dict[str, Any]  # key -> python value (str, int, float, bool, or a list for short arrays)
    array_lengths: dict[str, int]  # every array's length, the skipped ones included
    tensors: list[GGUFTensor] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        out = self.buf[self.pos : self.pos + n].tobytes()
        if len(out) != n:
            raise ValueError("truncated header")
        self.pos += n
        return out

    def scalar(self, kind: int) -> Any:
        fmt = "<" + _SCALARS[kind][0]
        (v,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return v

    def string(self) -> str:
        (n,) = struct.unpack("<Q", self.take(8))
        return self.take(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (n,) = struct.unpack("<Q", self.take(8))
            self.pos += n

    def value(self, kind: int, key: str, lengths: dict[str, int]) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(kind)
        (elem, count) = struct.unpack("<IQ", self.take(12))
        lengths[key] = count
        if elem == _STRING:
            if count > ARRAY_LIMIT:
                self.skip_strings(count)
                return None
            return [self.string() for _ in range(count)]
        if elem == _ARRAY:
            raise ValueError(f"{key}: nested arrays are not supported")
        dtype = np.dtype(_SCALARS[elem][1])
        raw = self.take(dtype.itemsize * count)
        if count > ARRAY_LIMIT:
            return None
        vals = np.frombuffer(raw, dtype=dtype).tolist()
        return [bool(v) for v in vals] if elem == _BOOL else vals


def read_header(path: Path) -> GGUFHeader:
    """Metadata and tensor index of the GGUF file ``path`` (version 2 or 3, little-endian); the
    file is mapped, nothing of the tensors is read."""
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf)
    magic, version = struct.unpack("<II", cur.take(8))
    if magic != _MAGIC or version not in (2, 3):
        raise ValueError(f"{path}: not a little-endian GGUF file of version 2 or 3")
    n_tensors, n_kv = struct.unpack("<QQ", cur.take(16))
    fields: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        (kind,) = struct.unpack("<I", cur.take(4))
        v = cur.value(kind, key, lengths)
        if v is not None:
            fields[key] = v
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = struct.unpack("<I", cur.take(4))
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
        kind, offset = struct.unpack("<IQ", cur.take(12))
        infos.append((name, tuple(int(d) for d in dims), gguf.GGMLQuantizationType(kind), offset))
    align = int(fields.get("general.alignment", 32))
    start = cur.pos + (-cur.pos % align)
    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims))
        n_bytes = n_elems * type_size // block
        raw = buf[start + offset : start + offset + n_bytes]
        np_dims = tuple(reversed(dims))
        if qtype in _FLOATS:
            data = raw.view(_FLOATS[qtype]).reshape(np_dims)
        else:
            data = raw.reshape(*np_dims[:-1], np_dims[-1] // block * type_size)
        tensors.append(GGUFTensor(name, qtype, dims, data))
    return GGUFHeader(fields, lengths, tensors)
