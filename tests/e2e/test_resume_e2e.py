"""Boards come and go: real `meshd serve` processes on 127.0.0.1 lose a stage while 5 streaming
requests run through 3 stages, and every request still completes with the text of an uninterrupted
run (fp32, temperature 0: the oracle's greedy tokens, near-ties allowed), its client seeing a pause.

The stage goes three ways: SIGKILL, SIGTERM (it hands its layers over, then leaves), and a partition (its links
cut in the transport while the process lives). A killed stage that comes back is taken into the plan
again with live requests unharmed. Each test prints the pause every client saw.
"""

from __future__ import annotations

import threading
import time

import pytest
from support import assert_matches_greedy, chat_ids, greedy_reference, prompts

from meshd.lab.resume import Stream, extra_flags, middle_stage, start_streams, uninterrupted
from meshd.lab.testbed import LoopbackMesh as Mesh
from meshd.lab.testbed import http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # ~60 s each on a quiet machine; minutes on a busy one
TOKENS = 48
GROW_BACK_BOUND = 60.0  # s from the restart to a committed 3-stage plan again (start-up + load + measure)


QUESTIONS = [p["turns"][0] for p in prompts(1, categories=5)]


def check_streams(streams: list[Stream], threads: list[threading.Thread], runs, request, tok, what: str) -> None:
    """Every stream finished with the uninterrupted run's text. Where its tokens differ from that run's,
    the oracle decides: both must follow plain greedy decoding up to a near-tie (computed only then, as
    greedy decoding token by token is slow on a busy machine)."""
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a request hung"
    for k, s in enumerate(streams):
        assert s.error is None and s.meshd is not None, (k, s.error)
        got = s.meshd["token_ids"]
        assert s.text == tok.decode(got, skip_special_tokens=True), k
        text, ids = runs[k]
        if got != ids:
            embedded = request.getfixturevalue("embedded")
            eos = set(embedded.cfg.eos_token_ids) | {tok.eos_token_id}
            want, gaps = greedy_reference(embedded, chat_ids(tok, s.question), TOKENS, eos)
            assert_matches_greedy(got, want, gaps)
            assert_matches_greedy(ids, want, gaps)
        print(
            f"{what}: client {k}: {len(got)} tokens, same text as uninterrupted: {s.text == text}, resumed "
            f"{s.meshd['resumed']}x, longest pause between chunks {s.pause:.2f} s (originator's paused_seconds "
            f"{s.meshd['paused_seconds']:.2f})"
        )


def test_sigkill_a_stage_every_request_resumes_then_the_stage_grows_back(tmp_path, request, embedded_tokenizer):
    with Mesh(tmp_path, 3) as mesh:
        plan = mesh.wait_plan([0, 1, 2], 3, timeout=120)
        victim, origins = middle_stage(mesh, plan)
        runs = uninterrupted(mesh, origins[0], QUESTIONS, TOKENS)
        streams, threads = start_streams(mesh, origins, QUESTIONS, TOKENS)
        mesh.kill(victim)
        t0 = time.monotonic()
        check_streams(streams, threads, runs, request, embedded_tokenizer, "SIGKILL")
        assert sum(s.meshd["resumed"] for s in streams) >= 1, "no request was in flight at the kill"
        print(f"SIGKILL: every request done {time.monotonic() - t0:.1f} s after the kill")
        mesh.wait_plan(origins, 2, timeout=30)

        # grow back: the stage restarts while 5 new requests run on the 2-stage ring
        streams, threads = start_streams(mesh, origins, QUESTIONS, TOKENS)
        mesh.restart(victim)
        t0 = time.monotonic()
        mesh.wait_plan([0, 1, 2], 3, timeout=GROW_BACK_BOUND)
        print(f"grow back: 3 stages again {time.monotonic() - t0:.1f} s after the restart")
        check_streams(streams, threads, runs, request, embedded_tokenizer, "grow back")

        # the originator's own death: its client's connection breaks, the stages free its sessions at once
        origin = origins[0]
        dead = mesh.node_id(origin)
        lone = Stream("Tell me a very long story about the sea.", mesh.ports[origin], 400)
        t = threading.Thread(target=lone.run, daemon=True)
        t.start()
        while not lone.times and lone.error is None:
            time.sleep(0.05)
        mesh.kill(origin)
        t.join(10)
        assert not t.is_alive() and lone.error is not None, "the client of a dead originator hangs"
        others = [i for i in range(3) if i != origin]
        deadline = time.monotonic() + 15  # the peer timeout (3 s) and a sweep; the session timeout is 300 s
        while time.monotonic() < deadline:
            if not any(http("GET", mesh.url(i) + "/mesh", timeout=5)[1]["stage"]["sessions"] for i in others):
                break
            time.sleep(0.2)
        sessions = [http("GET", mesh.url(i) + "/mesh", timeout=5)[1]["stage"] for i in others]
        assert not any(s and s["sessions"] for s in sessions), sessions
        # freed when its links closed (at once), before the mesh called it lost (the 3 s peer timeout)
        freed = f"originated by peer {dead} (its link closed)"
        logs = [(mesh.workdir / f"node{i}.log").read_text() for i in others]
        assert any(freed in text for text in logs), "no stage freed the dead originator's sessions"
        for text in logs:
            if freed in text and f"peer {dead} lost" in text:
                assert text.index(freed) < text.index(f"peer {dead} lost"), "freed only after the peer timeout"


def test_sigterm_a_stage_hands_its_layers_over_and_every_request_completes(tmp_path, request, embedded_tokenizer):
    """Graceful: the stage first hands its layers over (the others load wider slices while it still
    serves), so its requests pause only for their replay at the commit; then it leaves, and the
    plan that follows keeps every stage where it was (nobody waits for a peer timeout or a reload)."""
    with Mesh(tmp_path, 3, extra=extra_flags("term")) as mesh:
        plan = mesh.wait_plan([0, 1, 2], 3, timeout=120)
        victim, origins = middle_stage(mesh, plan)
        runs = uninterrupted(mesh, origins[0], QUESTIONS, TOKENS)
        gone = mesh.node_id(victim)
        streams, threads = start_streams(mesh, origins, QUESTIONS, TOKENS)
        mesh.terminate(victim)
        check_streams(streams, threads, runs, request, embedded_tokenizer, "SIGTERM")
        assert mesh.wait_exit(victim, 60) == 0
        log = (mesh.workdir / f"node{victim}.log").read_text()
        assert "handing this device's layers over" in log, "the stage left without handing over"
        after = mesh.wait_plan(origins, 2, timeout=30)
        assert gone not in [s["node_id"] for s in after["stages"]]


def test_partitioned_stage_every_request_resumes(tmp_path, request, embedded_tokenizer):
    with Mesh(tmp_path, 3, extra=extra_flags("cut")) as mesh:
        plan = mesh.wait_plan([0, 1, 2], 3, timeout=120)
        victim, origins = middle_stage(mesh, plan)
        runs = uninterrupted(mesh, origins[0], QUESTIONS, TOKENS)
        streams, threads = start_streams(mesh, origins, QUESTIONS, TOKENS)
        mesh.cut(victim)
        check_streams(streams, threads, runs, request, embedded_tokenizer, "partition")
        assert sum(s.meshd["resumed"] for s in streams) >= 1, "no request was in flight at the cut"
        assert mesh.procs[victim].poll() is None, "the partitioned daemon should live on"
