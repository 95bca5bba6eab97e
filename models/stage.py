"""A lean Llama-family forward over a range of layers, with tree masks and a compactable KV cache.

Plain torch (the layer itself is :func:`models.layers.decoder_layer`), SDPA with an explicit
float mask. The same class is a pipeline stage (layers only), an originator (the vocabulary
ends: embeddings, final norm and LM head, maybe no layers) or a whole single-device model.
transformers is the test reference, never the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import q4a8
from models.config import ModelConfig, ModelError
from models.kvcache import KVCache
from models.layers import (
    Layer,
    Rope,
    Weight,
    attention,
    causal_mask,
    decoder_layer,
    float_mask,
    linear,
    pack_weight,
    rms_norm,
)
from models.quant import (
    QuantRows,
    QuantWeight,
    cpu_flags,
    join,
    matrix_kind,
    matrix_nbytes,
    resolve_format,
    weight_nbytes,
)
from models.ranges import LayerRange
from models.source import ModelSource
from models.weights import TensorReader, release_freed_memory, vocab_names


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
    flags = cpu_flags()
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A dtype from its command-line name (``auto``: :func:`default_dtype`)."""
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


def resolve_weights(weights: str | None, dtype: torch.dtype | str | None) -> tuple[str, torch.dtype]:
    """(format held: ``dense``/``native``/``int8``/``int4``, activations' dtype) for ``--weights`` and
    ``--dtype`` as given (``auto``/None: not given); see :func:`models.quant.resolve_format`."""
    try:
        fmt, dt = resolve_format(weights, None if dtype in (None, "auto") else parse_dtype(dtype))
    except ValueError as e:
        raise ModelError(str(e)) from None
    return fmt, dt or parse_dtype(dtype)


FUSED = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)
"""A layer's matrices as :meth:`Stage.load` holds them (wqkv, wo, w_gate_up, w_down): parts joined by rows."""


def fused_names(index: int, fused: tuple[str, tuple[str, ...]]) -> list[str]:
    """HF names of the parts of one of layer ``index``'s :data:`FUSED` matrices."""
    module, parts = fused
    return [f"model.layers.{index}.{module}.{part}.weight" for part in parts]


def layer_nbytes(source: ModelSource, weights: str, dtype: torch.dtype, index: int = 0) -> int:
    """Bytes decoder layer ``index`` holds when loaded as ``weights`` (a resolved format, see
    :func:`resolve_weights`), from the file's header alone: what the planner counts per layer."""
    rd = TensorReader(source)
    cfg = source.config
    el = torch.empty(0, dtype=dtype).element_size()
    total = 2 * cfg.hidden_size * el  # the two norms
    for fused in FUSED:
        names = fused_names(index, fused)
        kinds = {matrix_kind(weights, rd.qtype(n)) for n in names}
        kind = kinds.pop() if len(kinds) == 1 else "int8"  # as models.quant.join holds mixed parts
        total += matrix_nbytes(sum(rd.shape(n)[0] for n in names), rd.shape(names[0])[1], kind, dtype)
    if cfg.qkv_bias:
        total += (cfg.q_size + 2 * cfg.kv_size) * el
    return total


