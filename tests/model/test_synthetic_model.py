"""`meshd make-model`: a synthetic Llama-shaped GGUF that meshd loads like a real one, in every format."""

from __future__ import annotations

import hashlib
import json

import gguf
import pytest
import torch

from meshd.cli import build_parser, main
from meshd.lab import memory
from models.quant import SLAB_ROWS, WEIGHT_FORMATS, QuantRows
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage, layer_nbytes
from models.synthetic import QUANT_TYPES, SHAPES, write_synthetic_gguf


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, ModelSource]:
    d = tmp_path_factory.mktemp("synthetic")
    out = {}
    for quant in QUANT_TYPES:
        path = d / f"tiny-{quant}.gguf"
        assert main(["make-model", "--shape", "tiny", "--quant", quant, "--seed", "3", "--out", str(path)]) == 0
        out[quant] = ModelSource.resolve(str(path))
    return out


def test_cli_choices_are_the_modules():
    """The command line lists shapes and types without importing gguf; they must stay the module's."""
    mm = build_parser()._subparsers._group_actions[0].choices["make-model"]
    choices = {a.dest: a.choices for a in mm._actions if a.choices}
    assert choices["shape"] == list(SHAPES) and choices["quant"] == list(QUANT_TYPES)


@pytest.mark.parametrize("quant", QUANT_TYPES)
def test_file_has_the_shape_and_type(tiny_files, quant):
    src = tiny_files[quant]
    shape, cfg = SHAPES["tiny"], src.config
    assert (cfg.arch, cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size) == (
        "llama",
        shape.hidden,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.ffn,
    )
    assert cfg.vocab_size == src.gguf.array_lengths["tokenizer.ggml.tokens"] == 49152  # the donor's tokenizer
    assert not cfg.tie_embeddings
    types = {t.name: t.tensor_type.name for t in src.gguf_tensors}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == types["token_embd.weight"] == quant
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert src.gguf_fields()["tokenizer.ggml.model"] == "gpt2" and "tokenizer.chat_template" in src.gguf_fields()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_files):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    again = write_synthetic_gguf(tmp_path / "a.gguf", SHAPES["tiny"], "Q4_1", seed=3, name="synthetic-tiny")
    other = write_synthetic_gguf(tmp_path / "b.gguf", SHAPES["tiny"], "Q4_1", seed=4, name="synthetic-tiny")
    assert digest(again) == digest(tiny_files["Q4_1"].path) != digest(other)


def test_weights_are_the_init_distribution(tiny_files):
    """Random N(0, 0.02) through the quantizer: the std survives, so activations stay in range."""
    t = next(t for t in tiny_files["Q8_0"].gguf_tensors if t.name == "blk.1.ffn_up.weight")
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002


FORMATS = [w for w in WEIGHT_FORMATS if w != "auto"]


@pytest.mark.parametrize("quant", QUANT_TYPES)
@pytest.mark.parametrize("weights", FORMATS)
def test_slice_holds_what_the_planner_counts(tiny_files, quant, weights):
    src = tiny_files[quant]
    part = Stage.load(src, LayerRange(1, 3), vocab=False, weights=weights, dtype="auto")
    assert part.nbytes() == 2 * layer_nbytes(src, part.weights, part.dtype, 1)


@pytest.mark.parametrize("weights", FORMATS)
def test_whole_model_runs_in_every_format(tiny_files, weights):
    whole = Stage.load(tiny_files["Q4_1"], weights=weights, dtype="auto")
    cache = whole.new_cache(16)
    ids = [1, 504, 3128, 28]
    logits = whole.logits(whole.forward_one(whole.embed(ids), cache, torch.arange(len(ids))))
    assert logits.shape == (len(ids), 49152) and torch.isfinite(logits).all()
    assert float(logits.std()) > 0.1  # random weights give spread logits, not a constant


@pytest.mark.slow
def test_memory_check_runs_a_mesh_of_the_synthetic_model(tiny_files, tmp_path):
    """`python -m meshd.lab.memory` end to end on the tiny file: loads measured in child processes, a
    3-daemon mesh planned and answering with the single process's greedy tokens."""
    out = tmp_path / "memory.json"
    model = str(tiny_files["Q4_1"].path)
    assert (
        memory.main(["--model", model, "--formats", "int8", "--slice", "0:2", "--tokens", "4", "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    whole, part = report["loads"]
    assert whole["vocab"] and not part["vocab"] and part["layers"] == [0, 2]
    assert whole["VmHWM"] >= whole["VmRSS"] > whole["weight_bytes"] > part["weight_bytes"] > 0
    mesh = report["mesh"]
    assert mesh["same_tokens"] and len(mesh["reference"]["token_ids"]) == 4
    assert sorted(layers for _, layers in mesh["plan"]) == [[0, 1], [1, 2], [2, 3]]
    assert all(d["VmHWM"] >= d["VmRSS"] > 0 for d in mesh["daemons"])


def test_int4_packing_by_slabs_is_packing_at_once():
    """QuantRows.pack packs a tall matrix (a vocabulary) a slab of rows at a time to bound its int32
    temporary; the bytes must be those of one call over the whole matrix."""
    n, k = SLAB_ROWS + 48, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = QuantRows("int4", q, torch.rand(n, k // 32), torch.rand(n, k // 32))
    at_once = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    assert torch.equal(rows.pack(torch.float32).data, at_once)
