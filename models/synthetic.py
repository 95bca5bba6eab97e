"""Synthetic Llama-shaped GGUF files with random weights, for memory and speed checks at real scale.

The embedded model is 135M parameters; what a 1 GB board can hold only shows at 1B. Such a file
cannot ship with the project and downloading one is not allowed in tests, so this writes one:
random weights of a known shape, quantized with gguf-py's own numpy quantizers (the blocks
llama.cpp writes), and the embedded SmolLM2 file's tokenizer copied in so ``meshd serve`` and
transformers accept the file as they accept a real one. The text it generates is noise; the bytes
it holds, reads and sends are those of a real model of that shape.

Deterministic: the same shape, type and seed give the same file, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from models.config import ModelError
from models.source import embedded_model_path


@dataclass(frozen=True)
class SyntheticShape:
    """A Llama shape. The vocabulary is the tokenizer's (SmolLM2's 49,152 tokens), not a field."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool  # whether the LM head is the embedding matrix (no ``output.weight``)
    context: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5


SHAPES = {
    # TinyLlama-1.1B's layers (22 x hidden 2048, 32 heads, 4 KV heads, FFN 5632, untied LM head) with
    # SmolLM2's 49,152-token vocabulary instead of its 32,000: 1.17B parameters.
    "llama-1b": SyntheticShape(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, tied=False),
    # the same structure in miniature, for tests: a few MB, dominated by the vocabulary
    "tiny": SyntheticShape(hidden=64, layers=3, heads=4, kv_heads=2, ffn=128, tied=False),
}
QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
"""Types gguf-py can both quantize and meshd holds natively (int4 for Q4_*, int8 for Q8_0)."""

INIT_STD = 0.02  # the usual Llama initializer range: activations stay in range through every layer
SLAB = 1 << 22  # weights generated and quantized at a time: bounds the writer's own memory (~16 MB fp32)
_FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # general.file_type (llama.cpp's LLAMA_FTYPE_MOSTLY_*)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # rows first (numpy order)
    qtype: gguf.GGMLQuantizationType


def _tensors(shape: SyntheticShape, vocab: int, qtype: gguf.GGMLQuantizationType) -> list[_Tensor]:
    """Every tensor of the file in llama.cpp's names and order; norms stay F32, as llama.cpp keeps them."""
    f32 = gguf.GGMLQuantizationType.F32
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    out = [_Tensor("token_embd.weight", (vocab, shape.hidden), qtype)]
    for i in range(shape.layers):
        p = f"blk.{i}."
        out += [
            _Tensor(p + "attn_norm.weight", (shape.hidden,), f32),
            _Tensor(p + "attn_q.weight", (shape.hidden, shape.hidden), qtype),
            _Tensor(p + "attn_k.weight", (kv, shape.hidden), qtype),
            _Tensor(p + "attn_v.weight", (kv, shape.hidden), qtype),
            _Tensor(p + "attn_output.weight", (shape.hidden, shape.hidden), qtype),
            _Tensor(p + "ffn_norm.weight", (shape.hidden,), f32),
            _Tensor(p + "ffn_gate.weight", (shape.ffn, shape.hidden), qtype),
            _Tensor(p + "ffn_up.weight", (shape.ffn, shape.hidden), qtype),
            _Tensor(p + "ffn_down.weight", (shape.hidden, shape.ffn), qtype),
        ]
    out.append(_Tensor("output_norm.weight", (shape.hidden,), f32))
    if not shape.tied:
        out.append(_Tensor("output.weight", (vocab, shape.hidden), qtype))
    return out


def _nbytes(t: _Tensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return int(np.prod(t.shape)) // block * size


def _data(t: _Tensor, rng: np.random.Generator) -> np.ndarray:
    """The tensor's bytes as the file stores them: norms are ones, matrices N(0, INIT_STD) quantized
    a slab of rows at a time."""
    if len(t.shape) == 1:
        return np.ones(t.shape, dtype=np.float32)
    rows, cols = t.shape
    step = max(1, SLAB // cols)
    parts = []
    for a in range(0, rows, step):
        dense = rng.standard_normal((min(step, rows - a), cols), dtype=np.float32)
        dense *= INIT_STD
        parts.append(gguf.quants.quantize(dense, t.qtype))
    return np.concatenate(parts)


@cache
def _tokenizer_fields(donor: Path) -> tuple[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]:
    """The donor file's ``tokenizer.*`` metadata as (key, value, type, element type). Kept for the
    process: gguf-py parses the 100k-entry lists in seconds, and tests write several files."""
    reader = gguf.GGUFReader(donor)
    return tuple(
        (key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.")
    )


def write_synthetic_gguf(
    out: Path,
    shape: SyntheticShape,
    quant: str = "Q4_1",
    *,
    seed: int = 0,
    name: str = "synthetic",
    tokenizer_from: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random ``shape`` model quantized as ``quant`` to ``out``; return ``out``.

    ``tokenizer_from``: the GGUF whose tokenizer is copied (default: the embedded SmolLM2 file); its
    vocabulary sets the model's. ``progress(bytes_written, total_bytes)`` hears every tensor.
    """
    if quant not in QUANT_TYPES:
        raise ModelError(f"quantization {quant!r} is not one this command writes; use one of {', '.join(QUANT_TYPES)}")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ModelError(f"{shape}: hidden must be a multiple of heads, and heads of kv_heads")
    if shape.hidden % 32 or shape.ffn % 32:
        raise ModelError(f"{shape}: hidden and ffn must be multiples of 32 (the quantization block)")
    qtype = gguf.GGMLQuantizationType[quant]
    fields = _tokenizer_fields(Path(tokenizer_from or embedded_model_path()))
    vocab = next(len(v) for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    tensors = _tensors(shape, vocab, qtype)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"{name} ({quant}, seed {seed}, random weights)")
    w.add_file_type(_FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.hidden // shape.heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(vocab)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t), raw_dtype=t.qtype)
    # one tensor in memory at a time: header first, then each tensor's data as it is generated
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total, done = sum(_nbytes(t) for t in tensors), 0
    for t in tensors:
        data = _data(t, rng)
        w.write_tensor_data(data)
        done += data.nbytes
        if progress is not None:
            progress(done, total)
    w.close()
    tmp.replace(out)
    return out