class Stage:
    """Decoder layers ``layer_range`` plus, when loaded with ``vocab``, the vocabulary ends:
    embeddings, final norm and LM head.

    ``weights`` is how its matrices are held (:mod:`models.quant`): ``dense`` (in ``dtype``),
    ``native``, ``int8`` or ``int4``; ``dtype`` is always the activations' dtype.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_range: LayerRange,
        layers: list[Layer],
        *,
        embed: Weight | None = None,
        norm: torch.Tensor | None = None,
        lm_head: Weight | None = None,
        dtype: torch.dtype = torch.float32,
        rope: Rope | None = None,
        weights: str = "dense",
    ):
        if len(layers) != layer_range.n_layers:
            raise ValueError(f"{len(layers)} layers given for the range {layer_range}")
        self.cfg, self.layer_range, self.layers, self.dtype = cfg, layer_range, layers, dtype
        self.weights = weights
        self.embed_w, self.norm_w, self.lm_head_w = embed, norm, lm_head
        # the LM head stays plain too (embedding lookups when tied, draft-vocabulary rows)
        self.lm_head_packed = pack_weight(lm_head) if lm_head is not None else None
        self.rope = rope or Rope.for_model(cfg)
        # int4a8 layers run as one C call per forward where they can (MESHD_FUSED=0: never)
        self.fused = q4a8.Layers.prepare(layers, cfg, dtype) if weights == "int4a8" else None
        # ... and their int8 vocabulary rows times int8 activations, as the layers' kernel does: ~2x
        # torch's int8 kernel for one row, a third of a token's time before
        self.q8a8_head = (
            weights == "int4a8"
            and q4a8.layers_enabled()
            and isinstance(self.lm_head_packed, QuantWeight)
            and self.lm_head_packed.kind == "int8"
        )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: ModelSource | str | None,
        layer_range: LayerRange | None = None,
        *,
        vocab: bool = True,
        dtype: torch.dtype | str | None = "fp32",
        weights: str | None = None,
        reader: TensorReader | None = None,
    ) -> Stage:
        """Load the layers of ``layer_range`` (default: all) and, with ``vocab``, the vocabulary ends,
        reading nothing else.

        ``weights``: a format of :data:`models.quant.WEIGHT_FORMATS` (or ``dense``, as a loaded
        stage's :attr:`weights` says); None keeps them dense in ``dtype``. With a quantized format
        ``dtype`` is the activations' (``auto``/None: the format's own choice).
        """
        src = source if isinstance(source, ModelSource) else ModelSource.resolve(source)
        cfg = src.config
        span = layer_range or LayerRange.whole(cfg.n_layers)
        if span.stop > cfg.n_layers:
            raise ModelError(f"layer range [{span.first}, {span.stop}) is outside the model's {cfg.n_layers} layers")
        fmt, dt = resolve_weights(weights, dtype)
        rd = reader or TensorReader(src)

        def get(name: str) -> torch.Tensor:
            return rd.read(name, dt)

        def matrix(*names: str) -> Weight:
            """One matrix, the named parts joined by rows, held as ``fmt`` says and packed."""
            w = join([rd.read_matrix(n, fmt, dt) for n in names])
            return w.pack(dt) if isinstance(w, QuantRows) else pack_weight(w)

        layers = []
        for i in span:
            p = f"model.layers.{i}."
            bqkv = None
            if cfg.qkv_bias:
                bqkv = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            wqkv, wo, w_gate_up, w_down = (matrix(*fused_names(i, f)) for f in FUSED)
            layers.append(
                Layer(
                    wqkv=wqkv,
                    bqkv=bqkv,
                    wo=wo,
                    w_gate_up=w_gate_up,
                    w_down=w_down,
                    attn_norm=get(p + "input_layernorm.weight"),
                    ffn_norm=get(p + "post_attention_layernorm.weight"),
                )
            )
        embed = norm = lm_head = None
        if vocab:
            names = vocab_names(cfg)
            norm = get(names[1])
            if fmt == "dense":
                embed = get(names[0]).contiguous()
                lm_head = get(names[2]).contiguous() if len(names) > 2 else embed
            else:  # int8 rows serve lookups and, when tied, the LM head (see models.quant)
                embed = rd.read_matrix(names[0], "int8").pack(dt)
                lm_head = matrix(names[2]) if len(names) > 2 else embed
        release_freed_memory()
        return cls(cfg, span, layers, embed=embed, norm=norm, lm_head=lm_head, dtype=dt, weights=fmt)

    def slice(self, layer_range: LayerRange) -> Stage:
        """The layers ``layer_range`` (model numbering) of this stage as a stage of their own, sharing
        weights and RoPE table, without the vocabulary ends: how one loaded model becomes a ring."""
        own = self.layer_range
        if not own.first <= layer_range.first <= layer_range.stop <= own.stop:
            raise ValueError(f"layers {layer_range} are not within this stage's {own}")
        layers = self.layers[layer_range.first - own.first : layer_range.stop - own.first]
        return Stage(self.cfg, layer_range, layers, dtype=self.dtype, rope=self.rope, weights=self.weights)

    @property
    def n_layers(self) -> int:
        return self.layer_range.n_layers

    @property
    def packed(self) -> bool:
        """Whether this stage's dense matmuls run on pre-packed (oneDNN) weights."""
        ws = [layer.wqkv for layer in self.layers] + [self.lm_head_packed]
        return any(isinstance(w, torch.Tensor) and w.is_mkldnn for w in ws)

    @property
    def kernels(self) -> str:
        """The matmul kernels in a word, for logs and cache keys: the quantized format, or
        ``packed``/``plain`` for dense weights."""
        if self.weights != "dense":
            return self.weights
        return "packed" if self.packed else "plain"

    @property
    def has_vocab(self) -> bool:
        """Whether the vocabulary ends (embeddings, final norm, LM head) were loaded."""
        return self.embed_w is not None

    @property
    def logits_width(self) -> int:
        """How many logits a row gets (the LM head's rows): the length of a sampled position's noise."""
        lm = self.lm_head_w
        return lm.out_features if isinstance(lm, QuantWeight) else lm.shape[0]

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
        """Bytes of weights held, as held (packed, quantized; a tied LM head counted once)."""
        ts = [t for layer in self.layers for t in vars(layer).values()]
        ts += [self.embed_w, self.norm_w]
        if self.lm_head_w is not self.embed_w:
            ts.append(self.lm_head_w)
        if self.lm_head_packed is not self.lm_head_w:  # oneDNN's copy of a dense LM head
            ts.append(self.lm_head_packed)
        return sum(weight_nbytes(t) for t in ts)

    # ---- compute ------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if isinstance(self.embed_w, QuantWeight):
            return self.embed_w.embedding(ids)
        return F.embedding(ids, self.embed_w)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.norm_w, self.cfg.rms_eps)

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Final norm + LM head, in fp32 so greedy ties and sampling do not depend on the dtype."""
        return self.vocab_logits(hidden if normed else self.final_norm(hidden), self.lm_head_packed)

    def vocab_logits(self, h: torch.Tensor, w: Weight) -> torch.Tensor:
        """fp32 logits of rows ``h`` against vocabulary rows ``w``: the LM head, or the draft head's cut of
        it (int8 rows whenever the LM head is). On :attr:`q8a8_head` stages, int8 rows times int8
        activations (:func:`models.q4a8.q8a8_matmul`)."""
        if self.q8a8_head and h.dim() == 2:
            return q4a8.q8a8_matmul(h.to(self.dtype).contiguous(), w.data, w.scales)
        return linear(h.to(w.dtype), w).float()

    @property
    def logits_per_row(self) -> bool:
        """Whether :meth:`logits_by_row` computes rows one at a time (a quantized LM head)."""
        return isinstance(self.lm_head_packed, QuantWeight)

    def logits_by_row(self, normed: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """Row ``i``'s logits (fp32, as :meth:`logits`) for post-norm rows ``normed``, computed when
        first asked for: what a verification walk (:func:`models.verify.advance`) takes.

        A quantized LM head costs about the same per row however many rows it gets (torch's int8 and
        int4 kernels run row by row; 49,152 x 576 int8 is ~3.5 ms a row on the reference machine), and
        a walk reads only the rows on its accepted path, ~1.5 of a tree's 8: those rows alone, one at a
        time. The kernels compute each row the same way in any batch (checked in
        tests/model/test_quant.py), so the logits are the batched ones exactly. A dense LM head
        (oneDNN) costs nearly the same for 1 or 64 rows: all rows at once.
        """
        if not self.logits_per_row:
            every = self.logits(normed, normed=True)
            return every.__getitem__
        rows: dict[int, torch.Tensor] = {}

        def row(i: int) -> torch.Tensor:
            if i not in rows:
                rows[i] = self.logits(normed[i : i + 1], normed=True)[0]
            return rows[i]

        return row

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, items: Sequence[Attend]) -> torch.Tensor:
        """Run this stage's layers over ``x`` (T, hidden), rows split among ``items`` in order.

        Every item's new keys/values are appended to its cache; caches advance once all layers ran.
        """
        x = x.to(self.dtype)
        sizes = [int(it.positions.numel()) for it in items]
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} rows but items cover {sum(sizes)}")
        for it, t in zip(items, sizes):
            it.cache.reserve(t)
            if tuple(it.mask.shape) != (t, it.cache.length + t):
                raise ValueError(f"mask shape {tuple(it.mask.shape)} != ({t}, {it.cache.length + t})")
        ropes = [self.rope(it.positions, self.dtype) for it in items]
        cos = ropes[0][0] if len(ropes) == 1 else torch.cat([c for c, _ in ropes], dim=1)
        sin = ropes[0][1] if len(ropes) == 1 else torch.cat([s for _, s in ropes], dim=1)
        # a row that sees every cached entry and every new one (decoding one token) needs no mask:
        # SDPA without one skips adding zeros, and the sums are the same
        masks = [None if t == 1 and bool(it.mask.all()) else it.mask for it, t in zip(items, sizes)]
        if self.fused is not None and x.device.type == "cpu":
            x = self.fused.forward(x, [it.cache for it in items], sizes, masks, cos[0], sin[0])
        else:
            x = self._torch_layers(x, items, sizes, masks, cos, sin)
        for it, t in zip(items, sizes):
            it.cache.commit(t)
        return x

    def _torch_layers(
        self,
        x: torch.Tensor,
        items: Sequence[Attend],
        sizes: list[int],
        masks: list[torch.Tensor | None],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward`'s layers as torch ops (:func:`models.layers.decoder_layer`), caches not committed."""
        fmasks = [None if m is None else float_mask(m, self.dtype)[None, None] for m in masks]

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Each item's rows attend over its own cache only (block-diagonal)."""
            if len(items) == 1:
                keys, values = items[0].cache.write(li, k, v)
                return attention(q[None], keys[None], values[None], fmasks[0])[0]  # 4-D: SDPA's flash kernel
            outs, row = [], 0
            for it, t, m in zip(items, sizes, fmasks):
                keys, values = it.cache.write(li, k[:, row : row + t], v[:, row : row + t])
                outs.append(attention(q[None, :, row : row + t], keys[None], values[None], m)[0])
                row += t
            return torch.cat(outs, dim=-2)

        for li, layer in enumerate(self.layers):
            x = decoder_layer(layer, x, self.cfg, cos, sin, lambda q, k, v, li=li: attend(li, q, k, v))
        return x

    def forward_one(
        self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Single-request forward; a missing mask means causal over the new rows."""
        t = x.shape[0]
        if mask is None:
            mask = causal_mask(cache.length, t)
        return self.forward(x, [Attend(cache, positions, mask)])
