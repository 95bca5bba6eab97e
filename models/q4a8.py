"""The ``int4a8`` kernel: 4-bit weights times 8-bit activations, cheap for a tree's many rows.

torch's int4 CPU kernel computes one activation row at a time, so verifying a tree of n rows costs
about n one-row products and speculation cannot pay on a CPU. ``q4a8.c`` (next to this file) keeps
GGUF's 4-bit blocks, rounds the activations to int8 per group of 32 as llama.cpp does for Q4 x Q8,
and multiplies up to 4 rows with each block of weights it unpacks, so the weights stream from memory
once for the whole tree. Each row's result is bitwise the same in any batch (see the C file), which
the lossless oracle needs.

The C file is compiled on first use for this CPU (``cc -O3 -march=native -fopenmp``) into
``$XDG_CACHE_HOME/meshd/kernels`` (default ``~/.cache``), keyed by the source, the compiler and the
CPU's flags, and loaded with ctypes; it shares torch's OpenMP runtime, and each call runs as many
threads as torch's ``--threads`` says, whichever thread calls it.
Where there is no C compiler the format is unavailable and says so; nothing else needs it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.cache import cache_dir

if TYPE_CHECKING:  # models.layers imports this module
    from models.kvcache import KVCache
    from models.layers import Layer, LayerShape

GROUP = 32
COLS = 16  # output columns per block of the packed layout
GROUP_BYTES = 320  # per block and group: 256 nibble bytes, 16 fp16 scales, 16 fp16 offsets
SOURCES = tuple(Path(__file__).with_name(n) for n in ("q4a8.c", "q4a8_layers.c", "q4a8.h"))
"""The library's sources: the kernel, the decoder layers built on it, and what they share."""


class KernelUnavailable(RuntimeError):
    """The int4a8 kernel cannot be built on this machine (no C compiler, or it failed)."""


def _cpu_key() -> str:
    from models.quant import cpu_flags

    return " ".join(sorted(cpu_flags()))


FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared")


def _compiler() -> str:
    given = os.environ.get("CC")
    cc = shutil.which(given) if given else shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        what = f"$CC ({given}) is not a program" if given else "found no C compiler (cc, gcc, clang)"
        raise KernelUnavailable(
            f"--weights int4a8 compiles a small C kernel on first use and {what}; "
            "install one (e.g. apt-get install gcc) or use --weights native"
        )
    return cc


