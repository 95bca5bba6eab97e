"""A lean Llama-family forward over a slice of layers, with tree masks and a compactable KV cache.

Plain torch, fused q/k/v and gate/up projections, SDPA with an explicit float mask. The same
class is a pipeline stage (layers only), an originator (embeddings + LM head, maybe no
layers) or a whole single-device model. transformers is the test reference, never the hot path.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.config import ModelConfig, ModelError
from models.kvcache import KVCache
from models.source import ModelSource
from models.weights import TensorReader, head_names


@dataclass
class Layer:
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor


@dataclass
class Attend:
    """One request's share of a batched forward: its cache, its rows' positions and tree mask.

    ``mask`` is bool (T, cache.length + T): True where a row may attend. Several ``Attend`` items
    run in one forward so concurrent requests share the matmuls (block-diagonal batching).
    """

    cache: KVCache
    positions: torch.Tensor
    mask: torch.Tensor


def default_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies it natively (AVX512-BF16/AMX), fp16 on CUDA, else fp32."""
    if torch.cuda.is_available():
        return torch.float16
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype()
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use fp32, bf16, fp16 or auto")
    return table[name]


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
        return bool(torch.allclose(got, F.linear(x, w), atol=1e-4))
    except (RuntimeError, AttributeError):
        return False


