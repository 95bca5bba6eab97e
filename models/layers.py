"""The decoder layer and its parts, written once for the target, the EAGLE draft head and training.

A Llama-family layer: RMS norm, fused q/k/v projection, rotary embedding, attention, output
projection, residual, RMS norm, fused gate/up projection, SwiGLU, down projection, residual.
Only the attention differs between callers (a KV cache with a tree mask, a padded batch, a
training unroll), so :func:`decoder_layer` takes it as a function and does everything else.

A stage whose matrices are all ``int4a8`` runs this same layer as C (``models/q4a8_layers.c``, one
call per forward; tests/model/test_q4a8.py holds it against this one); this stays the reference.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from models import q4a8
from models.config import ModelConfig, ModelError
from models.quant import QuantWeight

# ---- linear layers, on plain, pre-packed or quantized weights -------------------------------

Weight = torch.Tensor | QuantWeight
"""A matrix as :func:`linear` takes it: plain, pre-packed by :func:`pack_weight`, or quantized
(:class:`models.quant.QuantWeight`)."""


def _packing_works() -> bool:
    """Whether this torch build can pre-pack weights for oneDNN here (checked on a tiny fp32 matrix
    the first time each dtype is packed).

    Only on x86-64 CPUs, where it was measured: the default model's forward goes from ~37 ms to
    ~24 ms per token on this project's reference machine (a plain ``F.linear`` appears to re-lay out
    its weight on every call). Set ``MESHD_PACK=0`` to compare or to rule it out.
    """
    if os.environ.get("MESHD_PACK", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w, x = torch.randn(24, 16), torch.randn(3, 16)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
        # fp32, 16-term dot products of N(0,1) values: the two kernels differ by a few ulps of
        # |result| ~ 4, i.e. ~1e-6; 1e-4 only rejects a kernel that computes something else
        return bool(torch.allclose(got, F.linear(x, w), atol=1e-4))
    except (RuntimeError, AttributeError):
        return False


_PACK_DTYPES: dict[torch.dtype, bool] = {}


def pack_weight(w: Weight) -> Weight:
    """``w`` (out, in) in oneDNN's blocked layout for :func:`linear`, or ``w`` itself where that
    does not apply (no oneDNN, a GPU tensor, a dtype the CPU cannot pack, a quantized weight).
    Packed tensors only feed :func:`linear`; :func:`dense` gives the plain matrix back."""
    if isinstance(w, QuantWeight) or w.is_mkldnn or w.device.type != "cpu" or w.dim() != 2:
        return w
    ok = _PACK_DTYPES.get(w.dtype)
    if ok is None:
        ok = _PACK_DTYPES.setdefault(w.dtype, _packing_works() and w.dtype in (torch.float32, torch.bfloat16))
    if not ok:
        return w
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
    except RuntimeError:  # e.g. bf16 on a CPU without AVX512-BF16: stay with the plain kernel
        _PACK_DTYPES[w.dtype] = False
        return w


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that also takes a weight from :func:`pack_weight` or a quantized one."""
    if isinstance(w, QuantWeight):
        y = w.matmul(x)
        return y if b is None else y + b
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def dense(w: Weight | None) -> torch.Tensor | None:
    """The plain matrix of a weight that may be packed or quantized (for export and comparisons)."""
    if isinstance(w, QuantWeight):
        return w.dequantize()
    return w.to_dense() if w is not None and w.is_mkldnn else w