@cache
def build_key() -> str:
    """What the built library depends on (source, compiler, flags, CPU), hashed: its cache name, and
    part of the cost curve's, since a changed kernel changes the curve."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    what = repr((version, FLAGS, _cpu_key(), sys.platform)).encode()
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + what).hexdigest()[:16]


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use; raises :class:`KernelUnavailable` with what to do."""
    cc = _compiler()
    out = cache_dir("kernels", f"q4a8-{build_key()}.so")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            sources = [str(p) for p in SOURCES if p.suffix == ".c"]
            proc = subprocess.run([cc, *FLAGS, *sources, "-o", str(built), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                what = f"compiling {' and '.join(sources)} with {cc} failed ({proc.stderr.strip()[-400:]})"
                raise KernelUnavailable(f"{what}; use --weights native")
            os.replace(built, out)  # atomic: concurrent daemons may build it at once
    return open_library(out)


def open_library(path: Path | str) -> ctypes.CDLL:
    """A build of the library at ``path`` with its functions' signatures set (:func:`library`'s, or an earlier
    build's for comparing two: ``tools/issue13/layers_ab.py``)."""
    lib = ctypes.CDLL(str(path))
    ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    _signature(lib.q4a8_matmul, ptr, i32, i64, i64, ptr, i64, i64, ptr, i32, i32, ptr, f32)
    _signature(lib.q8a8_matmul, ptr, i32, i64, i64, ptr, ptr, i64, ptr, i32)
    _signature(lib.q4a8_layers, ptr, i32, i64, i64, i32, ptr, i32, i32, i32, f32, ptr, ptr, i32, ptr, i32, i64)
    lib.q4a8_set_threads.restype = None
    lib.q4a8_set_threads.argtypes = [ctypes.c_int]
    lib.q4a8_has_vnni.restype = ctypes.c_int
    lib.q4a8_has_avx2.restype = ctypes.c_int
    lib.q4a8_has_neon.restype = ctypes.c_int
    lib.q4a8_amx.restype = ctypes.c_int
    return lib


def _team() -> ctypes.CDLL:
    """The library, its parallel regions sized to torch's thread count as of now (``--threads``): OpenMP's
    own setting holds only in the thread that set it, and forwards run in other threads too."""
    lib = library()
    lib.q4a8_set_threads(torch.get_num_threads())
    return lib


def _signature(fn: ctypes._CFuncPtr, *argtypes: type) -> None:
    """A C function of the library returning int (0 or an error code) and taking ``argtypes``."""
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)


def available() -> bool:
    """Whether the kernel builds here (compiling it if it was not yet)."""
    try:
        library()
    except KernelUnavailable:
        return False
    return True


def simd() -> str:
    """The build's vector path: ``vnni`` (AVX512-VNNI), ``avx2`` (AVX2 with FMA and F16C), ``neon-dot``
    (aarch64 with the dot product, ARMv8.2: Pi 5, Jetson Orin), ``neon`` (aarch64: Pi 4) or ``c`` (none)."""
    lib = library()
    if lib.q4a8_has_vnni():
        return "vnni"
    if lib.q4a8_has_avx2():
        return "avx2"
    neon = lib.q4a8_has_neon()
    return "neon-dot" if neon == 2 else "neon" if neon == 1 else "c"


def amx() -> bool:
    """Whether products of 6 rows or more go through AMX tiles (the build has them and Linux granted
    this process the tile state)."""
    return bool(library().q4a8_amx())


PATHS = {"auto": 0, "c": 1, "simd": 2, "amx": 3}
"""The kernel's code paths (``auto``: the fastest for the rows; ``simd``: the build's vector path, AVX512-VNNI
or AVX2, see :func:`simd`); all compute the same bits."""


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4 rows (``q`` uint8 (n, k) in [0, 15]; ``w = (q - 8) * scale + zero`` per group of 32) in the
    kernel's layout: uint8 (n / 16 rounded up, k / 32, 320).

    The kernel wants ``w = d * q + m``: d = scale, m = zero - 8 * scale, both as fp16. For rows read
    from a Q4_0/Q4_1 file both are the file's own fp16 values (exact); rows quantized here from
    dense weights pay one fp16 rounding of each.
    """
    n, k = q.shape
    pad = -n % COLS
    d, m = scale.float(), zero.float() - 8 * scale.float()
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        d = torch.cat([d, d.new_zeros(pad, d.shape[1])])
        m = torch.cat([m, m.new_zeros(pad, m.shape[1])])
    blocks, groups = (n + pad) // COLS, k // GROUP
    # (block, column, group, j8, t) -> (block, group, j8, column, t); j8 < 4 low nibbles, >= 4 high
    qr = q.reshape(blocks, COLS, groups, 8, 4).permute(0, 2, 3, 1, 4)
    nib = (qr[:, :, :4] | (qr[:, :, 4:] << 4)).reshape(blocks, groups, 256)

    def halves(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float16).reshape(blocks, COLS, groups).permute(0, 2, 1).contiguous().view(torch.uint8)

    return torch.cat([nib.to(torch.uint8), halves(d), halves(m)], dim=-1).contiguous()


def unpack(data: torch.Tensor, n: int) -> torch.Tensor:
    """The fp32 (n, k) matrix a packed weight stands for (``w = d * q + m``)."""
    blocks, groups, _ = data.shape
    nib = data[..., :256].reshape(blocks, groups, 4, COLS, 4)
    q = torch.cat([nib & 0x0F, nib >> 4], dim=2).permute(0, 3, 1, 2, 4).reshape(blocks * COLS, groups * GROUP)
    d = data[..., 256:288].contiguous().view(torch.float16).float().permute(0, 2, 1).reshape(blocks * COLS, groups)
    m = data[..., 288:].contiguous().view(torch.float16).float().permute(0, 2, 1).reshape(blocks * COLS, groups)
    w = q.float().reshape(blocks * COLS, groups, GROUP) * d[..., None] + m[..., None]
    return w.reshape(blocks * COLS, groups * GROUP)[:n]


def matmul(
    x: torch.Tensor,
    data: torch.Tensor,
    out_features: int,
    *,
    path: str = "auto",
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """``x @ w.T`` for a 2-D contiguous ``x`` (bf16 or fp32; the result in the same dtype); ``path``
    one of :data:`PATHS` (an unavailable one falls back to the next slower). With ``norm`` (an RMS
    norm's weight, in ``x``'s dtype): ``rms_norm(x, norm, eps) @ w.T``, the norm computed in the
    kernel as :func:`models.layers.rms_norm` defines it."""
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"int4a8 takes 2-D contiguous bf16/fp32 activations, not {x.dtype} {tuple(x.shape)}")
    rows, k = x.shape
    if k != data.shape[1] * GROUP:
        raise ValueError(f"activations of width {k} for a weight of {data.shape[1] * GROUP} inputs")
    if norm is not None and (norm.dtype != x.dtype or norm.shape != (k,) or not norm.is_contiguous()):
        raise ValueError(f"a norm weight of {k} {x.dtype} values, not {norm.dtype} {tuple(norm.shape)}")
    y = torch.empty(rows, out_features, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    rc = _team().q4a8_matmul(
        x.data_ptr(),
        bf16,
        rows,
        k,
        data.data_ptr(),
        data.shape[0],
        out_features,
        y.data_ptr(),
        bf16,
        PATHS[path],
        None if norm is None else norm.data_ptr(),
        eps,
    )
    if rc != 0:
        raise MemoryError(f"int4a8: no scratch memory for {rows} x {k} activations")
    return y


def q8a8_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, *, path: str = "auto") -> torch.Tensor:
    """``x @ (w * scales[:, None]).T`` in fp32 for int8 rows ``w`` (n, k) with one scale each (in ``x``'s
    dtype), the activations rounded to int8 per group of 32 as :func:`matmul` rounds them: the
    vocabulary matrix of an ``int4a8`` stage (see ``q8a8_matmul`` in the C file). Each row's result
    is bitwise the same in any batch and code path."""
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"q8a8 takes 2-D contiguous bf16/fp32 activations, not {x.dtype} {tuple(x.shape)}")
    rows, k = x.shape
    n = w.shape[0]
    if w.dtype != torch.int8 or w.shape[1] != k or k % GROUP or scales.shape != (n,) or scales.dtype != x.dtype:
        what = f"int8 rows {tuple(w.shape)} with {scales.dtype} scales"
        raise ValueError(f"{what} for {x.dtype} activations of width {k}")
    y = torch.empty(rows, n, dtype=torch.float32)
    w, scales = w.contiguous(), scales.contiguous()  # held here while the kernel reads them
    bf16 = int(x.dtype == torch.bfloat16)
    lib = _team()
    rc = lib.q8a8_matmul(x.data_ptr(), bf16, rows, k, w.data_ptr(), scales.data_ptr(), n, y.data_ptr(), PATHS[path])
    if rc != 0:
        raise MemoryError(f"q8a8: no scratch memory for {rows} x {k} activations")
    return y


# ---- whole decoder layers (q4a8_layers.c) ---------------------------------------------------


class _Matrix(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("blocks", ctypes.c_int64), ("out", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Matrix),
        ("o", _Matrix),
        ("gate_up", _Matrix),
        ("down", _Matrix),
        ("bqkv", ctypes.c_void_p),
        ("attn_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
    ]


class _Item(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("cap", ctypes.c_int64),
        ("past", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
    ]


def layers_enabled() -> bool:
    """Whether int4a8 stages run their layers through :class:`Layers` and their int8 LM head through
    :func:`q8a8_matmul` (``MESHD_FUSED=0``: the torch ops of :func:`models.layers.decoder_layer` and
    torch's int8 kernel instead, to compare or to rule the C code out)."""
    return os.environ.get("MESHD_FUSED", "1") != "0"


class Layers:
    """Decoder layers whose four matrices are all int4a8, prepared for ``q4a8_layers`` (one C call per
    forward instead of ~30 torch ops per layer; see ``q4a8_layers.c`` for why and how it computes).

    Build with :meth:`prepare`, which says None where the stack does not apply (another weight format,
    an EAGLE-style layer without its first norm, activations neither bf16 nor fp32, no compiler).
    """

    def __init__(self, layers: Sequence[Layer], shape: LayerShape, dtype: torch.dtype):
        self.n_layers, self.dtype = len(layers), dtype
        self.shape = (shape.n_heads, shape.n_kv_heads, shape.head_dim, float(shape.rms_eps))
        self._keep = [t for layer in layers for t in vars(layer).values() if t is not None]  # alive while used
        arr = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            arr[i] = _Layer(
                *(_Matrix(w.data.data_ptr(), w.data.shape[0], w.out_features) for w in _matrices(layer)),
                layer.bqkv.data_ptr() if layer.bqkv is not None else None,
                layer.attn_norm.data_ptr(),
                layer.ffn_norm.data_ptr(),
            )
        self._layers = arr

    @classmethod
    def prepare(cls, layers: Sequence[Layer], shape: LayerShape, dtype: torch.dtype) -> Layers | None:
        if not layers or not layers_enabled() or dtype not in (torch.bfloat16, torch.float32):
            return None
        for layer in layers:
            if layer.attn_norm is None or any(getattr(w, "kind", None) != "int4a8" for w in _matrices(layer)):
                return None
            vectors = [layer.attn_norm, layer.ffn_norm] + ([layer.bqkv] if layer.bqkv is not None else [])
            if any(v.dtype != dtype or not v.is_contiguous() or v.device.type != "cpu" for v in vectors):
                return None
        if not available():
            return None
        return cls(layers, shape, dtype)

    def forward(
        self,
        x: torch.Tensor,
        caches: Sequence[KVCache],
        sizes: Sequence[int],
        masks: Sequence[torch.Tensor | None],
        cos: torch.Tensor,
        sin: torch.Tensor,
        path: str = "auto",
        out_from: int = 0,
    ) -> torch.Tensor:
        """``x`` (T, hidden) through the layers; rows split among requests by ``sizes``, each with its
        cache (room reserved, new entries written after its live ones, not committed), bool mask
        (rows, length + rows) or None (each row sees every entry; one-row requests only), and the rows'
        RoPE ``cos``/``sin`` (T, head dim, signed sine as :class:`models.layers.Rope` gives).

        Rows before ``out_from`` are computed for their keys and values only: their rows of the result
        are not the layers' output (the last layer skips their attention, output projection and MLP)."""
        if out_from < 0 or (out_from and out_from >= x.shape[0]):
            raise ValueError(f"out_from {out_from}: need 0 <= out_from < {x.shape[0]} rows")
        y = x.to(self.dtype).contiguous().clone()
        cos, sin = cos.to(self.dtype).contiguous(), sin.to(self.dtype).contiguous()
        items = (_Item * len(caches))()
        keep = []
        for i, (kv, t, mask) in enumerate(zip(caches, sizes, masks)):
            if kv.n_layers != self.n_layers or kv.dtype != self.dtype or not kv.k.is_contiguous():
                raise ValueError(f"a cache of {kv.n_layers} {kv.dtype} layers for {self.n_layers} {self.dtype} ones")
            if mask is None and t != 1:
                raise ValueError("a mask is needed for more than one row")
            m = None if mask is None else mask.to(torch.bool).contiguous()
            keep.append(m)  # alive until the call returns
            mask_ptr = None if m is None else m.data_ptr()
            items[i] = _Item(t, kv.k.data_ptr(), kv.v.data_ptr(), kv.capacity, kv.length, mask_ptr)
        nq, nkv, hd, eps = self.shape
        rc = _team().q4a8_layers(
            y.data_ptr(),
            int(self.dtype == torch.bfloat16),
            y.shape[0],
            y.shape[1],
            self.n_layers,
            ctypes.addressof(self._layers),
            nq,
            nkv,
            hd,
            eps,
            cos.data_ptr(),
            sin.data_ptr(),
            len(caches),
            ctypes.addressof(items),
            PATHS[path],
            out_from,
        )
        if rc == -1:
            raise MemoryError(f"int4a8 layers: no scratch memory for {y.shape[0]} rows")
        if rc != 0:
            raise ValueError(f"int4a8 layers: shapes it does not take ({nq} heads, {nkv} kv heads, dim {hd})")
        return y


def _matrices(layer: Layer) -> tuple:
    return (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
