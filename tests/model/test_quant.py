"""Weights kept quantized: the mappings' error bounds, the kernels against the dequantized
reference, the oracle per weight format, partial loads.

The bounds are split in two so each is exact: (1) what holding a matrix quantized changes in the
weights themselves (models.quant's per-format bounds, checked element by element), and (2) that
the kernels compute the forward of exactly those weights (the same stage with its matrices
dequantized to dense fp32 is the reference, within rounding).
"""

from __future__ import annotations

import pytest
import torch
from support import (
    CURVES,
    assert_matches_greedy,
    chat_ids,
    forward_terms,
    greedy_reference,
    make_tiny_checkpoint,
    prompts,
    rounding_tolerance,
)
from test_loading import write_gguf
from test_stage import BF16_ROUNDINGS_OUTSIDE, BF16_ROUNDINGS_PER_LAYER

from models.budget import TreeBudget
from models.drafters import NGramDrafter, load_drafter
from models.eagle import EagleDrafter, EagleHead, HeadConfig
from models.engine import generate
from models.layers import Layer, dense
from models.quant import (
    GROUP,
    QuantRows,
    QuantWeight,
    auto_format,
    join,
    quantize_int4,
    quantize_int8,
    resolve_format,
)
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage, layer_nbytes, resolve_weights
from models.weights import TensorReader

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matrix_names(n_layers: int) -> list[str]:
    out = []
    for i in range(n_layers):
        for m in MATRICES:
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out.append(f"model.layers.{i}.{part}.{m}.weight")
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The tiny checkpoint as Q4_0, Q4_1 and Q8_0 GGUF files."""
    root = tmp_path_factory.mktemp("qgguf")
    hf = make_tiny_checkpoint(root / "hf")
    return {q: ModelSource.resolve(_write(hf, root / f"{q}.gguf", q)) for q in ("Q4_0", "Q4_1", "Q8_0")}


def _write(hf, out, qtype):
    write_gguf(hf, out, qtype)
    return out


# ---- (1) the weights: each mapping's bound ---------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_become_int4_groups_exactly(tiny_gguf, qtype):
    """GGUF's 4-bit blocks are the kernel's groups: no re-quantization, only fp32 rounding of
    Q4_1's zero = m + 8d (one rounding of a value of magnitude |m| + 8|d|)."""
    rd = TensorReader(tiny_gguf[qtype])
    for name in matrix_names(4):
        rows = rd.read_matrix(name, "int4")
        assert rows.kind == "int4" and rows.q.dtype == torch.uint8 and int(rows.q.max()) <= 15
        want = rd.read(name)  # gguf-py's own dequantization, llama.cpp's row order undone
        err = (rows.dequantize() - want).abs()
        bound = (
            2
            * torch.finfo(torch.float32).eps
            * (rows.zero.abs() + 16 * rows.scale.abs()).repeat_interleave(GROUP, dim=1)
        )
        assert (err <= bound).all(), (name, float(err.max()))


