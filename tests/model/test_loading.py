"""Loading: GGUF (quantised, llama.cpp row order) and safetensors, whole or by layer range."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from support import forward_terms, hf_model, make_tiny_checkpoint, rounding_tolerance
from transformers import AutoModelForCausalLM

from models.gguf_header import ARRAY_LIMIT, read_header
from models.layers import dense
from models.ranges import LayerRange
from models.source import ModelSource, embedded_model_path
from models.stage import Stage
from models.weights import TensorReader

QTYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
}
HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (written independently of models.weights)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, out, qtype: str) -> dict[str, torch.Tensor]:
    """Convert a tiny HF checkpoint to GGUF; return the HF-layout weights it really encodes."""
    model = hf_model(hf_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    encoded = {}
    for name, p in model.state_dict().items():
        arr = p.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            gname = f"blk.{layer}.{HF_TO_GGUF[rest]}"
        t = QTYPES[qtype] if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        q = gguf.quants.quantize(arr, t)
        encoded[name] = torch.from_numpy(np.array(gguf.quants.dequantize(q, t), dtype=np.float32).reshape(arr.shape))
        if name.endswith("q_proj.weight"):
            q = gguf.quants.quantize(llama_cpp_permute(arr, cfg.num_attention_heads), t)
        elif name.endswith("k_proj.weight"):
            q = gguf.quants.quantize(llama_cpp_permute(arr, cfg.num_key_value_heads), t)
        w.add_tensor(gname, q, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return encoded


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_gguf_dequantizes_and_unpermutes(tmp_path, qtype):
    hf_dir = make_tiny_checkpoint(tmp_path / "hf")
    encoded = write_gguf(hf_dir, tmp_path / "m.gguf", qtype)
    src = ModelSource.resolve(tmp_path / "m.gguf")
    assert src.kind == "gguf" and src.config.n_layers == 4 and not src.config.tie_embeddings
    reader = TensorReader(src)
    for name, want in encoded.items():
        assert torch.equal(reader.read(name).float(), want), name
    # and the forward over those weights equals transformers' with the same (dequantized) weights
    ref = hf_model(hf_dir)
    ref.load_state_dict(encoded)
    stage = Stage.load(src, dtype="fp32")
    ids = torch.arange(0, 60) % 64
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = stage.logits(stage.forward_one(stage.embed(ids), stage.new_cache(), torch.arange(60)))
    # identical (dequantized) fp32 weights, transformers' kernels vs ours: rounding only
    tol = rounding_tolerance(torch.float32, forward_terms(src.config, 60), want.abs().max())
    assert (got - want).abs().max() <= tol


@pytest.mark.parametrize("qtype", [*QTYPES, pytest.param("embedded", marks=pytest.mark.slow)])
def test_header_reader_matches_gguf_py(tmp_path, qtype):
    """Our header reader (which skips the tokenizer's long lists) sees what gguf-py sees."""
    if qtype == "embedded":
        path = embedded_model_path()
    else:
        path = tmp_path / "m.gguf"
        write_gguf(make_tiny_checkpoint(tmp_path / "hf"), path, qtype)
    ours, theirs = read_header(path), gguf.GGUFReader(str(path))
    for key, f in theirs.fields.items():
        if key.startswith("GGUF."):  # gguf-py's own pseudo-fields (version, counts)
            continue
        assert ours.array_lengths.get(key, len(f.data)) == len(f.data), key
        if key in ours.fields:
            assert ours.fields[key] == f.contents(), key
        else:  # only long arrays are skipped
            assert ours.array_lengths[key] > ARRAY_LIMIT, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(x) for x in b.shape))
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_partial_load_equals_full_and_reads_only_its_layers(tmp_path, kind):
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", num_hidden_layers=6)
    if kind == "gguf":
        write_gguf(hf_dir, tmp_path / "m.gguf", "Q8_0")
    src = ModelSource.resolve(hf_dir if kind == "safetensors" else tmp_path / "m.gguf")
    full = Stage.load(src, dtype="fp32")
    reader = TensorReader(src)
    part = Stage.load(src, LayerRange(2, 5), vocab=False, dtype="fp32", reader=reader)
    assert all(n.startswith(("model.layers.2.", "model.layers.3.", "model.layers.4.")) for n in reader.read_names)
    assert len(reader.read_names) == 3 * 9 and not part.has_vocab
    for a, b in zip(full.layers[2:5], part.layers):
        for f, t in vars(a).items():
            assert (t is None and getattr(b, f) is None) or torch.equal(dense(t), dense(getattr(b, f))), f
    # three slices chained reproduce the whole model's hidden states
    slices = [Stage.load(src, LayerRange(a, b), vocab=False, dtype="fp32") for a, b in [(0, 2), (2, 5), (5, 6)]]
    ids = torch.arange(20)
    x = full.embed(ids)
    for s in slices:
        x = s.forward_one(x, s.new_cache(), torch.arange(20))
    want = full.forward_one(full.embed(ids), full.new_cache(), torch.arange(20))
    # the same fp32 ops on the same weights; kernels may still pick another order for other buffers
    tol = rounding_tolerance(torch.float32, forward_terms(src.config, 20, lm_head=False), want.abs().max())
    assert (x - want).abs().max() <= tol
    # and so do slices cut from the loaded model, which share its weights
    cut = [full.slice(LayerRange(a, b)) for a, b in [(0, 2), (2, 5), (5, 6)]]
    assert all(c.layers[0] is full.layers[c.layer_range.first] and not c.has_vocab for c in cut)
    x = full.embed(ids)
    for s in cut:
        x = s.forward_one(x, s.new_cache(), torch.arange(20))
    assert (x - want).abs().max() <= tol
    with pytest.raises(ValueError, match="not within"):
        cut[1].slice(LayerRange(0, 3))


@pytest.mark.slow
def test_embedded_model_matches_transformers_gguf_loader(embedded_source, embedded):
    """transformers' own GGUF path (whole-file dequantisation) is the reference for the real file."""
    ref = AutoModelForCausalLM.from_pretrained(
        str(embedded_source.path.parent), gguf_file=embedded_source.path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 4236, 1098, 28, 7])
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = embedded.logits(embedded.forward_one(embedded.embed(ids), embedded.new_cache(), torch.arange(len(ids))))
    # the same dequantized fp32 weights, transformers' kernels vs ours: rounding only
    tol = rounding_tolerance(torch.float32, forward_terms(embedded.cfg, len(ids)), want.abs().max())
    assert (got - want).abs().max() <= tol, ((got - want).abs().max(), tol)


RSS_SCRIPT = """
import json, sys
from models.ranges import LayerRange
from models.stage import Stage
first, stop, vocab = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
s = Stage.load("default", LayerRange(first, stop), vocab=vocab, dtype="fp32")
# VmHWM, not ru_maxrss: the latter survives exec and would report the forking pytest's peak
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"maxrss_kib": hwm, "weights": s.nbytes()}))
"""


def _peak(first: int, stop: int, vocab: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(first), str(stop), "1" if vocab else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ten_layer_slice_does_not_materialize_the_rest():
    whole = _peak(0, 30, True)
    part = _peak(10, 20, False)
    saved = (whole["maxrss_kib"] - part["maxrss_kib"]) * 1024
    # the other 20 layers plus the vocabulary ends are ~2/3 of the weights; the slice must save most of that
    assert saved > 0.7 * (whole["weights"] - part["weights"]), (whole, part)