_PACK_DTYPES: dict[torch.dtype, bool] = {}


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in) in oneDNN's blocked layout for :func:`linear`, or ``w`` itself where that
    does not apply (no oneDNN, a GPU tensor, a dtype the CPU cannot pack). Packed tensors only feed
    :func:`linear`; :func:`dense` gives the plain matrix back."""
    if w.is_mkldnn or w.device.type != "cpu" or w.dim() != 2:
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


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that also takes a weight from :func:`pack_weight`."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def dense(w: torch.Tensor | None) -> torch.Tensor | None:
    return w.to_dense() if w is not None and w.is_mkldnn else w


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling; scaled variants come from transformers' own helpers."""
    if cfg.rope_scaling:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kind = cfg.rope_scaling.get("rope_type")
        if kind not in ROPE_INIT_FUNCTIONS:
            raise ModelError(f"RoPE scaling {kind!r} is not supported")
        inv, scale = ROPE_INIT_FUNCTIONS[kind](cfg.to_hf(), torch.device("cpu"))
        return inv.float(), float(scale)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    return inv, 1.0


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Stage:
    """Decoder layers ``[first, last)`` plus, when ``head`` was loaded, embeddings, final norm, LM head."""

    def __init__(
        self,
        cfg: ModelConfig,
        first: int,
        last: int,
        layers: list[Layer],
        *,
        embed: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
        lm_head: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        inv_freq: torch.Tensor | None = None,
        rope_scale: float = 1.0,
    ):
        self.cfg, self.first, self.last, self.layers, self.dtype = cfg, first, last, layers, dtype
        self.embed_w, self.norm_w, self.lm_head_w = embed, norm, lm_head
        # the LM head stays plain too (embedding lookups when tied, draft-vocabulary rows)
        self.lm_head_packed = pack_weight(lm_head) if lm_head is not None else None
        if inv_freq is None:
            inv_freq, rope_scale = rope_inv_freq(cfg)
        self.inv_freq, self.rope_scale = inv_freq, rope_scale

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: ModelSource | str | None,
        first: int = 0,
        last: int | None = None,
        *,
        head: bool = True,
        dtype: torch.dtype | str | None = "fp32",
        reader: TensorReader | None = None,
    ) -> Stage:
        """Load layers ``[first, last)`` (and the head parts if asked), reading nothing else."""
        src = source if isinstance(source, ModelSource) else ModelSource.resolve(source)
        cfg = src.config
        last = cfg.n_layers if last is None else last
        if not 0 <= first <= last <= cfg.n_layers:
            raise ModelError(f"layer range [{first}, {last}) is outside the model's {cfg.n_layers} layers")
        dt = parse_dtype(dtype)
        rd = reader or TensorReader(src)

        def get(name: str) -> torch.Tensor:
            return rd.read(name).to(dt)

        layers = []
        for i in range(first, last):
            p = f"model.layers.{i}."
            bqkv = None
            if cfg.qkv_bias:
                bqkv = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            layers.append(
                Layer(
                    wqkv=pack_weight(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])),
                    bqkv=bqkv,
                    wo=pack_weight(get(p + "self_attn.o_proj.weight")),
                    w_gate_up=pack_weight(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])),
                    w_down=pack_weight(get(p + "mlp.down_proj.weight")),
                    attn_norm=get(p + "input_layernorm.weight"),
                    ffn_norm=get(p + "post_attention_layernorm.weight"),
                )
            )
        embed = norm = lm_head = None
        if head:
            names = head_names(cfg)
            embed = get(names[0]).contiguous()
            norm = get(names[1])
            lm_head = get(names[2]).contiguous() if len(names) > 2 else embed
        return cls(cfg, first, last, layers, embed=embed, norm=norm, lm_head=lm_head, dtype=dt)

    @property
    def n_layers(self) -> int:
        return self.last - self.first

    @property
    def packed(self) -> bool:
        """Whether this stage's matmuls run on pre-packed (oneDNN) weights."""
        ws = [layer.wqkv for layer in self.layers] + [self.lm_head_packed]
        return any(w is not None and w.is_mkldnn for w in ws)

    @property
    def has_head(self) -> bool:
        return self.embed_w is not None

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(
            self.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            self.dtype,
            capacity,
            max_capacity=max(capacity, self.cfg.max_position),
        )

    def nbytes(self) -> int:
        ts = [t for layer in self.layers for t in vars(layer).values() if t is not None]
        ts += [t for t in (self.embed_w, self.norm_w) if t is not None]
        if self.lm_head_w is not None and self.lm_head_w is not self.embed_w:
            ts.append(self.lm_head_w)
        return sum(t.numel() * t.element_size() for t in ts)

    # ---- compute ------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return F.embedding(ids, self.embed_w)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.norm_w, self.cfg.rms_eps)

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Final norm + LM head, in fp32 so greedy ties and sampling do not depend on the dtype."""
        h = hidden if normed else self.final_norm(hidden)
        return linear(h, self.lm_head_packed).float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, items: Sequence[Attend]) -> torch.Tensor:
        """Run this stage's layers over ``x`` (T, hidden), rows split among ``items`` in order.

        Every item's new keys/values are appended to its cache; caches advance once all layers ran.
        """
        cfg = self.cfg
        x = x.to(self.dtype)
        sizes = [int(it.positions.numel()) for it in items]
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} rows but items cover {sum(sizes)}")
        for it, t in zip(items, sizes):
            it.cache.reserve(t)
            if tuple(it.mask.shape) != (t, it.cache.length + t):
                raise ValueError(f"mask shape {tuple(it.mask.shape)} != ({t}, {it.cache.length + t})")
        ropes = [self._rope(it.positions) for it in items]
        neg = torch.finfo(self.dtype).min
        masks = [torch.zeros(it.mask.shape, dtype=self.dtype).masked_fill_(~it.mask, neg)[None, None] for it in items]
        hd, nq, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, cfg.rms_eps)
            qkv = linear(h, layer.wqkv, layer.bqkv)
            outs = []
            row = 0
            for it, t, (cos, sin), m in zip(items, sizes, ropes, masks):
                part = qkv[row : row + t]
                row += t
                q = part[:, : nq * hd].view(t, nq, hd).transpose(0, 1)
                k = part[:, nq * hd : (nq + nkv) * hd].view(t, nkv, hd).transpose(0, 1)
                v = part[:, (nq + nkv) * hd :].view(t, nkv, hd).transpose(0, 1)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                keys, values = it.cache.write(li, k, v)
                o = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=m, enable_gqa=nq != nkv)
                outs.append(o[0].transpose(0, 1).reshape(t, nq * hd))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + linear(attn, layer.wo)
            h = rms_norm(x, layer.ffn_norm, cfg.rms_eps)
            gate, up = linear(h, layer.w_gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.w_down)
        for it, t in zip(items, sizes):
            it.cache.commit(t)
        return x

    def forward_one(
        self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Single-request forward; a missing mask means causal over the new rows."""
        t = x.shape[0]
        if mask is None:
            mask = causal_mask(cache.length, t)
        return self.forward(x, [Attend(cache, positions, mask)])

    # ---- measurement --------------------------------------------------------------------
    @torch.inference_mode()
    def cost_curve(
        self,
        sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        context: int = 128,
        repeats: int = 3,
        with_head: bool = False,
    ) -> dict[int, float]:
        """Seconds for one forward over T new tokens after ``context`` cached ones (median of repeats).

        The tree budget is chosen from this curve: on a flat (GPU) curve big trees are free, on a
        steep (CPU) curve every node must earn its cost.
        """
        out: dict[int, float] = {}
        cache = self.new_cache(context + max(sizes))
        hidden = torch.randn(context, self.cfg.hidden_size, dtype=self.dtype) * 0.1
        self.forward_one(hidden, cache, torch.arange(context))
        for t in sizes:
            x = torch.randn(t, self.cfg.hidden_size, dtype=self.dtype) * 0.1
            pos = torch.arange(context, context + t)
            times = []
            for _ in range(repeats + 1):
                cache.truncate(context)
                t0 = time.perf_counter()
                y = self.forward_one(x, cache, pos)
                if with_head and self.has_head:
                    self.logits(y)
                times.append(time.perf_counter() - t0)
            out[t] = sorted(times[1:])[len(times[1:]) // 2]
        return out


def causal_mask(past: int, t: int) -> torch.Tensor:
    """Bool (t, past + t): every row sees the whole past and the new rows up to itself."""
    m = torch.ones(t, past + t, dtype=torch.bool)
    m[:, past:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return m
