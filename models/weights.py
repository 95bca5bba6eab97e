"""Read only the tensors a stage needs, one at a time, in HF naming.

A Raspberry Pi holding 4 of 32 layers cannot afford to dequantize the whole file first
(which is what transformers' GGUF path does), so readers open tensors lazily and record
what they read; tests use that record to prove a partial load touched nothing else.
Matrices can also come out still quantized (:meth:`TensorReader.read_matrix`): Q8_0, Q4_0 and
Q4_1 blocks are decoded straight into :class:`models.quant.QuantRows`, never through a dense copy
where the kernel's layout can hold them exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import re
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from safetensors import safe_open

from models.config import ModelConfig, ModelError
from models.quant import SLAB_ROWS, QuantRows, matrix_kind, quantize
from models.source import ModelSource

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MADV_DONTNEED = 4  # Linux and macOS
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleave so rows follow HF's rotate-half RoPE layout (also right for
    a matrix's per-row or per-group scales: only the row order changes)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class TensorReader:
    """Lazy, per-tensor access to a checkpoint in HF names. ``read_names`` lists what was read."""

    source: ModelSource
    read_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index: dict[str, object] = {}
        if self.source.kind == "gguf":
            for t in self.source.gguf_tensors:
                hf = gguf_to_hf_name(t.name)
                if hf is not None:
                    self._index[hf] = t
        else:
            files = sorted(self.source.path.glob("*.safetensors"))
            self._handles = [safe_open(str(f), framework="pt") for f in files]
            for h in self._handles:
                for k in h.keys():  # noqa: SIM118 - safe_open handles are not dicts
                    self._index[k] = h

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, dense, in ``dtype`` (None: fp32 for quantized GGUF types, else as stored).
        A quantized matrix is dequantized a slab of rows at a time, so a vocabulary never exists in
        fp32 all at once when it is wanted in bf16."""
        if name not in self._index:
            raise ModelError(f"{self.source.path}: tensor {name!r} is missing; is the checkpoint complete?")
        self.read_names.append(name)
        if self.source.kind == "safetensors":
            w = self._index[name].get_tensor(name)
            return w if dtype is None else w.to(dtype)
        t = self._index[name]
        if len(t.shape) == 1:
            w = self._dequantized(t, 0, None)
            return self._unpermute(name, w if dtype is None else w.to(dtype))
        slabs = [self._dequantized(t, a, a + SLAB_ROWS) for a in range(0, int(t.shape[-1]), SLAB_ROWS)]
        return self._unpermute(name, torch.cat([s if dtype is None else s.to(dtype) for s in slabs]))

    def qtype(self, name: str) -> str | None:
        """The tensor's GGUF type name (``Q4_1``, ``F32``...); None for safetensors."""
        return self._index[name].tensor_type.name if self.source.kind == "gguf" else None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in HF order (rows first), read from the header only."""
        entry = self._index[name]
        if self.source.kind == "gguf":
            return tuple(int(x) for x in reversed(entry.shape))
        return tuple(entry.get_slice(name).get_shape())

    def read_matrix(self, name: str, fmt: str, dtype: torch.dtype | None = None) -> torch.Tensor | QuantRows:
        """A weight matrix as the resolved weight format ``fmt`` holds it (see
        :func:`models.quant.matrix_kind`): dense (in ``dtype``, as :meth:`read`) or quantized rows."""
        if name not in self._index:
            raise ModelError(f"{self.source.path}: tensor {name!r} is missing; is the checkpoint complete?")
        entry = self._index[name]
        qtype = self.qtype(name)
        kind = matrix_kind(fmt, qtype)
        if kind is None:
            return self.read(name, dtype)
        if self.source.kind != "gguf":
            return quantize(self.read(name), kind)
        self.read_names.append(name)
        if kind in ("int4", "int4a8") and qtype in ("Q4_0", "Q4_1"):
            rows = _q4_rows(entry)
            return self._unpermute(name, QuantRows(kind, rows.q, rows.scale, rows.zero))
        # re-quantized a slab of rows at a time: a 50k-row vocabulary never exists in fp32 all at once
        out = int(entry.shape[-1])
        parts = [quantize(self._dequantized(entry, a, a + SLAB_ROWS), kind) for a in range(0, out, SLAB_ROWS)]
        return self._unpermute(name, QuantRows.cat(parts))

    def _unpermute(self, hf_name: str, w: torch.Tensor | QuantRows) -> torch.Tensor | QuantRows:
        """llama.cpp's q/k rows back in HF's order, for a dense matrix or quantized rows."""
        cfg = self.source.config
        if cfg.arch not in ("llama", "mistral"):
            return w
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = cfg.n_heads
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = cfg.n_kv_heads
        else:
            return w
        if isinstance(w, QuantRows):
            zero = unpermute_qk(w.zero, heads) if w.zero is not None else None
            return QuantRows(w.kind, unpermute_qk(w.q, heads), unpermute_qk(w.scale, heads), zero)
        return unpermute_qk(w, heads)

    def _dequantized(self, t, start: int, stop: int | None) -> torch.Tensor:
        """Rows ``start:stop`` (file order) of a GGUF matrix or vector in fp32 (F16 stays F16)."""
        qtype = t.tensor_type
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
        data = t.data[start:stop] if len(shape) > 1 else t.data
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.array(data)  # a copy: the file is mapped read-only
        else:
            try:
                arr = gguf.quants.dequantize(data, qtype)
            except NotImplementedError:
                raise ModelError(
                    f"{self.source.path}: tensor {t.name} uses {qtype.name}, which gguf-py cannot dequantize; "
                    "re-quantize to Q4_0, Q4_1, Q8_0, F16 or F32."
                ) from None
        drop_mapped_pages(data)
        return torch.from_numpy(np.ascontiguousarray(arr).reshape(-1, *shape[1:]) if len(shape) > 1 else arr)


def _q4_rows(t) -> QuantRows:
    """A Q4_0 or Q4_1 tensor's blocks as int4 rows, exactly (see models.quant for the mapping).

    Each row is blocks of 32 weights along the input: an fp16 scale ``d`` (Q4_1: then an fp16
    minimum ``m``) and 16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31;
    Q4_0 means ``w = d * (q - 8)``, Q4_1 ``w = d * q + m``.
    """
    out, k = (int(x) for x in reversed(t.shape))
    with_min = t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    head = 4 if with_min else 2
    raw = np.asarray(t.data).reshape(out, k // 32, head + 16)
    d = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(raw[..., head:].copy())
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(out, k)
    if with_min:
        m = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        zero = m + 8 * d
    else:
        zero = torch.zeros_like(d)
    drop_mapped_pages(t.data)
    return QuantRows("int4", q, d, zero)


def drop_mapped_pages(data: np.ndarray) -> None:
    """Take the pages of the mapped GGUF bytes ``data`` out of this process's resident set once they
    were copied out.

    The file is mapped read-only and shared, so ``MADV_DONTNEED`` only unmaps the pages (the page
    cache keeps them; a later read faults them back): without it every byte a stage read stays in
    its RSS, ~300 MB for 8 layers of a 1B model, which ``--memory`` then has to cover. A no-op where
    the C library has no ``madvise``.
    """
    page = mmap.PAGESIZE
    addr = data.ctypes.data
    start = addr - addr % page
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + data.nbytes - start), _MADV_DONTNEED)


def release_freed_memory() -> None:
    """Hand the heap that loading freed back to the OS.

    glibc keeps freed memory in its arenas for reuse; after a load's temporaries (gguf-py's parsed
    header, dequantized slabs, pre-packing copies) that is ~130 MB of a SmolLM2 process's RSS that
    nothing will reuse. A no-op where the C library has no ``malloc_trim`` (musl, macOS).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def vocab_names(cfg: ModelConfig) -> list[str]:
    """The vocabulary ends' tensors: embeddings, final norm and (unless tied to the embeddings) LM head."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names
