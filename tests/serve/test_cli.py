"""``meshd profile`` and ``meshd generate`` as a user runs them: flags in, JSON out."""

from __future__ import annotations

import json

import pytest
from support import assert_matches_greedy, greedy_reference

from meshd import cli
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


@pytest.mark.slow
def test_generate_json_fields_and_spec_equals_ar(embedded, embedded_tokenizer, capsys):
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
        runs[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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