def normed_linear(
    x: torch.Tensor, norm: torch.Tensor | None, eps: float, w: Weight, b: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear(rms_norm(x, norm, eps), w, b)`` (no norm when ``norm`` is None). An ``int4a8`` weight
    takes the norm into its kernel (:func:`models.q4a8.matmul`), which reads and rounds each row
    anyway: two torch calls of ~15 us fewer per layer, 0.9 ms of a one-row forward of the embedded
    model. Every row of every batch goes the same way, so speculation still checks like against like."""
    if (
        norm is not None
        and isinstance(w, QuantWeight)
        and w.kind == "int4a8"
        and x.dim() == 2
        and x.dtype == w.dtype == norm.dtype
        and x.is_contiguous()
        and x.shape[0]
    ):
        y = q4a8.matmul(x, w.data, w.out_features, norm=norm, eps=eps)
        return y if b is None else y + b
    return linear(rms_norm(x, norm, eps) if norm is not None else x, w, b)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm computed in fp32 whatever ``x``'s dtype, as the reference implementation does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


# ---- rotary position embedding --------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling; scaled variants come from transformers' own helpers."""
    if cfg.rope_scaling:
        # lazy: importing transformers costs ~1 s, and only scaled RoPE variants need it
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kind = cfg.rope_scaling.get("rope_type")
        if kind not in ROPE_INIT_FUNCTIONS:
            raise ModelError(f"RoPE scaling {kind!r} is not supported")
        inv, scale = ROPE_INIT_FUNCTIONS[kind](cfg.to_hf(), torch.device("cpu"))
        return inv.float(), float(scale)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    return inv, 1.0


class Rope:
    """cos/sin rows by position, gathered from a table (one dtype at a time) that grows by doubling.

    Decoding and drafting ask for a handful of rows many times per round; recomputing the
    trigonometry each time cost about as much as the draft head's attention. Stages cut from one
    model share one table.
    """

    def __init__(self, inv_freq: torch.Tensor, scale: float = 1.0):
        self.inv_freq, self.scale = inv_freq, scale
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> Rope:
        return cls(*rope_inv_freq(cfg))

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (1, len(positions), head_dim) in ``dtype``: the leading axis broadcasts
        over the heads of q and k in :func:`decoder_layer`.

        The sine's first half is negated (rotate-half's sign, folded into the table once instead of
        a negation per layer; see :func:`rotate`); the second half is the plain sine."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        table = self._table
        if table is None or table[0].dtype != dtype or table[0].shape[1] < need:
            n = max(need, 2 * (table[0].shape[1] if table is not None else 256))
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            sign = torch.cat((-torch.ones_like(self.inv_freq), torch.ones_like(self.inv_freq)))
            table = ((emb.cos() * self.scale).to(dtype)[None], (emb.sin() * self.scale * sign).to(dtype)[None])
            self._table = table
        if positions.dim() == 1 and positions.numel() == 1:  # one row (decoding): a view, no gather
            p = int(positions)
            return table[0][:, p : p + 1], table[1][:, p : p + 1]
        return table[0][:, positions], table[1][:, positions]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF's layout: the first and second halves of each head form the pairs), with
    ``sin`` signed as :class:`Rope` gives it: ``x * cos + rotate_half(x) * sin`` becomes
    ``x * cos + roll(x) * signed_sin``, which is the same products (a negation is exact) in 3 ops
    instead of 6."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# ---- masks ----------------------------------------------------------------------------------


def causal_mask(past: int, t: int) -> torch.Tensor:
    """Bool (t, past + t): every row sees the whole past and the new rows up to itself."""
    m = torch.ones(t, past + t, dtype=torch.bool)
    m[:, past:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return m


def float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask from a bool one: 0 where allowed, the dtype's lowest value elsewhere.

    Every caller builds its masks as bool (trees, causal, padding); SDPA wants them added to the
    scores in the compute dtype.
    """
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


# ---- the decoder layer ----------------------------------------------------------------------


@dataclass
class Layer:
    """One decoder layer's weights (matrices possibly packed by :func:`pack_weight` or quantized).

    ``attn_norm`` is None for the first layer of public EAGLE-1 heads, which skip that norm.
    """

    wqkv: Weight
    bqkv: torch.Tensor | None
    wo: Weight
    w_gate_up: Weight
    w_down: Weight
    attn_norm: torch.Tensor | None
    ffn_norm: torch.Tensor


class LayerShape(Protocol):
    """What the layer needs to know of its model (``ModelConfig`` and the draft head's config both fit)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(q, k, v) -> o``: q (..., n_heads, T, d), k/v (..., n_kv_heads, T, d) rotated; o like q."""


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with an additive float mask (:func:`float_mask`; None: every row
    sees every key), grouped-query aware; q (..., heads, T, d), the mask broadcasts to (..., heads, T, S)."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[-3] != keys.shape[-3])


def decoder_layer(
    layer: Layer, x: torch.Tensor, shape: LayerShape, cos: torch.Tensor, sin: torch.Tensor, attend: Attention
) -> torch.Tensor:
    """``x`` (..., T, hidden) through one layer; ``cos``/``sin`` (1, T, head_dim) are the rows' RoPE
    (from :class:`Rope`).

    ``attend`` stores the new keys/values wherever its caller keeps them and attends over them.

    Written for few ops per call (a one-row forward is mostly dispatch: each op costs microseconds
    whatever its size): q and k are rotated together as one (nq + nkv)-head tensor and split as
    views; the residual adds go into the projections' fresh outputs where no gradient is needed.
    """
    nq, nkv, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
    qkv = normed_linear(x, layer.attn_norm, shape.rms_eps, layer.wqkv, layer.bqkv)
    qk = rotate(qkv[..., : (nq + nkv) * d].unflatten(-1, (nq + nkv, d)).transpose(-3, -2), cos, sin)
    v = qkv[..., (nq + nkv) * d :].unflatten(-1, (nkv, d)).transpose(-3, -2)
    o = attend(qk[..., :nq, :, :], qk[..., nq:, :, :], v)
    x = _residual(x, linear(o.transpose(-3, -2).flatten(-2), layer.wo))
    gate, up = normed_linear(x, layer.ffn_norm, shape.rms_eps, layer.w_gate_up).chunk(2, dim=-1)
    return _residual(x, linear(F.silu(gate) * up, layer.w_down))


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y``, added into ``y`` (a projection's fresh output) when no gradient is recorded: the
    same sum, one allocation fewer."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return x + y
    return y.add_(x)
