"""Our lean forward against transformers' own implementation of the same weights."""

from __future__ import annotations

import platform

import pytest
import torch
from support import forward_terms, hf_model, make_tiny_checkpoint, rounding_tolerance

from models import layers as st
from models.layers import Rope, causal_mask
from models.source import ModelSource
from models.stage import Stage

CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "qwen2-bias": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers(tmp_path, case):
    arch, over = CASES[case]
    path = make_tiny_checkpoint(tmp_path / case, arch, **over)
    ref = hf_model(path)
    stage = Stage.load(ModelSource.resolve(path), dtype="fp32")
    ids = torch.randint(0, 64, (90,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    cache = stage.new_cache(16)  # small on purpose: appends must grow it
    # prefill in two chunks, then single tokens: the cache path must agree with one full pass
    parts = [(0, 50), (50, 80)] + [(i, i + 1) for i in range(80, 90)]
    got = torch.cat(
        [stage.logits(stage.forward_one(stage.embed(ids[a:b]), cache, torch.arange(a, b))) for a, b in parts]
    )
    # same fp32 math as transformers in another order and with other kernels: rounding only
    tol = rounding_tolerance(torch.float32, forward_terms(stage.cfg, context=90), want.abs().max())
    assert (got - want).abs().max() <= tol, ((got - want).abs().max(), tol)


# bf16 roundings a value meets per layer (matmuls accumulate in fp32, so a dot product's terms cost
# nothing): each norm 3 (normalised value, weight, product), q/k/v 2 (weights, output), RoPE 4
# (table, two products, sum), attention output 1, o-proj with residual 3, gate/up 2, SwiGLU 2,
# down with residual 3. Outside the layers: the embedding row 1, final norm 3, LM head 2.
BF16_ROUNDINGS_PER_LAYER, BF16_ROUNDINGS_OUTSIDE = 23, 6


def test_bf16_close_to_fp32(tiny_dir):
    ids = torch.arange(40) % 64
    f32 = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    b16 = Stage.load(ModelSource.resolve(tiny_dir), dtype="bf16")
    a = f32.logits(f32.forward_one(f32.embed(ids), f32.new_cache(), torch.arange(40)))
    b = b16.logits(b16.forward_one(b16.embed(ids), b16.new_cache(), torch.arange(40)))
    assert b.dtype == torch.float32
    n = f32.cfg.n_layers * BF16_ROUNDINGS_PER_LAYER + BF16_ROUNDINGS_OUTSIDE
    # the fp32 reference's own rounding is 2^16 times smaller and not counted
    assert (a - b).abs().max() <= rounding_tolerance(torch.bfloat16, n, a.abs().max())
    # Not a rounding bound: bf16 may change a row's top token only where fp32's top-2 logits lie within
    # twice that row's bf16 error (about a fifth of these 40 rows, measured error ~0.04 x the largest
    # logit), and then only if the errors push the wrong way; 0.9 allows 4 such flips.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_tree_mask_equals_separate_paths(tiny_dir):
    """Two branches verified in one tree forward give the same logits as each branch alone."""
    stage = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    prompt = torch.tensor([5, 9, 11, 3])
    branches = [[7, 8, 9], [7, 20], [30]]
    # tree: root(3 is last prompt token) -> 7 -> 8 -> 9 ; 7 -> 20 ; root -> 30
    tokens = [7, 8, 9, 20, 30]
    parents = [-1, 0, 1, 0, -1]
    depth = [0, 1, 2, 1, 0]
    cache = stage.new_cache()
    stage.forward_one(stage.embed(prompt), cache, torch.arange(4))
    n = len(tokens)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    mask = torch.cat([torch.ones(n, 4, dtype=torch.bool), anc], 1)
    got = stage.logits(stage.forward_one(stage.embed(tokens), cache, torch.tensor(depth) + 4, mask))
    for br in branches:
        ids = torch.cat([prompt, torch.tensor(br)])
        full = stage.logits(stage.forward_one(stage.embed(ids), stage.new_cache(), torch.arange(len(ids))))
        # the same rows computed in a batch of 5 over masked keys vs alone: only the rounding may differ
        tol = rounding_tolerance(torch.float32, forward_terms(stage.cfg, context=len(ids)), full.abs().max())
        for k in range(len(br)):
            node = next(i for i, t in enumerate(tokens) if t == br[k] and depth[i] == k)
            assert (got[node] - full[4 + k]).abs().max() <= tol


def test_causal_mask_shape():
    m = causal_mask(3, 2)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_rope_table_grows_and_equals_the_formula(tiny_dir):
    rope = Rope.for_model(ModelSource.resolve(tiny_dir).config)
    for dt in (torch.float32, torch.bfloat16):
        pos = torch.tensor([0, 5, 700, 1500])  # past the first table (512 rows): it must grow
        freqs = pos.float()[:, None] * rope.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = rope(pos, dt)
        assert cos.dtype == dt and cos.shape == (1, 4, emb.shape[1])
        # Same fp32 ops on the same values, but a table row may take another code path through the
        # vectorised cos/sin than a 4-row tensor (a CPU's vector vs scalar libm: each within ~1 ulp),
        # and one fp32 ulp can flip the rounding to dt by one ulp of dt. |cos|, |sin| <= 1 here (scale 1),
        # where an ulp of dt is at most eps(dt): 2 eps bounds both.
        tol = 2 * torch.finfo(dt).eps
        torch.testing.assert_close(cos[0], (emb.cos() * rope.scale).to(dt), atol=tol, rtol=0)
        # the sine comes signed for rotate-half: its first half negated (models.layers.rotate)
        sign = torch.cat((-torch.ones(emb.shape[1] // 2), torch.ones(emb.shape[1] // 2)))
        torch.testing.assert_close(sin[0], (emb.sin() * rope.scale * sign).to(dt), atol=tol, rtol=0)
        one_cos, one_sin = rope(torch.tensor([700]), dt)  # one row: a view of the table, the same values
        assert torch.equal(one_cos[0, 0], cos[0, 2]) and torch.equal(one_sin[0, 0], sin[0, 2])


def test_packed_weights_match_plain_matmul(tiny_dir, monkeypatch):
    """Pre-packed (oneDNN) weights are only a layout: the forward must agree with plain F.linear."""
    # x86-64 builds of torch ship oneDNN (this project's CI does): there, loading must pack
    expect = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
    packed = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    assert packed.packed == expect
    w = torch.randn(40, 16)
    assert st.pack_weight(w).is_mkldnn == expect
    for dt in (torch.float32, torch.bfloat16):  # bf16 packs where the CPU has it
        wd, x = w.to(dt), torch.randn(5, 16, dtype=dt)
        got = st.linear(x, st.pack_weight(wd)).float()
        want = torch.nn.functional.linear(x, wd).float()
        # 16-term dot products summed in fp32 in another order (bf16 products are exact in fp32), scaled
        # by the sum of |terms|; a bf16 result is then rounded once more, which can differ by one bf16
        # ulp (<= eps * |value|) where the fp32 sums straddle a rounding boundary
        terms = (x.float().abs() @ wd.float().abs().T).max()
        atol = rounding_tolerance(torch.float32, 16, terms)
        rtol = torch.finfo(dt).eps if dt == torch.bfloat16 else 0.0
        assert torch.allclose(got, want, atol=atol, rtol=rtol), (got - want).abs().max()
    monkeypatch.setattr(st, "_PACK_DTYPES", {})
    monkeypatch.setenv("MESHD_PACK", "0")
    plain = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    assert not plain.packed
    for a, b in zip(packed.layers, plain.layers):
        assert torch.equal(st.dense(a.w_gate_up), b.w_gate_up)  # dense() gives the plain matrix back
    ids = torch.arange(30)
    outs = []
    for s in (packed, plain):
        cache = s.new_cache(8)
        outs.append(s.logits(s.forward_one(s.embed(ids), cache, torch.arange(30))))
    tol = rounding_tolerance(torch.float32, forward_terms(plain.cfg, context=30), outs[1].abs().max())
    assert (outs[0] - outs[1]).abs().max() <= tol  # the same fp32 sums, in oneDNN's blocked order
