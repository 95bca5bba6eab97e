"""``meshd profile`` and ``meshd generate`` as a user runs them: flags in, JSON out."""

from __future__ import annotations

import json
import re
import time

import pytest
from support import assert_matches_greedy, greedy_reference

from meshd import cli
from meshd.serve.loading import Ticker, load_layers
from models.ranges import LayerRange
from models.source import ModelSource
from models.text import encode_prompt, stop_ids

SIZES = ["1", "2", "4", "8", "16", "32", "64"]


def test_profile_json_has_a_curve_per_dtype_and_slice(tiny_dir, capsys):
    assert (
        cli.main(
            [
                "profile",
                "--model",
                str(tiny_dir),
                "--dtypes",
                "fp32,bf16",
                "--layers",
                "1:3",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == [1, 3]
    assert set(report["curves_ms"]) == {"meshd-fp32", "meshd-bf16"}
    for curve in report["curves_ms"].values():
        assert list(curve) == SIZES
        ms = [curve[t] for t in SIZES]
        assert all(v > 0 for v in ms) and ms == sorted(ms)  # a cost curve never falls with more tokens


def test_profile_says_what_it_loads_and_measures_on_stderr(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("meshd.serve.loading.PROGRESS_EVERY_S", 0.0)  # a line per layer, however fast
    argv = ["profile", "--model", str(tiny_dir), "--dtypes", "fp32", "--layers", "1:3", "--repeats", "1", "--json"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["layers"] == [1, 3]  # stdout stays the answer
    lines = err.splitlines()
    assert lines.pop(0) == f"meshd profile: starting (model {tiny_dir}) ..."  # said before torch is imported
    what = f"loading layers [1, 3) of {tiny_dir.name} (fp32)"
    assert lines[0] == f"{what} ..."  # said before the first tensor is read
    assert [re.sub(r" \(\d+ s\)$", "", x) for x in lines[1:3]] == [f"{what}: layer {i} of 2" for i in (1, 2)]
    assert re.fullmatch(re.escape(what) + r": 2 layers in [\d.]+ s", lines[3])
    assert lines[4] == "measuring fp32 layers [1, 3) ..."


def test_the_daemon_loads_its_vocabulary_ends_through_the_same_progress(tiny_dir):
    said: list[str] = []
    src = ModelSource.resolve(tiny_dir)
    stage = load_layers(src, LayerRange(0, 0), "fp32", None, "loading the model", vocab=True, say=said.append)
    assert stage.has_vocab and stage.n_layers == 0
    assert len(said) == 1 and re.fullmatch(r"loading the model: the vocabulary ends in [\d.]+ s", said[0]), said


def test_a_ticker_speaks_while_a_step_runs_and_stops_with_it():
    said: list[str] = []
    with Ticker(said.append, "measuring", every=0.02):
        time.sleep(1.0)
    n = len(said)
    assert n >= 2 and all(re.fullmatch(r"measuring \(\d+ s\)", s) for s in said), said
    assert n < 30, n  # at a fixed 0.02 s, 50 lines: the gaps grow with the time so far
    time.sleep(0.2)
    with Ticker(said.append, "a quick step", every=5.0):
        pass
    assert len(said) == n  # nothing after its step ended, nothing from a step shorter than the interval


@pytest.mark.slow
def test_generate_json_fields_and_spec_equals_ar(embedded, embedded_tokenizer, capsys, monkeypatch):
    monkeypatch.setattr("meshd.serve.loading.PROGRESS_EVERY_S", 0.0)  # a line per layer, however fast
    prompt = "Name three primary colours."
    runs = {}
    for mode in ("ar", "spec"):
        assert (
            cli.main(
                [
                    "generate",
                    prompt,
                    "--mode",
                    mode,
                    "--drafter",
                    "ngram",
                    "--max-tokens",
                    "24",
                    "--dtype",
                    "fp32",
                    "--threads",
                    "2",
                    "--json",
                ]
            )
            == 0
        )
        out, err = capsys.readouterr()
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        said = err.splitlines()  # while the model loads: what, how far, done; then the tokenizer
        assert said.pop(0) == "meshd generate: starting (model default) ..."  # before torch is imported
        assert said[0].startswith("loading SmolLM2-135M-Instruct") and said[0].endswith(" ...")
        layers = [x for x in said if re.search(r": layer \d+ of 30 \(", x)]
        assert len(layers) == 30 and "layer 30 of 30" in layers[-1]
        assert any(re.search(r": 30 layers and the vocabulary ends in [\d.]+ s$", x) for x in said)
        assert "loading the tokenizer ..." in said
    for out in runs.values():
        for key in (
            "text",
            "token_ids",
            "new_tokens",
            "rounds",
            "mean_accepted",
            "target_forwards",
            "seconds",
            "tokens_per_s",
        ):
            assert key in out, key
        assert out["new_tokens"] == len(out["token_ids"]) > 0 and out["text"].strip()
    assert runs["ar"]["mean_accepted"] == 1.0 and runs["ar"]["rounds"] >= runs["spec"]["rounds"]
    assert set(runs["spec"]["cost_curve_ms"]) == set(SIZES)  # the curve the tree budget chose from
    ids = encode_prompt(embedded_tokenizer, prompt, chat=True)  # generate applies the chat template by default
    want, gaps = greedy_reference(embedded, ids, 24, set(stop_ids(embedded_tokenizer, embedded.cfg)))
    assert_matches_greedy(runs["spec"]["token_ids"], want, gaps)
    assert_matches_greedy(runs["ar"]["token_ids"], want, gaps)