def test_requantization_bounds():
    """int8 per row: half a step of max|row| / 127; int4 per group of 32: half a step of range / 15."""
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    r8 = quantize_int8(w)
    err8 = (r8.dequantize() - w).abs()
    slack = 4 * torch.finfo(torch.float32).eps * w.abs().amax(dim=1, keepdim=True)  # fp32 rounding of q * scale
    assert (err8 <= w.abs().amax(dim=1, keepdim=True) / 254 + slack).all()
    r4 = quantize_int4(w)
    g = w.reshape(48, 96 // GROUP, GROUP)
    span = (g.amax(-1) - g.amin(-1)).repeat_interleave(GROUP, dim=1)
    err4 = (r4.dequantize() - w).abs()
    assert (err4 <= span / 30 + 4 * torch.finfo(torch.float32).eps * w.abs().amax()).all()
    # and neither is loose: the bounds are reached to within a fifth on random data
    assert (err8 / (w.abs().amax(dim=1, keepdim=True) / 254)).max() > 0.8
    assert (err4 / span.clamp_min(1e-30) * 30).max() > 0.8


# ---- (2) the kernels: the forward of exactly the held weights --------------------------------


def dequantized(stage: Stage) -> Stage:
    """The same stage with every matrix dense fp32: what its quantized weights stand for."""

    def d(w):
        return dense(w).float() if w is not None else None

    layers = [Layer(**{f: d(t) for f, t in vars(layer).items()}) for layer in stage.layers]
    embed, lm = d(stage.embed_w), d(stage.lm_head_w)
    return Stage(
        stage.cfg, stage.layer_range, layers, embed=embed, norm=d(stage.norm_w), lm_head=lm, dtype=torch.float32
    )


def logits_of(stage: Stage, ids: torch.Tensor) -> torch.Tensor:
    return stage.logits(stage.forward_one(stage.embed(ids), stage.new_cache(), torch.arange(len(ids))))


@pytest.mark.parametrize(
    ("model", "weights"), [("safetensors", "int8"), ("safetensors", "int4"), ("Q4_1", "native"), ("Q8_0", "native")]
)
def test_fp32_activations_compute_exactly_the_held_weights(tiny_dir, tiny_gguf, model, weights):
    src = ModelSource.resolve(tiny_dir) if model == "safetensors" else tiny_gguf[model]
    q = Stage.load(src, dtype="fp32", weights=weights)
    kinds = {layer.wqkv.kind for layer in q.layers if isinstance(layer.wqkv, QuantWeight)}
    assert kinds == {"int8" if weights == "int8" or model == "Q8_0" else "int4"}
    assert isinstance(q.embed_w, QuantWeight) and q.embed_w.kind == "int8"
    ids = torch.arange(40) % 64
    want = logits_of(dequantized(q), ids)
    got = logits_of(q, ids)
    # the same fp32 weights, the quantized kernels vs oneDNN/ATen's: summation order only
    assert (got - want).abs().max() <= rounding_tolerance(torch.float32, forward_terms(q.cfg, 40), want.abs().max())


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_bf16_activations_stay_within_bf16_rounding(tiny_dir, weights):
    """bf16 activations with bf16 scales: as many roundings per layer as the dense bf16 forward
    (test_stage's count), plus one per quantized weight's scale and zero, which moves each weight
    by at most 2^-9 of its magnitude: 2 more per matrix product (4 products a layer, 1 LM head)."""
    src = ModelSource.resolve(tiny_dir)
    b16 = Stage.load(src, dtype="bf16", weights=weights)
    assert b16.dtype == torch.bfloat16
    ref = dequantized(Stage.load(src, dtype="fp32", weights=weights))
    ids = torch.arange(40) % 64
    a, b = logits_of(ref, ids), logits_of(b16, ids)
    n = ref.cfg.n_layers * (BF16_ROUNDINGS_PER_LAYER + 4 * 2) + BF16_ROUNDINGS_OUTSIDE + 2
    assert (a - b).abs().max() <= rounding_tolerance(torch.bfloat16, n, a.abs().max())


def test_parts_held_differently_join_as_int8():
    """A fused matrix whose parts the file holds at different precisions (4-bit q, dense v) becomes
    int8 rows: each part within int8's bound of what it stood for."""
    torch.manual_seed(2)
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    joined = join([quantize_int4(a), b])
    assert isinstance(joined, QuantRows) and joined.kind == "int8" and joined.q.shape == (48, 64)
    want = torch.cat([quantize_int4(a).dequantize(), b])
    bound = want.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)  # + fp32 rounding of q * scale
    assert ((joined.dequantize() - want).abs() <= bound).all()
    assert torch.equal(join([a, b]), torch.cat([a, b]))  # all dense: dense


