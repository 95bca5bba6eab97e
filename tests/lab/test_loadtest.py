"""The measured load test's parts: arrival schedule, statistics, and a real streamed run against the
REST API (fake runtime), so SSE parsing, TTFT and the daemon's own stats are exercised end to end."""

from __future__ import annotations

import itertools
import math

import pytest

from meshd import cli
from meshd.lab import loadtest


def test_poisson_schedule_is_reproducible_and_has_the_rate():
    a = loadtest.poisson_arrivals(2000, 4.0, seed=3)
    assert a == loadtest.poisson_arrivals(2000, 4.0, seed=3) != loadtest.poisson_arrivals(2000, 4.0, seed=4)
    assert all(x < y for x, y in itertools.pairwise(a))
    assert 2000 / a[-1] == pytest.approx(4.0, rel=0.1)


def test_statistics():
    assert loadtest.percentile([3.0, 1.0, 2.0, math.nan], 50) == 2.0
    assert loadtest.percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0 and math.isnan(loadtest.percentile([], 50))
    assert loadtest.per_token_latency(1.0, 2.0, 11) == pytest.approx(0.1)
    assert math.isnan(loadtest.per_token_latency(1.0, 1.0, 1)) and math.isnan(loadtest.per_token_latency(None, 2, 5))
    ok = {
        "ok": True,
        "start": 0.0,
        "end": 2.0,
        "ttft": 0.5,
        "tpot": 0.1,
        "tokens": 10,
        "rounds": 4,
        "verified_nodes": 20,
    }
    row = loadtest.summarize_load(
        [ok, ok | {"start": 1.0, "end": 4.0}, {"ok": False, "error": "HTTP 503", "start": 2.0}], 0.5, "flow"
    )
    assert row["completed"] == 2 and row["failed"] == 1 and row["errors"] == ["HTTP 503"]
    assert row["throughput"] == pytest.approx(20 / 4.0) and row["mean_accepted"] == 2.5
    assert row["nodes_per_round"] == 5.0 and row["ttft_p50"] == 0.5
    assert math.isnan(row["gap_p95"])  # no chunk times: no gaps
    assert [r["start"] for r in row["per_request"]] == [0.0, 1.0, 2.0]
    assert [r["ok"] for r in row["per_request"]] == [True, True, False]


def test_chunk_gaps_are_the_pauses_a_reader_sees():
    assert loadtest.chunk_gaps([0.5, 0.6, 0.9]) == pytest.approx([0.1, 0.3]) and loadtest.chunk_gaps([0.5]) == []
    ok = {"ok": True, "start": 0.0, "end": 2.0, "ttft": 0.5, "tpot": 0.1, "tokens": 10, "rounds": 4}
    fast = ok | {"verified_nodes": 4, "chunks": [0.5] + [0.5 + 0.01 * i for i in range(1, 20)]}
    slow = ok | {"verified_nodes": 4, "chunks": [0.5, 1.5]}
    row = loadtest.summarize_load([fast, slow], 1.0, "flow")
    assert row["gap_p95"] == pytest.approx(0.01)  # one long pause among twenty is above the 95th percentile
    assert loadtest.summarize_load([fast, slow, slow], 1.0, "flow")["gap_p95"] == pytest.approx(1.0)
    assert row["per_request"][1]["chunks"] == [0.5, 1.5]
    table = loadtest.load_table([row])
    assert "| gap p95 ms |" in table and table.splitlines()[-1].split("|")[7].strip() == "10"


async def test_streamed_requests_against_the_rest_api(rt, url):
    row = await loadtest.run_rate(
        [url],
        rt.model_name,
        ["Hi there", "Tell me more"],
        rate=20.0,
        n=4,
        mode="flow",
        max_tokens=8,
        temperature=0.0,
        seed=0,
    )
    assert row["completed"] == 4 and row["failed"] == 0, row
    assert row["tokens"] > 0 and row["throughput"] > 0 and row["ttft_p50"] > 0
    assert row["mean_accepted"] >= 1.0  # from the daemon's own stats in the final chunk
    assert [r["originator"] for r in row["per_request"]] == [0, 0, 0, 0]
    assert all(r["chunks"] and r["chunks"][0] == pytest.approx(r["ttft"], abs=1e-3) for r in row["per_request"])
    bad = await loadtest.run_rate(
        [url + "/nope"], rt.model_name, ["Hi"], rate=50.0, n=2, mode="flow", max_tokens=4, temperature=0.0, seed=0
    )
    assert bad["completed"] == 0 and bad["failed"] == 2 and bad["errors"][0].startswith("HTTP 404")


def test_load_needs_daemons(capsys):
    assert cli.main(["bench", "--questions", "everyday", "--load", "0.5", "--backend", "local"]) != 0
    assert "--load needs --backend daemons" in capsys.readouterr().err
