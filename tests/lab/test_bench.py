"""Benchmark inputs: which question file a run reads, and how questions are chosen from it."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshd import cli, config
from meshd.lab import bench, emulate
from meshd.lab.bench import EVERYDAY, question_file, spread_over_categories
from meshd.lab.testbed import ids_placing
from training.prompts import SPEC_BENCH_ENV, load_questions


def write_questions(path: Path, rows: list[tuple[int, str]]) -> Path:
    path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"q{i}"]}) + "\n" for i, c in rows))
    return path


def test_question_file_from_the_flag_the_environment_or_the_everyday_set(monkeypatch, tmp_path):
    monkeypatch.delenv(SPEC_BENCH_ENV, raising=False)
    assert question_file("everyday") == EVERYDAY and EVERYDAY.is_file()
    assert question_file(str(tmp_path / "q.jsonl")) == tmp_path / "q.jsonl"
    with pytest.raises(ValueError, match=r"no question file.*--questions everyday.*MESHD_SPEC_BENCH"):
        question_file(None)
    monkeypatch.setenv(SPEC_BENCH_ENV, str(tmp_path / "env.jsonl"))
    with pytest.raises(ValueError, match=r"env\.jsonl \(from \$MESHD_SPEC_BENCH\) not found"):
        question_file(None)
    write_questions(tmp_path / "env.jsonl", [(1, "a")])
    assert question_file(None) == tmp_path / "env.jsonl"
    assert question_file("everyday") == EVERYDAY  # the flag wins over the environment


def test_bench_and_simulate_fail_clearly_without_a_question_file(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(SPEC_BENCH_ENV, raising=False)
    assert cli.main(["bench", "--backend", "local"]) == 2
    assert "no question file: pass --questions PATH" in capsys.readouterr().err
    missing = tmp_path / "question.jsonl"
    assert cli.main(["simulate", "--questions", str(missing)]) == 2
    assert f"question file {missing} not found" in capsys.readouterr().err


def test_load_questions_per_category_in_file_order(tmp_path):
    f = write_questions(tmp_path / "q.jsonl", [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "a"), (8, "b")])
    assert [q["question_id"] for q in load_questions(f, None, 2)] == [1, 2, 3, 4, 8]
    assert [q["question_id"] for q in load_questions(f, 2, 1)] == [1, 2]
    assert [q["question_id"] for q in load_questions(f, ["c", "b"], 5)] == [2, 4, 8]
    assert [q["question_id"] for q in load_questions(f, None, 5, held_out_only=True)] == [4, 8]
    with pytest.raises(ValueError, match="unknown categories"):
        load_questions(f, ["z"], 1)


def test_spread_over_categories_is_round_robin(tmp_path):
    f = write_questions(tmp_path / "q.jsonl", [(1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "c")])
    qs = load_questions(f, None, 10)
    assert [q["question_id"] for q in spread_over_categories(qs, 4)] == [1, 3, 4, 2]
    assert len(spread_over_categories(load_questions(EVERYDAY, None, 10), 13)) == 13


def test_device_notes_give_busy_fractions_and_flag_an_emulation_that_overran():
    em = {
        "spec": "jetson-orin-7b:x8",
        "stage_forwards": {"calls": 90, "overruns": 0},
        "lm_head": {"calls": 10, "overruns": 0},
        "drafts": {"calls": 0, "overruns": 0},
    }
    slow = {**em, "lm_head": {"calls": 10, "overruns": 10}, "stage_forwards": {"calls": 10, "overruns": 5}}
    note = bench.devices_note(
        [
            {"node": 0, "stage": {}, "emulation": em, "busy_fraction": 0.42},
            {"node": 1, "stage": {}, "emulation": slow, "busy_fraction": 0.2},
        ]
    )
    lines = note.strip().splitlines()
    assert (
        lines[0] == "daemon 0: busy fraction 0.42 during this record, EMULATED jetson-orin-7b:x8: "
        "0/100 calls overran the profile"
    )
    assert "15/20 calls overran" in lines[1] and "CPU-bound" in lines[1]
    assert bench.devices_note([]) == ""


def test_a_benchmark_says_how_far_it_got_during_and_after_each_run(monkeypatch):
    monkeypatch.setattr("meshd.serve.loading.TICK_EVERY_S", 0.05)  # "still running" lines this often

    def slow(_text: str) -> dict:
        time.sleep(0.3)
        return {
            "new_tokens": 4,
            "rounds": 2,
            "mean_accepted": 2.0,
            "target_forwards": 2,
            "seconds": 0.3,
            "tokens_per_s": 13.3,
        }

    def fast(_text: str) -> dict:
        return {
            "new_tokens": 4,
            "rounds": 4,
            "mean_accepted": 1.0,
            "target_forwards": 4,
            "seconds": 0.1,
            "tokens_per_s": 40.0,
        }

    said: list[str] = []
    questions = [{"question_id": 7, "category": "math", "turns": ["q"]}]
    runs = bench.run_interleaved(questions, {"flow": slow, "ar": fast}, said.append)
    assert [r.mode for r in runs] == ["flow", "ar"]
    running = [s for s in said if s.startswith("[1/2] q7 math flow: running (")]
    assert len(running) >= 2, said  # a slow run is never silent
    done = [i for i, s in enumerate(said) if "tok/s" in s]
    assert len(done) == 2 and said.index(running[-1]) < done[0], said  # then one line per run, when it ends
    assert not any("ar: running" in s for s in said)  # a quick run says only that it ended


def test_the_decode_rate_leaves_out_each_runs_prefill_and_its_token():
    def run(mode: str, tokens: int, seconds: float, prefill: float) -> bench.Run:
        return bench.Run(1, "math", mode, tokens, tokens, 1.0, tokens, seconds, tokens / seconds, 0, 0.0, 0, prefill)

    runs = [run("ar", 11, 1.5, 0.5), run("ar", 21, 2.5, 0.5), run("flow", 9, 1.0, 0.0)]
    assert bench.decode_rate(runs[:2]) == pytest.approx(30 / 3.0)  # (10 + 20) tokens after the first, in 1 + 2 s
    assert bench.decode_rate(runs[2:]) == 0.0  # a backend that did not time its prefill has no decode rate
    table, md = bench.summarize_runs(runs, baseline="ar")
    assert table["ALL/ar"]["decode_tokens_per_s"] == pytest.approx(10.0)
    assert table["ALL/ar"]["tokens_per_s"] == pytest.approx(32 / 4.0)
    assert "| ar tok/s | ar decode | ar acc |" in md and "| 8.00 | 10.00 | 1.00 |" in md


def test_the_table_says_how_many_answers_of_each_mode_are_the_baselines():
    """The oracle on a benchmark: each mode's answer to each question against the baseline's (by digest,
    so records stay small); a backend that gave no text (an old record's runs) gets no line."""

    def run(q: int, mode: str, text: str | None) -> bench.Run:
        sha = bench.text_digest(text) if text is not None else ""
        return bench.Run(q, "math", mode, 4, 4, 1.0, 4, 1.0, 4.0, text_sha=sha)

    runs = [run(1, "ar", "a b"), run(1, "flow", "a b"), run(1, "chunk", "a c"), run(2, "ar", "x"), run(2, "flow", "x")]
    runs.append(run(2, "chunk", "x"))
    table, md = bench.summarize_runs(runs, baseline="ar", temperature=1.0)
    assert table["ALL/flow"]["same_text"] == [2, 2] and table["ALL/chunk"]["same_text"] == [1, 2]
    assert md.startswith("sampled answers (seed 0) (the oracle): flow 2/2, chunk 1/2 the same as ar's\n\n| category")
    table, md = bench.summarize_runs([run(1, "ar", None), run(1, "flow", None)], baseline="ar")
    assert "same_text" not in table["ALL/flow"] and md.startswith("| category")
    assert bench.text_digest("a b") != bench.text_digest("a c") and len(bench.text_digest("")) == 16


def test_a_trees_wait_for_its_first_tokens_is_a_mean_over_the_trees_of_the_runs_that_timed_it():
    def run(mode: str, trees: int, waited: float) -> bench.Run:
        r = bench.Run(1, "math", mode, 8, 4, 2.0, 4, 1.0, 8.0, trees, 0.0, 16, 0.1)
        return replace(r, first_tokens_seconds=waited)

    table, _ = bench.summarize_runs([run("flow", 3, 0.6), run("flow", 1, 0.2), run("spec", 4, 0.0)], baseline="spec")
    assert table["ALL/flow"]["first_tokens_ms"] == pytest.approx(200.0)  # (0.6 + 0.2) s over 4 trees
    assert table["ALL/spec"]["first_tokens_ms"] is None  # one device's engine does not time it


def test_the_time_to_first_token_is_a_mean_over_the_runs_that_report_it_and_said_under_the_table():
    def run(mode: str, ttft: float) -> bench.Run:
        return bench.Run(1, "math", mode, 4, 4, 1.0, 4, 1.0, 4.0, first_token_seconds=ttft)

    table, md = bench.summarize_runs([run("ar", 0.2), run("ar", 0.4), run("flow", 0.25), run("spec", 0.0)], "ar")
    assert table["ALL/ar"]["ttft_ms"] == pytest.approx(300.0) and table["ALL/flow"]["ttft_ms"] == 250.0
    assert table["ALL/spec"]["ttft_ms"] is None  # its backend did not say
    assert md.endswith("time to first token at the API, mean ms: ar 300, flow 250")
    _, md = bench.summarize_runs([run("ar", 0.0)], "ar")
    assert "time to first token" not in md


def test_why_flows_trees_ended_is_summed_per_mode_and_said_under_the_table():
    def run(q: int, mode: str, ends: dict[str, int]) -> bench.Run:
        return bench.Run(q, "math", mode, 4, 4, 1.0, 4, 1.0, 4.0, tree_ends=ends)

    runs = [run(1, "ar", {}), run(1, "flow", {"missed": 3, "undrafted": 1}), run(2, "flow", {"missed": 3, "unsent": 1})]
    table, md = bench.summarize_runs(runs, baseline="ar")
    assert table["ALL/flow"]["tree_ends"] == {"missed": 6, "unsent": 1, "undrafted": 1}
    assert table["ALL/ar"]["tree_ends"] == {}
    assert md.endswith("held none: undrafted): flow missed 75 %, unsent 12 %, undrafted 12 % (of 8)")
    _, md = bench.summarize_runs([run(1, "ar", {}), run(1, "flow", {})], baseline="ar")
    assert "why drafted trees ended" not in md  # a record whose backend did not count them


def test_busy_fractions_are_counted_per_mode_over_that_modes_requests(monkeypatch):
    """Per mode, each stage's busy seconds while that mode's requests ran over their wall time: the
    figure issue 12 asks per mode, which the whole benchmark's fraction mixes."""
    busy = [0.0, 0.0]
    clock = [100.0]

    calls = [0]

    class Mesh:
        def status(self, i):
            emulation = {
                k: {"calls": calls[0], "overruns": calls[0] // 2} for k in ("stage_forwards", "lm_head", "drafts")
            }
            return {"stage": {"busy_seconds": busy[i]}, "emulation": {"spec": "jetson-orin-7b:x4", **emulation}}

        def url(self, i):
            return "http://x"

    def answer(method, url, body, timeout):  # one request: 2 s of wall, stage 0 busy 1.5 s, stage 1 0.5 s
        clock[0] += 2.0 if body["mode"] == "flow" else 4.0
        busy[0] += 1.5
        busy[1] += 0.5
        calls[0] += 2
        return 200, {"meshd": {"new_tokens": 1}, "choices": [{"message": {"content": "ok"}}]}

    monkeypatch.setattr(bench, "http", answer)
    monkeypatch.setattr(bench, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    daemons = object.__new__(bench.DaemonBackend)
    daemons.args = SimpleNamespace(stages=2, max_tokens=8, temperature=0.0)
    daemons.mesh, daemons.model, daemons._busy_by, daemons._emulation0 = Mesh(), "m", {}, {}
    daemons._busy0 = daemons._busy()
    for i in range(2):
        daemons._emulation_since(i, Mesh().status(i)["emulation"])
    for label in ("flow", "ar", "flow"):
        daemons.runner(label)("hi")
    devices = daemons.devices()
    assert [d["busy_by_mode"] for d in devices] == [{"flow": 0.75, "ar": 0.375}, {"flow": 0.25, "ar": 0.125}]
    assert "(flow 0.75, ar 0.38)" in bench.devices_note(devices)
    assert devices[0]["emulation"]["lm_head"] == {"calls": 6, "overruns": 3}  # 3 requests since the start
    daemons.runner("ar")("hi")  # the next record (the next temperature) counts from the previous one
    devices = daemons.devices()
    assert [d["busy_by_mode"] for d in devices] == [{"ar": 0.375}, {"ar": 0.125}]
    assert devices[1]["emulation"]["stage_forwards"] == {"calls": 2, "overruns": 1}
    assert "EMULATED jetson-orin-7b:x4: 3/6 calls overran" in bench.devices_note(devices)


def test_bench_daemons_prefill_every_mode_cold(tmp_path):
    """The modes take turns on each prompt through the same daemons: with prefix caching on, every mode after
    the first would reuse the prompt's KV kept by the one before, and only the first (``ar``, the baseline)
    would prefill it. The flags the bench gives its daemons turn the cache off, as ``meshd serve`` reads them."""
    args = SimpleNamespace(
        drafter="auto", device_slowdown=1.0, weights="auto", link="1ms/150mbit", emulate="jetson-orin-7b:x4"
    )
    ns = emulate.build_parser().parse_args(["serve", *bench.daemon_flags(args)])  # as LoopbackMesh starts them
    assert config.load_config(ns, env={"XDG_CONFIG_HOME": str(tmp_path)}).prefix_cache is False
    assert (ns.link, ns.emulate) == ("1ms/150mbit", "jetson-orin-7b:x4")


def test_roles_name_one_role_per_daemon_and_daemon_0_originates():
    """``--roles``: the origin-aware split on real daemons (peers that only serve stages); bad lists fail
    before any daemon starts, saying what to give instead."""
    assert bench.daemon_roles(None, 3) == ["both", "both", "both"]
    assert bench.daemon_roles("both, stage,stage", 3) == ["both", "stage", "stage"]
    assert bench.daemon_roles("originator,stage", 2) == ["originator", "stage"]
    for spec, why in [
        ("both,stage", "2 roles for 3 daemons"),
        ("both,stage,head", "'head' is not a role"),
        ("stage,both,both", "daemon 0 takes the requests"),
        ("originator,originator,originator", "no daemon holds layers"),
    ]:
        with pytest.raises(ValueError, match=why):
            bench.daemon_roles(spec, 3)


def test_node_ids_that_place_a_daemon_on_a_chosen_stage():
    """The ring is in ascending node-id order: ``ids_placing(first, at, n)`` gives daemon ``first`` the
    ``at``-th id and the others theirs in order; ``meshd bench --originator-stage K`` uses it for daemon 0."""
    for n in (1, 2, 5):
        for first in range(n):
            for at in range(n):
                ids = ids_placing(first, at, n)
                assert len(set(ids)) == n and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
                assert sorted(ids).index(ids[first]) == at
    with pytest.raises(ValueError, match="daemon 0 at stage 5"):
        ids_placing(0, 5, 5)


def test_bench_refuses_an_originator_stage_outside_the_ring(capsys):
    common = ["bench", "--questions", "everyday", "--backend", "daemons"]
    assert cli.main([*common, "--stages", "3", "--originator-stage", "4"]) == 2
    assert "--originator-stage 4: give a stage from 1 to 3" in capsys.readouterr().err
    assert cli.main([*common, "--stages", "2", "--originator-stage", "1", "--roles", "originator,both"]) == 2
    assert "no --roles originator" in capsys.readouterr().err
