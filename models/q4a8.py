"""The ``int4a8`` kernel: 4-bit weights times 8-bit activations, cheap for a tree's many rows.

torch's int4 CPU kernel computes one activation row at a time, so verifying a tree of n rows costs
about n one-row products and speculation cannot pay on a CPU. ``q4a8.c`` (next to this file) keeps
GGUF's 4-bit blocks, rounds the activations to int8 per group of 32 as llama.cpp does for Q4 x Q8,
and multiplies up to 4 rows with each block of weights it unpacks, so the weights stream from memory
once for the whole tree. Each row's result is bitwise the same in any batch (see the C file), which
the lossless oracle needs.

The C file is compiled on first use for this CPU (``cc -O3 -march=native -fopenmp``) into
``$XDG_CACHE_HOME/meshd/kernels`` (default ``~/.cache``), keyed by the source, the compiler and the
CPU's flags, and loaded with ctypes; it shares torch's OpenMP runtime, so ``--threads`` applies.
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
from functools import cache
from pathlib import Path

import torch

from models.cache import cache_dir

GROUP = 32
COLS = 16  # output columns per block of the packed layout
GROUP_BYTES = 320  # per block and group: 256 nibble bytes, 16 fp16 scales, 16 fp16 offsets
SOURCE = Path(__file__).with_name("q4a8.c")


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
    return hashlib.sha256(SOURCE.read_bytes() + what).hexdigest()[:16]


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use; raises :class:`KernelUnavailable` with what to do."""
    cc = _compiler()
    out = cache_dir("kernels", f"q4a8-{build_key()}.so")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelUnavailable(
                    f"compiling {SOURCE} with {cc} failed ({proc.stderr.strip()[-400:]}); use --weights native"
                )
            os.replace(built, out)  # atomic: concurrent daemons may build it at once
    lib = ctypes.CDLL(str(out))
    lib.q4a8_matmul.restype = ctypes.c_int
    lib.q4a8_matmul.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_float,
    ]
    lib.q4a8_has_vnni.restype = ctypes.c_int
    lib.q4a8_has_avx2.restype = ctypes.c_int
    lib.q4a8_amx.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel builds here (compiling it if it was not yet)."""
    try:
        library()
    except KernelUnavailable:
        return False
    return True


def simd() -> str:
    """The build's vector path: ``vnni`` (AVX512-VNNI), ``avx2`` (AVX2 with FMA and F16C) or ``c`` (none)."""
    lib = library()
    return "vnni" if lib.q4a8_has_vnni() else "avx2" if lib.q4a8_has_avx2() else "c"


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
    rc = library().q4a8_matmul(
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
