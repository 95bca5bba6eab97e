"""An EAGLE-style draft head: one decoder layer that predicts the target's next post-norm feature.

Input at position t is the embedding of token t+1 joined with the target's post-norm feature at t
(``fc``: 2H -> H), then one decoder layer of the target's shape; its output stands for the feature
at t+1, and tokens come from the target's own (shared, frozen) LM head rows. A reduced draft
vocabulary (EAGLE-3 style: the most frequent tokens of the training data) keeps that head cheap;
log-probs are a real distribution over the subset. Deeper tree levels run autoregressively on the
head's own predicted features, with a small KV cache cropped back to the committed prefix after
every draft.

The same :class:`EagleHead` forward serves training (batched, with a multi-step "training-time
test" unroll) and drafting (rows with a KV cache and a tree mask), so the two cannot drift apart.

Files: our own format is ``eagle.json`` (shape, draft vocabulary size, target fingerprint) plus
``head.safetensors`` (fp16; ``draft_vocab`` holds the subset's token ids). The public EAGLE layout
(``config.json`` + ``fc.*`` / ``layers.0.*`` weights in ``model.safetensors`` or
``pytorch_model.bin``) loads too; it has no fingerprint, so only its shape is checked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.cache import cache_dir
from models.config import ModelConfig, ModelError
from models.kvcache import KVCache
from models.layers import Layer, Rope, Weight, attention, causal_mask, decoder_layer, float_mask, linear, pack_weight
from models.q4a8 import Layers
from models.quant import Kind, QuantWeight, matrix_kind, quantize
from models.source import ModelSource
from models.stage import Stage
from models.tree import DraftRows, NodePath, Tree, add_level, draft_tree, session_paths
from models.verify import Draws

FORMAT = "meshd-eagle-1"
CONFIG_FILE = "eagle.json"
WEIGHTS_FILE = "head.safetensors"
HEADS_DIR = Path(__file__).resolve().parent / "heads"


@dataclass
class HeadConfig:
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int = 0  # 0: the full vocabulary
    # greedy drafts rank only the draft vocabulary's first N ids (0: all of it); sampled drafts rank all. A
    # widened head keeps its old ids first: at T=0 the wider rows added 0.3 % for 2.5x the draft's time, at
    # T=1 3.7 % (docs/draft-head.md, "A wider draft vocabulary")
    greedy_vocab_size: int = 0
    fc_bias: bool = True
    qkv_bias: bool = False
    input_norm: bool = True  # EAGLE-1's public heads skip the first layer's input norm
    target_fingerprint: str | None = None
    target_name: str | None = None
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_target(cls, cfg: ModelConfig, **kw) -> HeadConfig:
        return cls(
            hidden_size=cfg.hidden_size,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            rms_eps=cfg.rms_eps,
            vocab_size=cfg.vocab_size,
            qkv_bias=cfg.qkv_bias,
            **kw,
        )

    def check_target(self, cfg: ModelConfig, fingerprint: str | None, where: str) -> None:
        if fingerprint and self.target_fingerprint and fingerprint != self.target_fingerprint:
            raise ModelError(
                f"draft head {where} was trained for target {self.target_name or '?'} (fingerprint "
                f"{self.target_fingerprint}) but the target here has fingerprint {fingerprint}; train one for "
                "this model with `meshd train-draft --model ...` or use --drafter ngram."
            )
        if (self.hidden_size, self.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
            raise ModelError(
                f"draft head {where} expects hidden size {self.hidden_size} and vocabulary {self.vocab_size}, "
                f"but the target has {cfg.hidden_size} and {cfg.vocab_size}; it was trained for another model."
            )


class EagleHead(nn.Module):
    """fc + one decoder layer. Embeddings and LM-head rows are the target's, passed in, never owned."""

    def __init__(self, hc: HeadConfig, target_cfg: ModelConfig):
        super().__init__()
        self.hc = hc
        h, q, kv = hc.hidden_size, hc.n_heads * hc.head_dim, hc.n_kv_heads * hc.head_dim
        self.fc = nn.Linear(2 * h, h, bias=hc.fc_bias)
        self.wqkv = nn.Parameter(torch.empty(q + 2 * kv, h))
        self.bqkv = nn.Parameter(torch.zeros(q + 2 * kv)) if hc.qkv_bias else None
        self.wo = nn.Parameter(torch.empty(h, q))
        self.w_gate_up = nn.Parameter(torch.empty(2 * hc.intermediate_size, h))
        self.w_down = nn.Parameter(torch.empty(h, hc.intermediate_size))
        self.attn_norm = nn.Parameter(torch.ones(h)) if hc.input_norm else None
        self.ffn_norm = nn.Parameter(torch.ones(h))
        self.register_buffer("draft_vocab", torch.arange(hc.draft_vocab_size or hc.vocab_size), persistent=False)
        self.rope = Rope.for_model(target_cfg)
        for w in (self.wqkv, self.wo, self.w_gate_up, self.w_down):
            nn.init.normal_(w, std=0.02)
        self._packed: dict[str, tuple[Weight, int]] = {}  # name -> (packed weight, param version)
        self._fused: Layers | None = None

    def _param(self, name: str) -> torch.Tensor:
        return self.fc.weight if name == "fc" else getattr(self, name)

    def pack(self, kind: Kind | None = None) -> None:
        """Pre-pack the weights for drafting (see :func:`models.layers.pack_weight`), quantized to
        ``kind`` (int8/int4, the target's kernels; see :mod:`models.quant`) or dense in the
        parameters' dtype. Training, which needs gradients, uses the parameters; a parameter
        changed in place since (an optimizer step, a load) falls back to itself until the next ``pack``."""

        def packed(w: torch.Tensor) -> Weight:
            return quantize(w, kind).pack(w.dtype) if kind is not None else pack_weight(w)

        self._packed = {
            n: (packed(self._param(n).detach()), self._param(n)._version)
            for n in ("fc", "wqkv", "wo", "w_gate_up", "w_down")
        }
        # int4a8 matrices: the decoder layer as one C call, as a target stage's layers run (the torch ops
        # of decoder_layer cost a draft level more than its four matrices do)
        self._fused = Layers.prepare([self.layer(packed=True)], self.hc, self.fc.weight.dtype)

    def _w(self, name: str) -> Weight:
        param = self._param(name)
        if self._packed and not torch.is_grad_enabled():
            packed, version = self._packed[name]
            if version == param._version:
                return packed
        return param

    def _fused_layer(self) -> Layers | None:
        """The decoder layer in C for drafting: packed as int4a8, no gradients wanted, and no matrix
        changed in place since :meth:`pack` (as for :meth:`_w`)."""
        if self._fused is None or torch.is_grad_enabled() or self.fc.weight.dtype != self._fused.dtype:
            return None
        return self._fused if all(v == self._param(n)._version for n, (_, v) in self._packed.items()) else None

    # ---- the one forward ----------------------------------------------------------------
    def fuse(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """The layer's input: ``fc`` over (embedding of token t+1, feature t)."""
        dt = self.fc.weight.dtype
        return linear(torch.cat([emb.to(dt), feat.to(dt)], dim=-1), self._w("fc"), self.fc.bias)

    def layer(self, packed: bool = False) -> Layer:
        """The decoder layer's weights as :func:`models.layers.decoder_layer` takes them (packed when drafting,
        or with ``packed``)."""

        def w(name: str) -> Weight:
            return self._packed[name][0] if packed else self._w(name)

        def v(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else p.detach() if packed else p

        return Layer(
            wqkv=w("wqkv"),
            bqkv=v(self.bqkv),
            wo=w("wo"),
            w_gate_up=w("w_gate_up"),
            w_down=w("w_down"),
            attn_norm=v(self.attn_norm),
            ffn_norm=v(self.ffn_norm),
        )

    def step(
        self,
        emb: torch.Tensor,
        feat: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor,
        mask: torch.Tensor,
        out_from: int = 0,
    ) -> torch.Tensor:
        """Drafting: rows (T, H) appended to ``cache``; ``mask`` bool (T, cache.length + T). Rows before
        ``out_from`` are wanted for their cache entries only: the C layer (int4a8) skips the rest of their
        work and their output rows are then not meaningful; the torch layer computes them anyway."""
        t = emb.shape[0]
        cache.reserve(t)
        x = self.fuse(emb, feat)
        cos, sin = self.rope(positions, x.dtype)
        fused = self._fused_layer()
        if fused is not None:
            out = fused.forward(x, [cache], [t], [mask], cos[0], sin[0], out_from=out_from)
            cache.commit(t)
            return out
        fmask = float_mask(mask, x.dtype)[None, None]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.write(0, k.to(cache.dtype), v.to(cache.dtype))
            return attention(q[None], keys[None].to(x.dtype), values[None].to(x.dtype), fmask)[0]

        out = decoder_layer(self.layer(), x, self.hc, cos, sin, attend)
        cache.commit(t)
        return out

    def unroll(self, emb: torch.Tensor, feat: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training: (B, T, H) rows t = (embedding of token t+1, feature t); returns one output per step.

        Step 1 sees real features everywhere (causal). Step s at row q feeds on step s-1's output at
        row q-1 and attends real rows <= q-s+1 plus its own earlier steps' rows q-s+j, exactly the
        mask the drafter has at tree depth s (EAGLE-3's training-time test).
        """
        t = emb.shape[1]
        pos = torch.arange(t)
        cos, sin = self.rope(pos, self.fc.weight.dtype)
        layer = self.layer()
        outs, keys, values = [], [], []
        inp = feat
        for s in range(1, steps + 1):
            x = self.fuse(emb, inp)
            allowed = [pos[None, :] <= pos[:, None] - (s - 1)]
            allowed += [pos[None, :] == pos[:, None] - (s - j) for j in range(2, s + 1)]
            fmask = float_mask(torch.cat(allowed, dim=1), x.dtype)  # every row sees at least its own step

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmask=fmask) -> torch.Tensor:
                keys.append(k)
                values.append(v)
                return attention(q, torch.cat(keys, dim=-2), torch.cat(values, dim=-2), fmask)

            out = decoder_layer(layer, x, self.hc, cos, sin, attend)
            outs.append(out)
            inp = torch.cat([feat[:, :1], out[:, :-1]], dim=1)  # row 0 has no predecessor (masked out of the loss)
        return outs

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- files --------------------------------------------------------------------------
    def state_for_file(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        hc = self.hc
        q, kv = hc.n_heads * hc.head_dim, hc.n_kv_heads * hc.head_dim
        wq, wk, wv = self.wqkv.detach().split([q, kv, kv])
        gate, up = self.w_gate_up.detach().chunk(2)
        sd = {
            "fc.weight": self.fc.weight,
            "layers.0.self_attn.q_proj.weight": wq,
            "layers.0.self_attn.k_proj.weight": wk,
            "layers.0.self_attn.v_proj.weight": wv,
            "layers.0.self_attn.o_proj.weight": self.wo,
            "layers.0.mlp.gate_proj.weight": gate,
            "layers.0.mlp.up_proj.weight": up,
            "layers.0.mlp.down_proj.weight": self.w_down,
            "layers.0.post_attention_layernorm.weight": self.ffn_norm,
        }
        if self.fc.bias is not None:
            sd["fc.bias"] = self.fc.bias
        if self.bqkv is not None:
            bq, bk, bv = self.bqkv.detach().split([q, kv, kv])
            sd.update(
                {
                    "layers.0.self_attn.q_proj.bias": bq,
                    "layers.0.self_attn.k_proj.bias": bk,
                    "layers.0.self_attn.v_proj.bias": bv,
                }
            )
        if self.attn_norm is not None:
            sd["layers.0.input_layernorm.weight"] = self.attn_norm
        return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}

    def load_file_state(self, sd: dict[str, torch.Tensor], where: str) -> None:
        p = "layers.0."

        def get(name: str) -> torch.Tensor:
            if name not in sd:
                raise ModelError(f"draft head {where} lacks tensor {name!r}")
            return sd[name].float()

        try:
            with torch.no_grad():
                self.fc.weight.copy_(get("fc.weight"))
                if self.fc.bias is not None:
                    self.fc.bias.copy_(get("fc.bias"))
                self.wqkv.copy_(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if self.bqkv is not None:
                    self.bqkv.copy_(torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                self.wo.copy_(get(p + "self_attn.o_proj.weight"))
                self.w_gate_up.copy_(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
                self.w_down.copy_(get(p + "mlp.down_proj.weight"))
                self.ffn_norm.copy_(get(p + "post_attention_layernorm.weight"))
                if self.attn_norm is not None:
                    self.attn_norm.copy_(get(p + "input_layernorm.weight"))
        except RuntimeError as e:  # a shape mismatch
            raise ModelError(f"draft head {where} does not fit this target's shape: {e}") from None


def save_head(head: EagleHead, out: Path, report: dict | None = None) -> Path:
    """Write our own format: eagle.json + fp16 head.safetensors (+ report.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = head.state_for_file()
    if head.hc.draft_vocab_size:
        sd["draft_vocab"] = head.draft_vocab.to(torch.int32).contiguous()
    save_file(sd, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    cfg = asdict(head.hc)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return out


def _public_config(raw: dict, target: ModelConfig) -> HeadConfig:
    h = int(raw.get("hidden_size", 0))
    nh = int(raw.get("num_attention_heads", target.n_heads))
    return HeadConfig(
        hidden_size=h,
        n_heads=nh,
        n_kv_heads=int(raw.get("num_key_value_heads", nh)),
        head_dim=int(raw.get("head_dim") or (h // nh if nh else 0)),
        intermediate_size=int(raw.get("intermediate_size", 0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        vocab_size=int(raw.get("vocab_size", 0)),
        draft_vocab_size=int(raw.get("draft_vocab_size", 0) or 0),
        fc_bias=bool(raw.get("bias", True)),
        qkv_bias=bool(raw.get("attention_bias", False)),
        input_norm=False,
        target_name=raw.get("_name_or_path"),
        format="eagle-public",
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    for name in ("pytorch_model.bin", "model.bin"):
        if (path / name).is_file():
            return torch.load(str(path / name), map_location="cpu", weights_only=True)
    raise ModelError(f"draft head {path}: no *.safetensors or pytorch_model.bin next to the config")


def load_head(path: str | Path, target_cfg: ModelConfig, fingerprint: str | None = None) -> EagleHead:
    """Load a head in our own format or the public EAGLE layout; refuse one trained for another target."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ModelError(f"draft head {path} not found; train one with `meshd train-draft` or use --drafter ngram")
    own = path / CONFIG_FILE
    if own.is_file():
        raw = json.loads(own.read_text())
        if raw.get("format") != FORMAT:
            raise ModelError(f"draft head {path}: unknown format {raw.get('format')!r}")
        hc = HeadConfig(**raw)
        hc.check_target(target_cfg, fingerprint, str(path))
        sd = _read_weights(path)
    elif (path / "config.json").is_file():
        hc = _public_config(json.loads((path / "config.json").read_text()), target_cfg)
        hc.check_target(target_cfg, None, str(path))
        sd = _read_weights(path)
        if "fc.weight" not in sd or not any(k.startswith("layers.0.") for k in sd):
            raise ModelError(f"{path} is not an EAGLE head (no fc.* and layers.0.* weights)")
        hc.input_norm = "layers.0.input_layernorm.weight" in sd
        hc.fc_bias = "fc.bias" in sd
        hc.qkv_bias = "layers.0.self_attn.q_proj.bias" in sd
        if "d2t" in sd and "draft_vocab" not in sd:  # EAGLE-3 stores offsets: full id = i + d2t[i]
            sd["draft_vocab"] = torch.arange(sd["d2t"].numel()) + sd["d2t"].long()
        if "draft_vocab" in sd:
            hc.draft_vocab_size = int(sd["draft_vocab"].numel())
    else:
        raise ModelError(f"{path}: not a draft head (expected {CONFIG_FILE} or an EAGLE config.json)")
    head = EagleHead(hc, target_cfg)
    head.load_file_state(sd, str(path))
    if hc.draft_vocab_size:
        ids = sd["draft_vocab"].long()
        if ids.numel() != hc.draft_vocab_size or int(ids.max()) >= hc.vocab_size or int(ids.min()) < 0:
            raise ModelError(f"draft head {path}: draft vocabulary ids out of range")
        head.draft_vocab = ids
    if not 0 <= hc.greedy_vocab_size <= len(head.draft_vocab):
        raise ModelError(
            f"draft head {path}: greedy_vocab_size {hc.greedy_vocab_size} is not within its draft vocabulary of "
            f"{len(head.draft_vocab)} (fix {CONFIG_FILE}, or set it to 0 to draft greedily over all of it)"
        )
    return head.eval()


def user_heads_dir() -> Path:
    """Heads this user trained (``meshd train-draft`` writes here by default): ``$XDG_CACHE_HOME/meshd/heads``.

    A per-user cache, not the package: a pip-installed meshd's ``models/heads`` is read-only, and a
    head trained for one user's model is no business of the package's."""
    return cache_dir("heads")


def head_dirs() -> list[Path]:
    """Where ``eagle`` and ``auto`` look for a target's head, first match wins: the user's heads, then
    the shipped ones. A head the user trained for a target that also has a shipped head was trained on
    purpose (on their own prompts, or longer), so it wins; deleting it brings the shipped one back."""
    return [user_heads_dir(), HEADS_DIR]


def find_head(fingerprint: str | None, cfg: ModelConfig, roots: Sequence[Path] | None = None) -> Path:
    """The head trained for this target, matched by fingerprint in ``roots`` (default :func:`head_dirs`,
    in order), or an error naming every place searched and how to make one.

    Directories starting with a dot are skipped: ``meshd train-draft`` writes a head into one and renames
    it into place only once complete, so a crashed run never leaves a half head to be found."""
    roots = head_dirs() if roots is None else list(roots)
    searched = []
    for root in roots:
        found = []
        if root.is_dir():
            for conf in sorted(root.glob(f"*/{CONFIG_FILE}")):
                if conf.parent.name.startswith("."):
                    continue
                try:
                    raw = json.loads(conf.read_text())
                except (OSError, ValueError):
                    continue
                found.append(raw.get("target_name") or conf.parent.name)
                if fingerprint and raw.get("target_fingerprint") == fingerprint:
                    if not (conf.parent / WEIGHTS_FILE).is_file():
                        raise ModelError(
                            f"draft head {conf.parent} has no {WEIGHTS_FILE} next to its {CONFIG_FILE}; delete the "
                            "directory and run `meshd train-draft` again (or reinstall meshd for a shipped head)"
                        )
                    return conf.parent
        searched.append(f"{root} ({', '.join(found) or 'none'})")
    raise ModelError(
        f"no EAGLE draft head for this target (fingerprint {fingerprint}) in {' or '.join(searched)}. "
        f"Train one with `meshd train-draft --model MODEL` (it is written to {user_heads_dir()}, where "
        "--drafter auto and eagle find it), or use --drafter ngram."
    )


class EagleDrafter:
    """Drafts with an :class:`EagleHead` fed by the target's post-norm features.

    Cache row t holds the head's KV for (token t+1, feature t); rows exist for every committed t
    whose feature is known, i.e. up to the root's predecessor. The last committed row's output is
    the root's predicted feature, so level 1 of the tree needs no extra forward. Tree levels are
    appended to the cache while drafting and stay there (:class:`~models.tree.DraftRows`) until the
    next draft, so :meth:`extend` can grow the pool; the next draft crops them away.
    """

    def __init__(self, head: EagleHead, target: Stage, name: str = "eagle"):
        if not target.has_vocab:
            raise ValueError("the EAGLE drafter needs the target's embeddings and LM head")
        self.head, self.target, self.name = head, target, name
        self.dtype = target.dtype
        self.head.to(self.dtype)
        # the head's matrices are fp16 in its file: ``native`` keeps them dense, int8/int4 quantize them, and
        # int4a8 too: drafting 12 everyday prompts, the head's share of a run fell from 24 to 20 % of the
        # time with the same tokens per round (2.00 / 2.04; docs/benchmarks.md, "int4a8")
        self.head.pack("int4a8" if target.weights == "int4a8" else matrix_kind(target.weights, None))
        ids = head.draft_vocab
        greedy = head.hc.greedy_vocab_size or len(ids)
        self.lm_rows = self._rows(ids[:greedy])
        self.lm_wide = self._rows(ids[greedy:]) if greedy < len(ids) else None  # sampled drafts' extra rows
        self.vocab = ids.tolist()
        self.coupling: tuple[Draws, float] | None = None  # see models.drafters.couple
        self.cache = KVCache(
            1, head.hc.n_kv_heads, head.hc.head_dim, self.dtype, 256, max_capacity=max(256, target.cfg.max_position)
        )
        self.reset([])

    def fresh(self) -> EagleDrafter:
        """A drafter for another request sharing this one's weights (per-request state is separate)."""
        other = EagleDrafter.__new__(EagleDrafter)
        other.head, other.target, other.name, other.dtype = self.head, self.target, self.name, self.dtype
        other.lm_rows, other.lm_wide, other.vocab, other.coupling = self.lm_rows, self.lm_wide, self.vocab, None
        other.cache = KVCache(
            1, self.head.hc.n_kv_heads, self.head.hc.head_dim, self.dtype, 256, max_capacity=self.cache.max_capacity
        )
        other.reset([])
        return other

    def reset(self, prompt: list[int]) -> None:
        self.cache.truncate(0)
        self._tokens: list[int] = []
        # the target's features of the committed positions, rows [0, _nfeat) of a buffer that grows by doubling
        # (kept across requests): a plain round appends one row, where a concatenation copied them all
        if getattr(self, "_fbuf", None) is None:
            self._fbuf = torch.zeros(256, self.head.hc.hidden_size, dtype=self.dtype)
        self._nfeat = 0
        self._last_out: torch.Tensor | None = None
        self._rows = 0  # committed rows in the cache; the latest draft's rows follow them
        self._session: DraftRows | None = None

    @property
    def features(self) -> torch.Tensor:
        """The target's post-norm features of the committed positions this drafter holds (a view)."""
        return self._fbuf[: self._nfeat]

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        if hidden is None:
            return
        m = hidden.shape[0]
        start = len(context) - 1 - m  # position of hidden[0]
        same = len(self._tokens)
        if same > len(context) or context[:same] != self._tokens:  # not the usual extension: find where they part
            same, limit = 0, min(len(self._tokens), len(context))
            while same < limit and self._tokens[same] == context[same]:
                same += 1
        keep = min(start, same, self._nfeat)
        if keep < start:  # a gap in the features: start over from what we were given
            self.reset([])
            if start > 0:
                return
        if keep + m > self._fbuf.shape[0]:
            grown = self._fbuf.new_zeros(max(keep + m, 2 * self._fbuf.shape[0]), self._fbuf.shape[1])
            grown[:keep] = self._fbuf[:keep]
            self._fbuf = grown
        self._fbuf[keep : keep + m] = hidden
        self._nfeat = keep + m
        # row t needs tokens up to t+1 and feature t, both unchanged below ``same - 1``. The latest draft's
        # rows stand on the committed rows: they stay (extend() grows that draft) while those do
        valid = min(self._rows, same - 1, keep)
        if valid < self._rows:
            self._rows = max(valid, 0)
            self.cache.truncate(self._rows)
            self._last_out, self._session = None, None
        self._tokens = list(context)

    @torch.inference_mode()
    def _sync(self, context: list[int]) -> torch.Tensor:
        """Fill cache rows up to the root's predecessor (dropping the latest draft's rows); return the
        root's predicted feature."""
        n = len(context) - 1  # the root's position; rows 0..n-1
        if self._nfeat < n:
            raise RuntimeError(
                "the EAGLE drafter needs the target's features of every committed position; "
                "call accept(context, hidden) first"
            )
        self._session = None
        if self._rows > n:
            self._rows, self._last_out = n, None
        self.cache.truncate(self._rows)
        done = self._rows
        if done == n and self._last_out is not None:
            return self._last_out
        if done == n:  # recompute the last row
            self.cache.truncate(n - 1)
            done = n - 1
        toks = torch.tensor(context[done + 1 : n + 1])
        # only the last row's output is used (the root's predicted feature); the rows before it are the
        # positions decoded since the last draft, wanted for their cache entries (a probe's catch-up fell from
        # 4.0 to 1.4 ms on average: docs/benchmarks.md, "Never slower, per prompt")
        out = self.head.step(
            self.target.embed(toks),
            self._fbuf[done:n],
            self.cache,
            torch.arange(done, n),
            causal_mask(done, n - done),
            out_from=n - done - 1,
        )
        self._rows = n
        self._last_out = out[-1:]
        return self._last_out

    def _rows(self, ids: torch.Tensor) -> Weight:
        """The target's LM-head rows of ``ids``, packed as the drafter reads them."""
        lm = self.target.lm_head_w
        if isinstance(lm, QuantWeight):
            return pack_weight(lm.rows(ids))
        return pack_weight(lm.index_select(0, ids).to(self.dtype))

    def logprobs(self, feats: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the greedy part of the draft vocabulary, or all of it for sampled drafts."""
        logits = self.target.vocab_logits(feats, self.lm_rows)
        if self.coupling is not None and self.lm_wide is not None:
            logits = torch.cat([logits, self.target.vocab_logits(feats, self.lm_wide)], dim=-1)
        return torch.log_softmax(logits, dim=-1)

    def _open(self, context: list[int]) -> DraftRows:
        """A new draft at ``context``: the committed rows brought up to date, the root's feature predicted."""
        root_out = self._sync(context)
        s = DraftRows(context, self.cache.length)
        s.out[()] = root_out[0]
        self._session = s
        return s

    def _children(self, s: DraftRows, paths: list[NodePath], k: int) -> list[list[tuple[int, float]]]:
        """The ``k`` best next tokens below each path (below ``s``'s root), computing the head's rows that
        are missing: one batch per tree level, each row fed its parent's predicted feature and attending
        the committed prefix, its drafted ancestors and itself."""
        vocab, base = self.vocab, s.base

        def topk(keys: list[NodePath], lps: torch.Tensor) -> None:
            if self.coupling is not None:  # ranked with the noise the target samples these positions with
                draws, temperature = self.coupling
                at = [len(s.anchor) + len(key) for key in keys]
                # the noise is as wide as the target's logits (Stage.logits_width), read over the draft vocabulary
                ids = self.head.draft_vocab[: lps.shape[-1]]
                lps = draws.perturb(lps, at, temperature, ids, self.target.logits_width)
            vals, idx = lps.topk(min(k, lps.shape[-1]), dim=-1)
            for key, v, i in zip(keys, vals.tolist(), idx.tolist()):
                s.logp[key] = (v, [vocab[j] for j in i])

        if () in paths and len(s.logp.get((), ((), ()))[0]) < k:
            topk([()], self.logprobs(s.out[()][None]))
        for level in s.missing(paths, root_row=False):
            length = self.cache.length
            rs, cs = [], []
            for r, key in enumerate(level):
                cols = [s.slot[key[:j]] for j in range(1, len(key))] + [length + r]
                rs += [r] * len(cols)
                cs += cols
            mask = torch.zeros(len(level), length + len(level), dtype=torch.bool)
            mask[:, :base] = True
            mask[rs, cs] = True
            feats = torch.stack([s.out[key[:-1]] for key in level])
            toks = torch.tensor([key[-1] for key in level])
            pos = torch.tensor([base - 1 + len(key) for key in level])
            out = self.head.step(self.target.embed(toks), feats, self.cache, pos, mask)
            for r, key in enumerate(level):
                s.slot[key], s.out[key] = length + r, out[r]
            topk(level, self.logprobs(out))
        for key in paths:  # computed by an earlier call with a smaller k
            if len(s.logp[key][0]) < k:
                topk([key], self.logprobs(s.out[key][None]))
        return s.proposals(paths, k)

    def start(self, context: list[int]) -> bool:
        """Open a draft at ``context`` (see :func:`models.tree.draft_tree`); False when there is nothing to
        draft from yet (no committed position has a feature)."""
        if len(context) < 2:
            return False
        self._open(context)
        return True

    @torch.inference_mode()
    def children(self, context: list[int], tree: Tree, nodes: list[int], k: int) -> list[list[tuple[int, float]]]:
        """The ``k`` best next tokens below ``nodes`` of ``tree`` (rooted at ``context[-1]``), reusing the rows
        of the latest draft where ``context`` extends it (see :meth:`extend`), else from a draft opened here."""
        s, paths = session_paths(self._session, lambda: self._open(context), context, tree, nodes)
        return self._children(s, paths, k)

    @torch.inference_mode()
    def draft(self, context: list[int], *, top_k: int, depth: int, max_nodes: int, keep: int | None = None) -> Tree:
        return draft_tree(self, context, top_k=top_k, depth=depth, max_nodes=max_nodes, keep=keep)

    @torch.inference_mode()
    def extend(self, context: list[int], pool: Tree, leaves: list[int], *, top_k: int, max_nodes: int) -> list[int]:
        """Grow ``pool`` (rooted at ``context[-1]``) by one level below ``leaves``, reusing the rows of the
        latest draft: its nodes' predicted features and KV stay in the cache, also after the context grew
        by accepted nodes of that draft (the pool re-rooted at one of them), so only the new level is
        computed (and rows of nodes another drafter added). The result is what a deeper draft at the
        latest draft's context would have given below those nodes: the accepted nodes' real features,
        which a draft from scratch at ``context`` would feed on, wait for the next :meth:`draft`."""
        if len(context) < 2:
            return []
        return add_level(pool, leaves, self.children(context, pool, leaves, top_k), top_k, max_nodes)


DEFAULT_SPEC = "eagle+ngram"


def default_drafter(model: ModelSource | str | None) -> str:
    """The default drafter spec for a model: its head (the user's, else the shipped one; see
    :func:`head_dirs`) with n-gram candidates if one was trained for exactly this target, else ``ngram``."""
    src = model if isinstance(model, ModelSource) else ModelSource.resolve(model)
    try:
        find_head(src.fingerprint, src.config)
    except ModelError:
        return "ngram"
    return DEFAULT_SPEC


def _assumed_fingerprint(target: Stage) -> str | None:
    """Without a source, assume the embedded default model when the target has its exact shape."""
    try:
        src = ModelSource.resolve("default")
        return src.fingerprint if src.config == target.cfg else None
    except ModelError:
        return None


def load_eagle_drafter(spec_path: str | None, target: Stage, source: ModelSource | None = None) -> EagleDrafter:
    """``eagle`` (the head trained for this target, the user's or the shipped one: :func:`find_head`) or
    ``eagle:PATH``."""
    fp = source.fingerprint if source is not None else _assumed_fingerprint(target)
    path = Path(spec_path) if spec_path else find_head(fp, target.cfg)
    head = load_head(path, target.cfg, fp)
    return EagleDrafter(head, target, name=f"eagle:{path.name}" if spec_path else "eagle")