def test_int4_pads_rows_to_the_kernels_multiple():
    torch.manual_seed(1)
    w = torch.randn(40, 64)  # 40 rows: the int4 packer takes multiples of 16
    qw = quantize_int4(w).pack(torch.float32)
    x = torch.randn(5, 64)
    want = x @ quantize_int4(w).dequantize().T
    got = qw.matmul(x)
    assert got.shape == (5, 40)
    assert (got - want).abs().max() <= rounding_tolerance(torch.float32, 64, (x.abs() @ w.abs().T).max())
    assert torch.allclose(qw.dequantize(), quantize_int4(w).dequantize(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kernels_compute_each_row_alike_in_any_batch(kind, dtype):
    """What Stage.logits_by_row relies on: a row's product does not depend on the rows beside it, so
    logits computed for the rows a walk reads, one at a time, are the batched logits exactly."""
    torch.manual_seed(2)
    qw = (quantize_int8 if kind == "int8" else quantize_int4)(torch.randn(96, 128)).pack(dtype)
    x = torch.randn(9, 128).to(dtype)
    assert torch.equal(qw.matmul(x), torch.cat([qw.matmul(x[i : i + 1]) for i in range(9)]))


@pytest.mark.parametrize("weights", ["dense", "int8", "native"])
def test_logits_by_row_equal_the_batched_logits(tiny_gguf, weights):
    stage = Stage.load(tiny_gguf["Q4_1"], dtype="bf16", weights=None if weights == "dense" else weights)
    normed = stage.final_norm(torch.randn(7, stage.cfg.hidden_size).to(stage.dtype))
    every = stage.logits(normed, normed=True)
    row = stage.logits_by_row(normed)
    for i in (3, 0, 6, 3):
        assert torch.equal(row(i), every[i])


def test_format_resolution():
    assert resolve_format("fp32", None) == ("dense", torch.float32)
    assert resolve_format("int4", None) == ("int4", torch.bfloat16)
    assert resolve_format("int8", torch.float32) == ("int8", torch.float32)
    assert resolve_format(None, torch.bfloat16) == ("dense", torch.bfloat16)
    assert resolve_format("auto", torch.float32) == ("dense", torch.float32)  # an explicit --dtype fp32 wins
    fmt, dt = auto_format()
    assert resolve_format("auto", None) == ("dense" if fmt == "fp32" else fmt, dt)
    with pytest.raises(ValueError, match="--dtype"):
        resolve_format("bf16", torch.float32)
    with pytest.raises(ValueError, match="unknown weight format"):
        resolve_format("q3", None)


# ---- the oracle and partial loads, per format ------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("drafter_kind", ["ngram", "model-early-exit", "eagle"])
def test_spec_equals_greedy_per_format(tiny_dir, weights, dtype, drafter_kind):
    """Speculation is lossless relative to the target's own numerics, whatever they are."""
    src = ModelSource.resolve(tiny_dir)
    target = Stage.load(src, dtype=dtype, weights=weights)
    if drafter_kind == "ngram":
        drafter = NGramDrafter()
    elif drafter_kind == "model-early-exit":
        drafter = load_drafter(f"model:{tiny_dir}@2", target)
        assert drafter.model.weights == weights  # the draft model holds its weights like the target
    else:
        torch.manual_seed(0)
        head = EagleHead(HeadConfig.for_target(target.cfg), target.cfg)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.3 * torch.randn_like(p))
        drafter = EagleDrafter(head.eval(), target)
        assert isinstance(drafter.lm_rows, QuantWeight) or weights == "int4"  # int8 rows of the vocab
        with torch.inference_mode():  # drafting's view of the head: packed, not the trainable parameters
            wqkv = head.layer().wqkv
        assert isinstance(wqkv, QuantWeight) and wqkv.kind == weights
    g = torch.Generator().manual_seed(3)
    for curve in ("steep", "flat"):
        prompt = torch.randint(0, 64, (12,), generator=g).tolist()
        want, gaps = greedy_reference(target, prompt, 40, set())
        res = generate(target, prompt, max_new_tokens=40, drafter=drafter, budget=TreeBudget(CURVES[curve]))
        assert_matches_greedy(res.token_ids, want, gaps)
        ar = generate(target, prompt, max_new_tokens=40, mode="ar")
        assert_matches_greedy(ar.token_ids, want, gaps)


@pytest.mark.parametrize("weights", ["native", "int8"])
def test_partial_quantized_load_reads_only_its_layers(tiny_gguf, weights):
    src = tiny_gguf["Q4_1"]
    full = Stage.load(src, dtype="fp32", weights=weights)
    reader = TensorReader(src)
    part = Stage.load(src, LayerRange(1, 3), vocab=False, dtype="fp32", weights=weights, reader=reader)
    assert sorted({n.split(".")[2] for n in reader.read_names}) == ["1", "2"] and len(reader.read_names) == 2 * 9
    assert part.weights == weights and part.nbytes() < full.nbytes() / 2
    for a, b in zip(full.layers[1:3], part.layers):
        for f, t in vars(a).items():
            assert (t is None and getattr(b, f) is None) or torch.equal(dense(t), dense(getattr(b, f))), f


@pytest.mark.parametrize(
    ("model", "weights", "dtype"),
    [
        ("Q4_1", "native", "bf16"),
        ("Q4_1", "int8", "fp32"),
        ("Q8_0", "native", "bf16"),
        ("safetensors", "int4", "bf16"),
        ("safetensors", "fp32", "fp32"),
    ],
)
def test_layer_nbytes_counts_what_a_load_holds(tiny_dir, tiny_gguf, model, weights, dtype):
    """The planner's bytes per layer, from the header alone, are the bytes a loaded layer holds."""
    src = ModelSource.resolve(tiny_dir) if model == "safetensors" else tiny_gguf[model]
    fmt, dt = resolve_weights(weights, dtype)
    one = Stage.load(src, LayerRange(2, 3), vocab=False, dtype=dt, weights=fmt)
    assert layer_nbytes(src, fmt, dt, index=2) == one.nbytes()


@pytest.mark.slow
@pytest.mark.timeout(900)  # 3 prompts x 48 tokens of the real model, twice; ~3 min on a loaded 2-core box
@pytest.mark.parametrize("weights", ["native", "int8"])
def test_embedded_spec_equals_greedy_per_format(embedded_source, embedded_tokenizer, weights):
    """The real model held as the file has it (Q4_1 layers as int4, Q8_0 vocabulary as int8 rows) or
    as int8, bf16 activations, with the shipped EAGLE head and n-gram candidates."""
    target = Stage.load(embedded_source, dtype="bf16", weights=weights)
    drafter = load_drafter("auto", target, source=embedded_source)
    eos = set(target.cfg.eos_token_ids)
    accepted = []
    for q in prompts(1, categories=3):
        prompt = chat_ids(embedded_tokenizer, q["turns"][0])
        want, gaps = greedy_reference(target, prompt, 48, eos)
        res = generate(target, prompt, max_new_tokens=48, drafter=drafter, eos_ids=sorted(eos))
        assert_matches_greedy(res.token_ids, want, gaps)
        accepted.append(res.stats.mean_accepted)
    assert sum(accepted) / len(accepted) > 1.0  # the drafter was used
