"""The one description of a target model's shape, whatever file it came from.

Everything downstream (weights, forward, KV cache, planner sizes) reads this dataclass,
so GGUF metadata and HF ``config.json`` are translated here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


class ModelError(RuntimeError):
    """A model source that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer; the planner multiplies this by bytes per element."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    def to_hf(self):
        """A transformers config object, for the reference model and RoPE-scaling helpers."""
        import transformers  # lazy: ~1 s to import, and only tests and scaled RoPE need this

        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[self.arch]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_embeddings,
            max_position_embeddings=self.max_position,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) or None,
        )
        if self.arch == "llama":
            kwargs["attention_bias"] = self.qkv_bias
        return cls(**kwargs)


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """transformers 5 nests RoPE in ``rope_parameters``; older files use ``rope_theta``/``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if scaling and "rope_type" not in scaling:
        scaling = {**scaling, "rope_type": scaling.get("type")}
    return theta, scaling or None


def config_from_hf_dict(cfg: dict[str, Any], where: str) -> ModelConfig:
    arch = cfg.get("model_type", "")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{where}: model_type {arch!r} is not supported; meshd serves Llama-family models "
            f"({', '.join(SUPPORTED_ARCHS)})."
        )
    theta, scaling = _rope_from_hf(cfg)
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        arch=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)) or arch == "qwen2",
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def config_from_dir(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json; an HF checkpoint directory needs one next to its weights.")
    return config_from_hf_dict(json.loads(cfg_file.read_text()), str(path))


def config_from_gguf(fields: dict[str, Any], has_output: bool, where: str) -> ModelConfig:
    """Translate llama.cpp metadata; ``fields`` maps key -> python value."""
    arch = fields.get("general.architecture", "")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"{where}: GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)}).")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // n_heads)
    scaling = None
    stype = get("rope.scaling.type")
    if stype and stype not in ("none", "default"):
        scaling = {"rope_type": stype, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(int(x) for x in (eos, eot) if x is not None)
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_embeddings=not has_output,
        qkv_bias=arch == "qwen2",
        max_position=int(get("context_length", 4096)),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
    )
