"""``meshd plot`` on small synthetic records: every plot is written when its records are there,
skipped with a reason when they are not, and comparisons use only the prompts every record shares."""

from __future__ import annotations

import json

import pytest

from meshd import cli
from meshd.lab import plots


def bench_record(stages: int, link: str | None, speeds: dict[str, float], qids=(1, 2)) -> dict:
    runs = [
        {
            "question_id": q,
            "category": "math",
            "mode": m,
            "new_tokens": 100,
            "rounds": 50,
            "mean_accepted": 2.0,
            "target_forwards": 50,
            "seconds": 100 / v,
            "tokens_per_s": v,
        }
        for q in qids
        for m, v in speeds.items()
    ]
    summary = {
        f"{c}/{m}": {"tokens_per_s": v, "mean_accepted": 1.5} for c in ("math", "ALL") for m, v in speeds.items()
    }
    return {
        "config": {
            "backend": "daemons",
            "stages": stages,
            "link": link,
            "device_slowdown": 1.0,
            "backend_info": f"{stages} daemons on loopback (1 thread each, sharing 2 cores)",
        },
        "machine": {},
        "summary": summary,
        "runs": runs,
    }


def sim_record(stages: int, rate: float, nodes: float) -> dict:
    s = {
        "throughput": 10.0 + rate,
        "tpot_p50": 0.1,
        "tpot_p95": 0.2,
        "ttft_p50": 0.5,
        "ttft_p95": 0.9,
        "nodes_per_round": nodes,
        "mean_accepted": 1.5,
        "utilisation": [0.5] * stages,
    }
    return {
        "label": "simulated",
        "config": {"stages": stages, "rate": rate, "link": "1ms/150mbit"},
        "profile": {"name": "jetson-orin-7b"},
        "summary": {"flow": s, "ar": s | {"nodes_per_round": 1.0}},
        "ratios": {"flow/ar": 2.0, "flow/chunk": 1.3},
        "timeline": [
            {"device": d, "kind": k, "start": 0.01 * i, "end": 0.01 * i + 0.005, "requests": ["r"], "rows": 4}
            for i, (d, k) in enumerate([(0, "originator"), (0, "stage"), (1, "stage")] * 5)
        ],
    }


def write(tmp_path, name: str, rec: dict):
    p = tmp_path / name
    p.write_text(json.dumps(rec))
    return str(p)


def test_every_plot_from_complete_records(tmp_path, capsys):
    files = [
        write(tmp_path, "b2.json", bench_record(2, None, {"ar": 10, "chunk": 12, "flow": 14})),
        write(tmp_path, "b3.json", bench_record(3, None, {"ar": 9, "chunk": 11, "flow": 14})),
        write(tmp_path, "b2l.json", bench_record(2, "5ms/100mbit", {"ar": 8, "chunk": 9, "flow": 11})),
        write(tmp_path, "s1.json", sim_record(5, 0.5, 30.0)),
        write(tmp_path, "s2.json", sim_record(5, 2.0, 12.0)),
    ]
    assert cli.main(["plot", *files, "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out, out
    for name in ("tokens_per_category", "speedup_vs_stages", "speedup_vs_link", "load", "timeline_flow"):
        png = tmp_path / "png" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_missing_records_are_skipped_with_the_reason(tmp_path, capsys):
    f = write(tmp_path, "b2.json", bench_record(2, None, {"ar": 10, "chunk": 12, "flow": 14}))
    assert cli.main(["plot", f, "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "skipped speed-up vs link latency: needs" in out and "skipped load" in out
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"junk\.json: not a readable JSON record"):
        plots.load_records([tmp_path / "junk.json"])


def test_link_comparison_uses_shared_prompts_only():
    wide = bench_record(2, None, {"ar": 10, "chunk": 10, "flow": 20}, qids=(1, 2, 3))
    for r in wide["runs"]:  # question 3 is an outlier the shaped run never saw
        if r["question_id"] == 3 and r["mode"] == "flow":
            r["seconds"] = 1000.0
    assert plots._speedups(wide, {1, 2})["flow/ar"] == pytest.approx(2.0)
    assert plots._speedups(wide)["flow/ar"] == pytest.approx(2.0)  # the summary's figure
    assert plots._speedups(wide, {1, 2, 3})["flow/ar"] < 1.0
