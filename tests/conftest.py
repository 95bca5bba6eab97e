"""Shared fixtures: tiny random checkpoints written to disk, and the embedded model loaded once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench_questions.jsonl"

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.15)


def make_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random HF checkpoint (config.json + model.safetensors) and return its directory."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    cfg = cls[0](**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and norms; random ones exercise more of the forward
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def embedded_source():
    from models.source import ModelSource

    return ModelSource.resolve("default")


@pytest.fixture(scope="session")
def embedded(embedded_source):
    from models.stage import Stage

    return Stage.load(embedded_source, dtype="fp32")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_source):
    return embedded_source.load_tokenizer()


def spec_bench(n_per_category: int, categories: int | None = None, held_out: bool | None = None) -> list[dict]:
    """The first questions of each Spec-Bench category, in file order (deterministic)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    if held_out is not None:
        rows = [r for r in rows if (r["question_id"] % 4 == 0) == held_out]
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        cat = r["category"]
        if cat not in seen and categories is not None and len(seen) >= categories:
            continue
        if seen.get(cat, 0) < n_per_category:
            seen[cat] = seen.get(cat, 0) + 1
            out.append(r)
    return out


@pytest.fixture
async def rt(embedded_tokenizer):
    """The REST API's runtime faked (canned generation, real tokenizer): API and client tests."""
    from fake_runtime import FakeRuntime

    return FakeRuntime(embedded_tokenizer)


@pytest.fixture
async def url(rt):
    """Base URL of the real REST app serving ``rt`` on a free loopback port."""
    from fake_runtime import serve

    from meshd.api import create_app

    async with serve(create_app(rt)) as u:
        yield u
