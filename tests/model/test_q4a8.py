"""The int4a8 kernel (models/q4a8.c): 4-bit weights exactly as the file holds them, activations
rounded to int8 per group of 32, and every row computed the same way in any batch.

The bound on a product is split as in test_quant: the weights are the file's exactly (checked
element by element), and the activations' rounding moves each input by at most max|group| / 254,
so an output by at most sum over groups of that times sum |w| over the group (plus fp32 rounding)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import assert_matches_greedy, chat_ids, greedy_reference, prompts, rounding_tolerance
from test_quant import dequantized, logits_of, tiny_gguf  # noqa: F401 (a fixture)

from models import q4a8
from models.budget import CostCurve, TreeBudget
from models.drafters import NGramDrafter, load_drafter
from models.engine import generate
from models.layers import causal_mask, dense, rms_norm
from models.quant import QuantWeight, auto_format, matrix_kind, quantize_int4, resolve_format
from models.ranges import LayerRange
from models.stage import Attend, Stage, layer_nbytes
from models.weights import TensorReader


def random_rows(n: int, k: int, seed: int = 0):
    torch.manual_seed(seed)
    return quantize_int4(torch.randn(n, k))


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output: sum over groups of (max|x in group| / 254) * sum |w in group|, the int8 rounding's reach."""
    rows, k = x.shape
    amax = x.float().abs().reshape(rows, k // 32, 32).amax(dim=-1) / 254  # (rows, groups)
    wsum = w.abs().reshape(w.shape[0], k // 32, 32).sum(dim=-1)  # (out, groups)
    return amax @ wsum.T


def test_pack_keeps_the_weights_exactly():
    rows = random_rows(40, 96)  # 40 outputs: the layout pads to blocks of 16
    # the rows' scale and zero are fp32 here; the layout holds d and m as fp16 (exact for a file's blocks)
    d, m = rows.scale.half().float(), (rows.zero - 8 * rows.scale).half().float()
    want = (rows.q.float().reshape(40, 3, 32) * d[..., None] + m[..., None]).reshape(40, 96)
    assert torch.equal(q4a8.unpack(q4a8.pack(rows.q, rows.scale, rows.zero), 40), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_alike_in_any_batch_and_code_path(dtype):
    """The oracle's premise: a row's product does not depend on the rows beside it (tiles of 4 or 16,
    short last tiles, the thread split), nor on the code path (plain C, AVX512-VNNI, AMX)."""
    rows = random_rows(72, 160, seed=1)
    data = q4a8.pack(rows.q, rows.scale, rows.zero)
    torch.manual_seed(2)
    x = torch.randn(37, 160).to(dtype)
    batched = q4a8.matmul(x, data, 72)
    assert batched.dtype == dtype and batched.shape == (37, 72)
    for split in ([1] * 37, [3, 5, 3, 16, 10], [4, 7, 26], [2, 35], [17, 20]):
        parts = torch.split(x, split)
        assert torch.equal(torch.cat([q4a8.matmul(p.contiguous(), data, 72) for p in parts]), batched)
    for path in ("c", "simd", "amx"):  # where a path is not built or granted, it falls back to a slower one
        assert torch.equal(q4a8.matmul(x, data, 72, path=path), batched), path


def test_product_within_the_activations_rounding():
    rows = random_rows(64, 256, seed=3)
    data = q4a8.pack(rows.q, rows.scale, rows.zero)
    w = q4a8.unpack(data, 64)
    torch.manual_seed(4)
    x = torch.randn(9, 256) * torch.logspace(-2, 1, 256)  # groups of very different magnitudes
    got, want = q4a8.matmul(x, data, 64), x @ w.T
    bound = activation_bound(x, w) * (1 + 1e-3) + rounding_tolerance(torch.float32, 256, (x.abs() @ w.abs().T).max())
    assert ((got - want).abs() <= bound).all()
    assert (got - want).abs().max() > 0  # the activations really were rounded (not a dense product)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fused_into_the_kernel(dtype):
    """models.layers.normed_linear's fast path: the norm computed in the kernel as rms_norm defines it
    (its statistics summed in another order, so a normalised value may round the other way: within
    the activations' rounding of the unfused product), each row alike in any batch."""
    rows = random_rows(48, 192, seed=5)
    data = q4a8.pack(rows.q, rows.scale, rows.zero)
    torch.manual_seed(6)
    x, norm = (torch.randn(13, 192) * 3).to(dtype), (torch.rand(192) + 0.5).to(dtype)
    fused = q4a8.matmul(x, data, 48, norm=norm, eps=1e-5)
    h = rms_norm(x, norm, 1e-5)
    unfused = q4a8.matmul(h, data, 48)
    w = q4a8.unpack(data, 48)
    assert ((fused.float() - unfused.float()).abs() <= 2 * activation_bound(h, w) + 0.02 * unfused.abs().max()).all()
    parts = [q4a8.matmul(p.contiguous(), data, 48, norm=norm, eps=1e-5) for p in torch.split(x, [1, 4, 8])]
    assert torch.equal(torch.cat(parts), fused)
    with pytest.raises(ValueError, match="norm weight"):
        q4a8.matmul(x, data, 48, norm=norm[:10], eps=1e-5)


@pytest.mark.parametrize("k", [96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_times_int8_activations(dtype, k):
    """The vocabulary matrix's product on an int4a8 stage: within the activations' int8 rounding of
    the exact int8-row product, and each row bitwise the same in any batch and code path (7 activation
    rows: the vector path's blocks of four and of one to three left over; 96 columns: three groups of
    32, so the even-groups chain takes one more than the odd and AVX512-VNNI's pairs of groups leave
    one alone; 128: two pairs, none left)."""
    torch.manual_seed(4)
    w = torch.randint(-128, 128, (203, k), dtype=torch.int8)
    scales = (torch.rand(203) * 0.02 + 0.001).to(dtype)
    x = torch.randn(7, k).to(dtype)
    got = q4a8.q8a8_matmul(x, w, scales)
    dense_w = w.float() * scales.float()[:, None]
    want = x.float() @ dense_w.T
    bound = activation_bound(x, dense_w) + 1e-5 * want.abs().max()
    assert got.dtype == torch.float32 and bool(((got - want).abs() <= bound).all())
    assert torch.equal(q4a8.q8a8_matmul(x, w, scales, path="c"), got)
    for lo, hi in [(0, 1), (0, 2), (1, 4), (2, 7), (6, 7)]:
        assert torch.equal(q4a8.q8a8_matmul(x[lo:hi].contiguous(), w, scales), got[lo:hi])


def test_zero_rows_and_bad_inputs():
    rows = random_rows(16, 64)
    data = q4a8.pack(rows.q, rows.scale, rows.zero)
    assert torch.equal(q4a8.matmul(torch.zeros(2, 64), data, 16), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="width"):
        q4a8.matmul(torch.zeros(2, 32), data, 16)
    with pytest.raises(ValueError, match="contiguous"):
        q4a8.matmul(torch.zeros(64, 2).t(), data, 16)


def test_q4_file_blocks_held_as_they_are(tiny_gguf):  # noqa: F811
    for qtype in ("Q4_0", "Q4_1"):
        q = Stage.load(tiny_gguf[qtype], dtype="fp32", weights="int4a8")
        ref = Stage.load(tiny_gguf[qtype], dtype="fp32", weights="fp32")
        for a, b in zip(q.layers, ref.layers):
            assert isinstance(a.w_gate_up, QuantWeight) and a.w_gate_up.kind == "int4a8"
            assert torch.equal(a.w_gate_up.dequantize(), dense(b.w_gate_up))
    assert matrix_kind("int4a8", "Q8_0") == "int8" and matrix_kind("int4a8", None) is None  # as native holds them


def test_forward_error_comparable_to_bf16_activations(tiny_gguf):  # noqa: F811
    """A whole forward on the kernel against the same weights dense in fp32: int8 activations (about
    2^-8 of a group's largest input) lose a few times what bf16 activations (2^-9 of each input)
    lose on torch's int4 kernel, and no more. The tiny random model amplifies both through its layers
    (~3 % for bf16), so the comparison, not an absolute bound, is what holds on any CPU."""
    ids = torch.arange(40) % 64
    want = logits_of(dequantized(Stage.load(tiny_gguf["Q4_1"], dtype="fp32", weights="native")), ids)
    ours = logits_of(Stage.load(tiny_gguf["Q4_1"], dtype="fp32", weights="int4a8"), ids)
    bf16 = logits_of(Stage.load(tiny_gguf["Q4_1"], dtype="bf16", weights="native"), ids)
    assert 0 < (ours - want).abs().max() <= 4 * (bf16 - want).abs().max()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_spec_equals_greedy_on_int4a8(tiny_gguf, dtype):  # noqa: F811
    target = Stage.load(tiny_gguf["Q4_1"], dtype=dtype, weights="int4a8")
    g = torch.Generator().manual_seed(3)
    for curve in ({1: 1.0, 64: 1.0}, {1: 1.0, 64: 20.0}):  # flat (big trees) and steep
        prompt = torch.randint(0, 64, (12,), generator=g).tolist()
        want, gaps = greedy_reference(target, prompt, 40, set())
        res = generate(target, prompt, max_new_tokens=40, drafter=NGramDrafter(), budget=TreeBudget(CostCurve(curve)))
        assert_matches_greedy(res.token_ids, want, gaps)
        # the layers in C compute each row alike in any batch: a tree's tokens are ar's exactly
        assert target.fused is not None
        assert res.token_ids == generate(target, prompt, max_new_tokens=40, mode="ar").token_ids


def test_partial_load_and_bytes(tiny_gguf):  # noqa: F811
    src = tiny_gguf["Q4_1"]
    reader = TensorReader(src)
    part = Stage.load(src, LayerRange(1, 3), vocab=False, dtype="bf16", weights="int4a8", reader=reader)
    assert sorted({n.split(".")[2] for n in reader.read_names}) == ["1", "2"]
    one = Stage.load(src, LayerRange(2, 3), vocab=False, dtype="bf16", weights="int4a8")
    assert layer_nbytes(src, "int4a8", torch.bfloat16, index=2) == one.nbytes()
    assert part.weights == "int4a8"


def test_without_a_compiler_auto_keeps_native_and_int4a8_says_what_to_do(tmp_path):
    code = (
        "import torch\n"
        "from models import q4a8\n"
        "from models.quant import auto_format\n"
        "print(auto_format()[0])\n"
        "try:\n"
        "    q4a8.matmul(torch.zeros(1, 32), torch.zeros(1, 1, 320, dtype=torch.uint8), 16)\n"
        "except q4a8.KernelUnavailable as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] in ("native", "fp32")
    assert "no-such-cc" in lines[1] and "apt-get install gcc" in lines[1] and "--weights native" in lines[1]


@pytest.mark.parametrize(
    ("machine", "simd", "cuda", "want"),
    [
        ("aarch64", "neon-dot", False, ("int4a8", torch.float32)),  # Pi 5, a Jetson Orin's CPU
        ("aarch64", "neon", False, ("int4a8", torch.float32)),  # Pi 4
        ("arm64", "neon-dot", False, ("int4a8", torch.float32)),  # how macOS names it
        ("aarch64", "c", False, ("fp32", torch.float32)),  # a compiler without the NEON path
        ("aarch64", "neon-dot", True, ("fp32", torch.float32)),  # a Jetson's GPU: not this CPU kernel
    ],
)
def test_what_auto_picks_on_aarch64(monkeypatch, machine, simd, cuda, want):
    """On aarch64 the file's 4-bit blocks stay 4-bit through the kernel's NEON path, with fp32 activations
    (no fast bf16 on those cores); without that path, or on CUDA, the dense reference."""
    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(q4a8, "available", lambda: True)
    monkeypatch.setattr(q4a8, "simd", lambda: simd)
    assert auto_format() == want
    assert resolve_format("int4a8", None) == ("int4a8", torch.float32)  # chosen by hand: fp32 activations too
    assert resolve_format("int4a8", torch.bfloat16) == ("int4a8", torch.bfloat16)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedded_spec_equals_greedy_on_int4a8(embedded_source, embedded_tokenizer):
    """The real model on the kernel, with the shipped EAGLE head and n-gram candidates: lossless."""
    target = Stage.load(embedded_source, dtype="bf16", weights="int4a8")
    drafter = load_drafter("auto", target, source=embedded_source)
    head = next(p for p in drafter.parts if hasattr(p, "head")).head
    with torch.inference_mode():  # the head's matrices drafted through the same kernel
        assert head.layer().w_gate_up.kind == "int4a8"
    eos = set(target.cfg.eos_token_ids)
    for q in prompts(1, categories=2):
        prompt = chat_ids(embedded_tokenizer, q["turns"][0])
        want, gaps = greedy_reference(target, prompt, 48, eos)
        res = generate(target, prompt, max_new_tokens=48, drafter=drafter, eos_ids=sorted(eos))
        assert_matches_greedy(res.token_ids, want, gaps)
        assert res.stats.mean_accepted > 1.0


# ---- the decoder layers in C (models/q4a8_layers.c) --------------------------------------------


def _run_layers(
    stage: Stage, x: torch.Tensor, past: int, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
):
    """``x``'s first ``past`` rows as a causal prefill, then the rest in one forward (causal at the
    next positions unless ``mask`` and ``positions`` are given); that forward's output and the cache."""
    cache = stage.new_cache(64)
    stage.forward_one(x[:past], cache, torch.arange(past))
    t = x.shape[0] - past
    positions = torch.arange(past, past + t) if positions is None else positions
    out = stage.forward_one(x[past:], cache, positions, mask)
    return out, cache


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layers_in_c_follow_the_torch_ops(tiny_gguf, dtype, monkeypatch):  # noqa: F811
    """One layer through q4a8_layers.c against models.layers.decoder_layer on the same weights and
    inputs. Both round at the same points to the same dtype; only the attention's order of sums
    (and SDPA's own fused steps) differ, so the keys and values agree to a few fp32 ulps and the
    output within a step of the int8 rounding of the attention's output where such a step flips."""
    c = Stage.load(tiny_gguf["Q4_1"], LayerRange(1, 2), vocab=False, dtype=dtype, weights="int4a8")
    monkeypatch.setenv("MESHD_FUSED", "0")
    t = Stage.load(tiny_gguf["Q4_1"], LayerRange(1, 2), vocab=False, dtype=dtype, weights="int4a8")
    monkeypatch.undo()
    torch.manual_seed(1)
    x = torch.randn(12, c.cfg.hidden_size).to(c.dtype)
    (a, ca), (b, cb) = _run_layers(c, x, 7), _run_layers(t, x, 7)
    assert c.fused is not None and t.fused is None
    step = 2**-7 if dtype == "bf16" else 2**-20  # relative: a couple of the dtype's steps
    assert torch.allclose(ca.k[:, :, :12].float(), cb.k[:, :, :12].float(), rtol=step, atol=step)
    assert torch.allclose(ca.v[:, :, :12].float(), cb.v[:, :, :12].float(), rtol=step, atol=step)
    # measured 2e-7 (fp32) and 0.0097 (bf16, ~2.5 steps of 2^-8) of the largest output here; a flipped int8 rounding of
    # one attention output moves its row by about max|group| / 127 of the weights' sums
    assert float((a.float() - b.float()).abs().max()) <= 0.04 * float(b.float().abs().max())


def test_layers_in_c_compute_each_row_alike_in_any_batch(tiny_gguf):  # noqa: F811
    """What makes speculation check like against like, bitwise: a row's result does not depend on
    the other rows of its forward. A prefill at once or in pieces, a tree's rows or the same tokens
    decoded one by one after the tree is pruned to them, two requests in one forward or apart."""
    stage = Stage.load(tiny_gguf["Q4_1"], vocab=False, dtype="bf16", weights="int4a8")
    assert stage.fused is not None
    torch.manual_seed(2)
    x = torch.randn(14, stage.cfg.hidden_size).bfloat16()
    whole, _ = _run_layers(stage, x, 0)
    pieces, cache = [], stage.new_cache(8)  # grows while used
    for lo, hi in ((0, 5), (5, 6), (6, 14)):
        pieces.append(stage.forward_one(x[lo:hi], cache, torch.arange(lo, hi)))
    assert torch.equal(torch.cat(pieces), whole)
    # a tree after 8 rows: two branches (rows 0-1-2 and 0-3); decoding 0, 3 alone gives rows 0 and 3
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    mask = torch.cat([torch.ones(4, 8, dtype=torch.bool), tree], dim=1)
    xt = torch.cat([x[:8], x[8:12]])
    positions = torch.tensor([8, 9, 10, 9])
    rows, cache = _run_layers(stage, xt, 8, mask, positions)
    cache2 = stage.new_cache(64)
    stage.forward_one(x[:8], cache2, torch.arange(8))
    cache.keep([*range(8), 8, 11])
    one = stage.forward_one(x[8:9], cache2, positions[:1])
    two = stage.forward_one(x[11:12], cache2, positions[3:])
    assert torch.equal(one, rows[0:1]) and torch.equal(two, rows[3:4])
    assert torch.equal(cache.k[:, :, :10], cache2.k[:, :, :10])
    # two requests in one forward (block-diagonal), each with its own cache and past
    a, b = stage.new_cache(16), stage.new_cache(16)
    stage.forward_one(x[:5], a, torch.arange(5))
    stage.forward_one(x[5:8], b, torch.arange(3))
    alone_a, alone_b = _run_layers(stage, torch.cat([x[:5], x[8:10]]), 5)[0], _run_layers(stage, x[5:9], 3)[0]
    both = stage.forward(
        torch.cat([x[8:10], x[8:9]]),
        [
            Attend(a, torch.arange(5, 7), causal_mask(5, 2)),
            Attend(stage.new_cache(4), torch.arange(0), causal_mask(0, 0)),  # a request with no rows this time
            Attend(b, torch.tensor([3]), causal_mask(3, 1)),
        ],
    )
    assert torch.equal(both[:2], alone_a) and torch.equal(both[2:], alone_b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_reads_each_key_alike_wherever_it_falls(embedded_source, dtype):
    """The attention scores keys 8 at a time with the 3 query heads of a kv head sharing each key, the
    last keys one by one, and reads a bf16 cache as it is for 1-2 rows but widened once for more: a key's
    score and a value's share must not depend on which of these it met. The embedded model (its 30
    layers make a changed rounding in the attention show: each layer's int8 rounding of the attention
    output hides most), a tree after 13 cached rows (its rows see 14-19 keys, crossing a block of 8)
    against the same tokens decoded one at a time after the tree is pruned to them (14-16 keys)."""
    stage = Stage.load(embedded_source, vocab=False, dtype=dtype, weights="int4a8")
    assert stage.fused is not None
    torch.manual_seed(4)
    x = (torch.randn(19, stage.cfg.hidden_size) * 0.5).to(stage.dtype)
    parent = [-1, 0, 1, 0, 3, 4]  # rows 0-1-2 and 0-3-4-5: decoding 0, 3, 4 alone must give rows 0, 3 and 4
    tree = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        j = i
        while j >= 0:
            tree[i, j], j = True, parent[j]
    mask = torch.cat([torch.ones(6, 13, dtype=torch.bool), tree], dim=1)
    rows, cache = _run_layers(stage, x, 13, mask, torch.tensor([13, 14, 15, 14, 15, 16]))
    alone = stage.new_cache(32)
    stage.forward_one(x[:13], alone, torch.arange(13))
    for r, pos in ((0, 13), (3, 14), (4, 15)):
        assert torch.equal(stage.forward_one(x[13 + r : 14 + r], alone, torch.tensor([pos])), rows[r : r + 1])
    cache.keep([*range(13), 13, 16, 17])
    assert torch.equal(cache.k[:, :, :16], alone.k[:, :, :16]) and torch.equal(cache.v[:, :, :16], alone.v[:, :, :16])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_decoded_rows_heads_split_between_threads_give_the_batched_bits(embedded_source, dtype):
    """A row alone has 3 kv heads of 3 query heads for 2 threads: each thread takes 4-5 query heads, one kv
    head's split between them, where whole kv heads went 2:1. Its result must be bitwise what one thread
    gives, and what the same row gives in a batch of 4 (dealt out by (row, kv head), its cache widened),
    after 80 cached rows (enough keys for the attention to run on both threads)."""
    stage = Stage.load(embedded_source, vocab=False, dtype=dtype, weights="int4a8")
    assert stage.fused is not None
    torch.manual_seed(5)
    x = (torch.randn(84, stage.cfg.hidden_size) * 0.5).to(stage.dtype)
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = _run_layers(stage, x[:81], 80)[0]
        batched, _ = _run_layers(stage, x, 80)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[2], got[1]) and torch.equal(got[2], batched[:1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_wanted_for_their_cache_entries_only(tiny_gguf, dtype):  # noqa: F811
    """``out_from``: the last layer skips attention, output projection and MLP for the rows before it (an
    EAGLE head catching up wants only its last row's output). The cache entries of every row and the
    output rows from ``out_from`` on are bitwise a whole forward's, with a mask and past entries too."""
    stage = Stage.load(tiny_gguf["Q4_1"], vocab=False, dtype=dtype, weights="int4a8")
    torch.manual_seed(3)
    x = torch.randn(12, stage.cfg.hidden_size).to(stage.dtype)
    cos, sin = stage.rope(torch.arange(4, 12), stage.dtype)

    def run(out_from: int):
        cache = stage.new_cache(16)
        stage.forward_one(x[:4], cache, torch.arange(4))
        cache.reserve(8)
        y = stage.fused.forward(x[4:], [cache], [8], [causal_mask(4, 8)], cos[0], sin[0], out_from=out_from)
        cache.commit(8)
        return y, cache

    whole, c0 = run(0)
    for out_from in (1, 5, 7):
        y, c = run(out_from)
        assert torch.equal(y[out_from:], whole[out_from:])
        assert torch.equal(c.k[:, :, :12], c0.k[:, :, :12]) and torch.equal(c.v[:, :, :12], c0.v[:, :, :12])
        assert torch.equal(y[:out_from], x[4 : 4 + out_from])  # not computed: the input rows as they were
    with pytest.raises(ValueError, match="out_from"):
        stage.fused.forward(x[4:], [stage.new_cache(16)], [8], [causal_mask(0, 8)], cos[0], sin[0], out_from=8)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_draft_head_layer_in_c(tiny_gguf, dtype):  # noqa: F811
    """An int4a8 target's draft head runs its decoder layer through q4a8_layers.c too: within the
    stage's bound of the torch ops on the same packed weights, and with each row alike in any batch,
    so growing a draft level by level (``extend``) gives the deeper draft exactly."""
    from test_eagle import fed, random_head

    from models.eagle import EagleDrafter
    from models.tree import frontier

    target = Stage.load(tiny_gguf["Q4_1"], dtype=dtype, weights="int4a8")
    drafter = EagleDrafter(random_head(target), target)
    head = drafter.head
    assert head._fused is not None
    g = torch.Generator().manual_seed(4)
    h = target.cfg.hidden_size
    emb, feat = (torch.randn(9, h, generator=g).to(target.dtype) for _ in range(2))

    def rows(fused: bool) -> torch.Tensor:
        keep, head._fused = head._fused, head._fused if fused else None
        try:
            cache = drafter.fresh().cache
            with torch.inference_mode():
                return head.step(emb, feat, cache, torch.arange(9), causal_mask(0, 9))
        finally:
            head._fused = keep

    c, t = rows(True), rows(False)
    assert float((c.float() - t.float()).abs().max()) <= 0.04 * float(t.float().abs().max())  # as the stage's
    with torch.no_grad():
        head.w_down.add_(0.5)  # changed in place after pack(): drafting falls back to the torch ops
    with torch.inference_mode():
        assert head._fused_layer() is None
    head.pack("int4a8")
    with torch.inference_mode():
        assert head._fused_layer() is not None
    context = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    fed(drafter, target, context)
    for depth in (1, 2, 3):
        pool = drafter.draft(context, top_k=3, depth=depth, max_nodes=64)
        drafter.extend(context, pool, frontier(pool, 3), top_k=3, max_nodes=64)
        want = drafter.draft(context, top_k=3, depth=depth + 1, max_nodes=64)
        assert (pool.tokens, pool.parents, pool.scores) == (want.tokens, want.parents, want.scores)


def test_threads_follow_torch_in_any_calling_thread():
    """Each call runs as many threads as torch's setting (``--threads``), also from a thread where OpenMP's
    own count was never set (it is per thread: a fresh one has OpenMP's default, every core)."""
    import threading

    lib = q4a8.library()
    before = torch.get_num_threads()
    seen = []

    def call() -> None:
        x = torch.randn(2, 64)
        rows = random_rows(32, 64)
        q4a8.matmul(x, q4a8.pack(rows.q, rows.scale, rows.zero), 32)
        seen.append(lib.q4a8_team())

    try:
        torch.set_num_threads(1)
        t = threading.Thread(target=call)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
