"""Weights kept quantized in memory: int8 per output row and 4-bit groups of 32, on torch's CPU kernels.

A weight format (``--weights``) says how a stage holds its matrices:

- ``fp32`` / ``bf16``: dequantized to a dense matrix (the reference, and the fallback everywhere);
- ``int8``: int8 with one scale per output row, through ``aten._weight_int8pack_mm``;
- ``int4``: 4-bit values in groups of 32 along the input with a scale and a zero per group,
  ``w = (q - 8) * scale + zero``, through ``aten._weight_int4pack_mm_for_cpu``;
- ``int4a8``: the file's Q4_0/Q4_1 blocks as they are (``w = d * q + m``) times activations rounded
  to int8 per group of 32, as llama.cpp multiplies Q4 by Q8, through :mod:`models.q4a8` (a C
  kernel built on first use). Its cost grows far less with rows than torch's int4 kernel, which is
  what lets a tree verify for not much more than one row; other matrices are held as ``native``.
  Such a stage runs its decoder layers in C (``models/q4a8_layers.c``) and multiplies its int8
  vocabulary rows by int8 activations too (:func:`models.q4a8.q8a8_matmul`).
- ``native``: the kernel closest to each tensor's type in the file (Q8_0 -> int8, Q4_0/Q4_1 ->
  int4, other quantized types -> int8, F32/F16 -> dense);
- ``auto``: :func:`auto_format`, the fastest format that is exact enough on this CPU.

What each mapping costs in accuracy (per weight, on top of the file's own quantization):

- Q4_0 -> int4: exact in fp32 (scale = d, zero = 0). Q4_1 -> int4: scale = d, zero = m + 8d, exact
  but for the one fp32 rounding of that sum (<= 2^-24 |zero|). GGUF blocks are 32 weights along
  the input, the same groups the kernel uses, so nothing is re-quantized.
- Under bf16 activations the kernel wants bf16 scales and zeros: each weight then moves by at most
  2^-9 (8 |scale| + |zero|), i.e. about the bf16 rounding of the weight itself, which is what the
  dequantized bf16 reference also pays.
- int4a8 adds the activations' rounding: each input moves by at most max|group| / 254, so an output
  by at most sum over groups of max|x in group| / 254 * sum |w in group| (the weights are exact).
- Q8_0 -> int8: the kernel has one scale per row, GGUF one per 32 weights, so the row is
  re-quantized: |error| <= max|row| / 254 (half a step of 127 levels over the row's range).
- dense (F32/F16/safetensors, or a Q8_0 asked for as int4) -> int4: |error| <= (max - min of the
  group) / 30; -> int8: |error| <= max|row| / 254.

The vocabulary matrix (embeddings, and the LM head when tied, as in SmolLM2) is held as int8 rows
under every quantized format: one copy serves both the embedding lookup (rows are gathered and
scaled) and the LM head matmul, and the logits that pick greedy tokens keep 8 bits. An untied
LM head follows the format like any other matrix.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from models import q4a8
from models.formats import WEIGHT_FORMATS

Kind = Literal["int8", "int4", "int4a8"]
GROUP = q4a8.GROUP  # GGUF's Q4_0/Q4_1/Q8_0 block, and the group size both int4 kernels take
_INT4_ROW_MULTIPLE = 16  # the int4 packer wants the output rows in multiples of 16 (torch 2.13)


# ---- quantized rows, before packing ----------------------------------------------------------


@dataclass
class QuantRows:
    """A matrix's quantized values and scales in plain tensors, before :meth:`pack`.

    Kept apart from the packed form because the fused projections (q/k/v, gate/up) join their
    parts by rows first, and the int4 layout cannot be joined once packed.

    ``int8``: ``q`` int8 (out, in) in [-127, 127], ``scale`` fp32 (out,): ``w = q * scale``.
    ``int4`` / ``int4a8``: ``q`` uint8 (out, in) in [0, 15], ``scale`` and ``zero`` fp32 (out, in / 32):
    ``w = (q - 8) * scale + zero`` group by group (the two differ in the kernel they are packed for).
    """

    kind: Kind
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[QuantRows]) -> QuantRows:
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot join rows of different kinds {sorted(kinds)}")
        zero = torch.cat([p.zero for p in parts]) if parts[0].zero is not None else None
        return QuantRows(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero)

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix these rows stand for."""
        if self.kind == "int8":
            return self.q.float() * self.scale[:, None]
        n, k = self.q.shape
        g = (self.q.float().reshape(n, k // GROUP, GROUP) - 8) * self.scale[..., None] + self.zero[..., None]
        return g.reshape(n, k)

    def pack(self, dtype: torch.dtype) -> QuantWeight:
        """The kernel's layout, with scales in ``dtype`` (the activations' dtype: the kernels want both equal)."""
        n, k = self.q.shape
        if self.kind == "int8":
            return QuantWeight("int8", self.q.contiguous(), self.scale.to(dtype).contiguous(), n, k)
        if self.kind == "int4a8":  # the activations' dtype rides on an empty scales tensor: d and m are in data
            return QuantWeight("int4a8", q4a8.pack(self.q, self.scale, self.zero), torch.empty(0, dtype=dtype), n, k)
        pad = -n % _INT4_ROW_MULTIPLE  # zero rows (q = 8, scale = zero = 0) whose outputs are cut off
        q, scale, zero = self.q, self.scale, self.zero
        if pad:
            q = torch.cat([q, torch.full((pad, k), 8, dtype=q.dtype)])
            scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
            zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
        # packed a slab of rows at a time (the layout is per block of rows, so the slabs join as one): the
        # kernel takes int32 values, and a whole 49k-row LM head in int32 was a 400 MB peak at load
        packed = torch.cat(
            [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[a : a + SLAB_ROWS].to(torch.int32).contiguous(), 2)
                for a in range(0, n + pad, SLAB_ROWS)
            ]
        )
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (in / 32, out, 2)
        return QuantWeight("int4", packed, sz, n, k)


def join(parts: Sequence[torch.Tensor | QuantRows]) -> torch.Tensor | QuantRows:
    """Parts of a fused matrix (q/k/v, gate/up) joined by rows. Parts held differently (a file that
    keeps ``attn_v`` at more bits than ``attn_q``) all become int8 rows, the kind that loses least."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    kinds = {p.kind if isinstance(p, QuantRows) else "dense" for p in parts}
    if len(kinds) > 1:
        parts = [p if isinstance(p, QuantRows) and p.kind == "int8" else quantize_int8(_dense(p)) for p in parts]
    return QuantRows.cat(parts)  # type: ignore[arg-type]


def _dense(p: torch.Tensor | QuantRows) -> torch.Tensor:
    return p.dequantize() if isinstance(p, QuantRows) else p


SLAB_ROWS = 4096
"""Rows dequantized or quantized at a time: bounds the fp32 temporaries of a 50k-row vocabulary."""


def quantize_int8(w: torch.Tensor) -> QuantRows:
    """Symmetric int8 per output row: |error| <= max|row| / 254."""
    qs, scales = [], []
    for start in range(0, w.shape[0], SLAB_ROWS):
        c = w[start : start + SLAB_ROWS].float()
        amax = c.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        qs.append(torch.round(c / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return QuantRows("int8", torch.cat(qs), torch.cat(scales))


def quantize_int4(w: torch.Tensor) -> QuantRows:
    """Asymmetric 4 bits per group of 32 inputs: |error| <= (max - min of the group) / 30."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return QuantRows("int4", q, scale, lo + 8 * scale)


def quantize(w: torch.Tensor, kind: Kind) -> QuantRows:
    """``w`` (out, in) as ``kind``; int4 needs the inputs in whole groups of 32, else int8 is used."""
    if kind in ("int4", "int4a8") and w.shape[1] % GROUP == 0:
        rows = quantize_int4(w)
        return rows if kind == "int4" else QuantRows(kind, rows.q, rows.scale, rows.zero)
    return quantize_int8(w)


# ---- packed weights, the kernels' side -------------------------------------------------------


@dataclass(eq=False)
class QuantWeight:
    """A packed quantized (out, in) matrix; :func:`models.layers.linear` multiplies by it.

    ``int8``: ``data`` int8 (out, in), ``scales`` (out,). ``int4``: ``data`` the kernel's opaque
    layout (out padded to 16), ``scales`` (in / 32, out padded, 2) holding scale and zero.
    ``int4a8``: ``data`` :func:`models.q4a8.pack`'s layout with the scales inside, ``scales`` empty
    (it only carries the activations' dtype).
    """

    kind: Kind
    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype this weight multiplies (its scales' dtype)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for ``x`` (..., in) in :attr:`dtype`.

        A 2-D contiguous ``x`` in :attr:`dtype` (every stage forward's case) goes straight to the
        kernel: each skipped reshape or cast is a few microseconds of dispatch, 120 times a token.
        """
        if x.dim() == 2 and x.dtype == self.scales.dtype and x.is_contiguous() and x.shape[0]:
            x2, lead = x, None
        else:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
            if x2.shape[0] == 0:
                return x2.new_zeros(*lead, self.out_features)
        if self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.data, self.scales)
        elif self.kind == "int4a8":
            y = q4a8.matmul(x2, self.data, self.out_features)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.data, GROUP, self.scales)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        return y if lead is None else y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The dense matrix the kernel multiplies by, in :attr:`dtype` (for export and comparisons)."""
        if self.kind == "int8":
            return (self.data.to(torch.float32) * self.scales.float()[:, None]).to(self.dtype)
        if self.kind == "int4a8":
            return q4a8.unpack(self.data, self.out_features).to(self.dtype)
        # the packed layout is the kernel's own: read it back through the kernel with an identity
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self.matmul(eye).t().contiguous()

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids``, dequantized: the embedding lookup of a quantized vocabulary matrix."""
        if self.kind != "int8":
            raise ValueError("embedding lookups need int8 rows; the vocabulary matrix is kept as int8")
        return (self.data[ids].to(torch.float32) * self.scales[ids].float()[..., None]).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> QuantWeight | torch.Tensor:
        """The rows ``ids`` as a weight of their own (the draft head's reduced vocabulary): int8 rows
        stay int8; int4's packed layout cannot be cut, so those come back dense."""
        if self.kind == "int8":
            return QuantWeight(
                "int8", self.data[ids].contiguous(), self.scales[ids].contiguous(), len(ids), self.in_features
            )
        return self.dequantize()[ids].contiguous()


# ---- choosing a format -----------------------------------------------------------------------


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def auto_format() -> tuple[str, torch.dtype]:
    """The weight format and activation dtype ``--weights auto`` picks on this device.

    The rule, from interleaved forwards of SmolLM2-135M (Q4_1) per format (docs/benchmarks.md,
    "Weights kept quantized" and "int4a8"):

    - x86-64 where a C compiler builds :mod:`models.q4a8` with a vector path, AVX512-VNNI (Intel Ice
      Lake and later, AMD Zen 4 and later) or AVX2 with FMA and F16C (Haswell and later, AMD Zen 1-3):
      ``int4a8`` with bf16 activations. On an AMX Xeon, 2 threads, the layers' matrices take 3.2 ms
      for one row against 4.0 for torch's int4 kernel, and 9.6 against 21.7 ms for a tree of 16 rows
      (AMX tiles from 6 rows on). On a 2-core AMD EPYC with AVX2 only: 5.0 against 10.0 ms for one
      row, 28.7 against 55.2 for 16, and ``ar`` 42.8 against 27.7 tokens/s.
    - other x86-64 with AVX512 or AVX2: ``native`` with bf16 activations. One row (``ar``): int4
      ~2.2x faster than dense bf16 and ~3x than fp32 on an AMX Xeon, ~2.6x faster than fp32 with
      the kernels limited to AVX2. torch's quantized kernels are vectorized for bf16 activations;
      fp32 ones run 3-20x slower, so quantized formats default to bf16. (int4a8's plain C path
      computes the same bits ~7x slower than its vector paths, so it is not picked without one.)
    - aarch64 without CUDA (Raspberry Pi, a Jetson's CPU) where the kernel builds with its NEON path:
      ``int4a8`` with fp32 activations (these cores have no fast bf16). Not timed on such a board here:
      picked because the alternative is the whole model dequantized to fp32, 7x the bytes of a Q4 file
      per token and too large for the board's memory at 7B, while the NEON path computes the same bits
      as the plain C path (tools/issue11/check_aarch64.sh runs it under an emulator). ``--weights fp32``
      keeps the reference.
    - anything else (x86-64 without AVX2, a CPU the kernel has no vector path for, CUDA): ``fp32`` dense,
      the reference; ``--weights native`` tries torch's quantized kernels there.
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and not torch.cuda.is_available():
        flags = cpu_flags()
        vector = {"avx512_vnni", "avx512bw"} <= flags or {"avx2", "fma", "f16c"} <= flags
        # the build must have a vector path too (a compiler may target less than the CPU has)
        if vector and q4a8.available() and q4a8.simd() != "c":
            return "int4a8", torch.bfloat16
        if "avx2" in flags or "avx512f" in flags:
            return "native", torch.bfloat16
    neon = machine in ("aarch64", "arm64") and not torch.cuda.is_available()
    if neon and q4a8.available() and q4a8.simd().startswith("neon"):
        return "int4a8", quantized_activations()
    return "fp32", torch.float32


def resolve_format(weights: str | None, dtype: torch.dtype | None) -> tuple[str, torch.dtype | None]:
    """(``dense`` | ``native`` | ``int8`` | ``int4``, activation dtype) for a ``--weights`` choice.

    ``dtype`` is an explicit ``--dtype`` (None: not given). Dense formats compute in their own
    dtype, so an explicit different one is an error; quantized formats default to
    :func:`quantized_activations` (bf16; fp32 on aarch64) unless ``--dtype`` says otherwise; ``auto`` with an
    explicit ``--dtype`` other than the one it would pick keeps the weights dense in that dtype. ``None`` weights
    mean dense in ``dtype``, the library default (``dense`` too: what a loaded stage's format says).
    """
    if weights in (None, "dense"):
        return "dense", dtype
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if weights == "auto":
        fmt, dt = auto_format()
        if fmt == "fp32" or dtype not in (None, dt):  # an explicit other --dtype: dense in it
            return "dense", dtype or dt
        return fmt, dt
    if weights in ("fp32", "bf16"):
        dt = torch.float32 if weights == "fp32" else torch.bfloat16
        if dtype is not None and dtype != dt:
            raise ValueError(
                f"--weights {weights} computes in {weights}, but --dtype asks for {str(dtype)[6:]}; "
                "drop --dtype or make the two agree"
            )
        return "dense", dt
    return weights, dtype or quantized_activations()


def quantized_activations() -> torch.dtype:
    """The activations a quantized format computes with unless ``--dtype`` says otherwise: bf16 (what
    torch's quantized CPU kernels are vectorised for), except on aarch64, whose cores (Cortex-A72/A76/A78)
    have no fast bf16 and where the int4a8 kernel is as exact with fp32."""
    return torch.float32 if platform.machine().lower() in ("aarch64", "arm64") else torch.bfloat16


def matrix_kind(fmt: str, qtype: str | None) -> Kind | None:
    """How a matrix stored as ``qtype`` (a GGUF type name; None: not quantized in the file) is held
    under the resolved format ``fmt``: int8, int4, int4a8 or None for dense."""
    if fmt in ("int8", "int4"):
        return fmt  # type: ignore[return-value]
    if fmt in ("native", "int4a8") and qtype is not None and qtype not in ("F32", "F16", "BF16", "F64"):
        return ("int4" if fmt == "native" else "int4a8") if qtype in ("Q4_0", "Q4_1") else "int8"
    return None


def matrix_nbytes(out: int, inp: int, kind: Kind | None, dtype: torch.dtype) -> int:
    """Bytes an (out, in) matrix takes held as ``kind`` (None: dense in ``dtype``), as :meth:`QuantRows.pack`
    lays it out; what the planner counts before anything is loaded."""
    el = torch.empty(0, dtype=dtype).element_size()
    if kind is None:
        return out * inp * el
    if kind == "int8" or inp % GROUP:
        return out * inp + out * el
    if kind == "int4a8":
        return (out + (-out % q4a8.COLS)) * inp * 5 // 8  # 20 bytes per 32 weights, as in the file
    rows = out + (-out % _INT4_ROW_MULTIPLE)
    return rows * inp // 2 + (inp // GROUP) * rows * 2 * el


def weight_nbytes(w: torch.Tensor | QuantWeight | None) -> int:
    """Bytes a weight holds in memory, packed or not."""
    if w is None:
        return 0
    return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()
