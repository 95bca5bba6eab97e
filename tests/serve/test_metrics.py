"""``/metrics`` from prometheus_client: latency histograms, token and draft counters, build and process
information, against the faked runtime; and from three real daemons after a few requests."""

from __future__ import annotations

import asyncio
import itertools
import re

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd import __version__
from meshd.lab.testbed import LoopbackMesh, http
from meshd.serve.metrics import Metrics


async def _scrape(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        return {f.name: f for f in text_string_to_metric_families(await r.text())}


def _value(families: dict, family: str, sample: str, **labels: str) -> float:
    return next(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _buckets(families: dict, family: str) -> list[tuple[float, float]]:
    return sorted((float(s.labels["le"]), s.value) for s in families[family].samples if s.name.endswith("_bucket"))


async def test_latency_histograms_and_token_counters(rt, url):
    rt.delay, rt.chunk = 0.02, 3  # three tokens every 20 ms: inter-token latency ~7 ms a token
    n_reply = len(rt.reply_ids)
    async with aiohttp.ClientSession() as s:
        for stream in (False, True, False):
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
    m = await _scrape(url)
    assert m["meshd_time_to_first_token_seconds"].type == "histogram"
    assert _value(m, "meshd_time_to_first_token_seconds", "meshd_time_to_first_token_seconds_count") == 3
    assert _value(m, "meshd_request_duration_seconds", "meshd_request_duration_seconds_count") == 3
    # every token but each request's first chunk is an inter-token observation
    itl_count = _value(m, "meshd_inter_token_latency_seconds", "meshd_inter_token_latency_seconds_count")
    assert itl_count == 3 * (n_reply - 3)
    itl_mean = _value(m, "meshd_inter_token_latency_seconds", "meshd_inter_token_latency_seconds_sum") / itl_count
    assert 0.02 / 3 * 0.9 < itl_mean < 0.5, itl_mean  # at least the faked pace (sleep never returns early)
    e2e_mean = _value(m, "meshd_request_duration_seconds", "meshd_request_duration_seconds_sum") / 3
    rounds = -(-n_reply // 3)
    assert rounds * 0.02 * 0.9 < e2e_mean < 30, e2e_mean
    ttft = _buckets(m, "meshd_time_to_first_token_seconds")
    assert ttft[-1] == (float("inf"), 3) and all(a[1] <= b[1] for a, b in itertools.pairwise(ttft))  # cumulative
    assert _value(m, "meshd_generated_tokens", "meshd_generated_tokens_total") == 3 * n_reply
    prompt = len(rt.submitted[0][0])
    assert _value(m, "meshd_prompt_tokens", "meshd_prompt_tokens_total") == 3 * prompt
    assert _value(m, "meshd_build_info", "meshd_build_info", version=__version__) == 1
    assert _value(m, "process_resident_memory_bytes", "process_resident_memory_bytes") > 1 << 20
    assert "python_info" in m


def test_request_timer_counts_a_request_once_and_splits_chunks_per_token():
    metrics = Metrics()
    t = metrics.request(prompt_tokens=5)
    t.chunk(2)
    t.chunk(0)  # an empty chunk is no token
    t.chunk(4)
    t.finish(draft_rows=12, accepted_rows=3)
    t.finish(draft_rows=12, accepted_rows=3)
    text = metrics.render({}).decode()
    fam = {f.name: f for f in text_string_to_metric_families(text)}
    assert _value(fam, "meshd_inter_token_latency_seconds", "meshd_inter_token_latency_seconds_count") == 4
    assert _value(fam, "meshd_time_to_first_token_seconds", "meshd_time_to_first_token_seconds_count") == 1
    assert _value(fam, "meshd_draft_rows", "meshd_draft_rows_total") == 12
    assert _value(fam, "meshd_accepted_rows", "meshd_accepted_rows_total") == 3
    assert _value(fam, "meshd_generated_tokens", "meshd_generated_tokens_total") == 6


def test_flat_engine_numbers_survive_odd_input():
    text = Metrics().render({"weird name!": 1, "x_total": {(("a", 'q"\n'),): 2}, "text": "nope", "d": {"k": None}})
    assert "meshd_weird_name_ 1.0" in text.decode()
    assert 'meshd_x_total{a="q\\"\\n"} 2.0' in text.decode()
    assert "meshd_text" not in text.decode() and "meshd_d " not in text.decode()


@pytest.mark.slow
async def test_three_daemons_metrics_after_a_load_run(tmp_path):
    """After requests through a real ring: sane latencies, drafting counted, each peer's link round trip
    and bytes measured on the mesh link itself."""
    with LoopbackMesh(tmp_path, 3) as mesh:
        said: list[str] = []  # what `meshd bench` and `meshd demo` print while the daemons start
        await asyncio.to_thread(mesh.wait_plan, [0, 1, 2], 3, 180, said.append)
        for i in range(3):
            states = [s.split(": ", 1)[1] for s in said if s.startswith(f"  daemon {i} (")]
            assert states[-1] == "ready" and len(states) >= 2, said  # never silent until ready
        url = mesh.url(1)
        body = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 24, "temperature": 0}
        generated = 0
        for mode in ("flow", "chunk", "ar"):
            code, reply = await asyncio.to_thread(http, "POST", url + "/v1/chat/completions", body | {"mode": mode})
            assert code == 200, reply
            generated += reply["usage"]["completion_tokens"]
        m = await _scrape(url)
        every = [await _scrape(mesh.url(i)) for i in range(3)]
        views = [(await asyncio.to_thread(http, "GET", mesh.url(i) + "/mesh"))[1] for i in range(3)]
    ids = [v["node_id"] for v in views]
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_duration_seconds"):
        fam = f"meshd_{name}"
        count = _value(m, fam, fam + "_count")
        mean = _value(m, fam, fam + "_sum") / count
        assert count >= 3 and 0 < mean < 60, (name, count, mean)
    assert _value(m, "meshd_generated_tokens", "meshd_generated_tokens_total") == generated
    drafts = _value(m, "meshd_draft_rows", "meshd_draft_rows_total")
    accepted = _value(m, "meshd_accepted_rows", "meshd_accepted_rows_total")
    assert 0 < accepted < drafts, (accepted, drafts)
    # Round trips measured on the mesh links (a websocket ping every heartbeat), per peer, in /metrics and /mesh.
    for i, fams in enumerate(every):
        others = set(ids) - {ids[i]}
        rtt = fams["meshd_peer_rtt_seconds"].samples
        counts = {s.labels["peer"]: s.value for s in rtt if s.name.endswith("_count")}
        sums = {s.labels["peer"]: s.value for s in rtt if s.name.endswith("_sum")}
        assert set(counts) == others and all(n >= 2 for n in counts.values()), counts
        assert all(0 < sums[p] / counts[p] < 1.0 for p in others), (sums, counts)  # loopback: well under a second
        listed = {p["node_id"]: p for p in views[i]["peers"]}
        assert set(listed) == others, listed
        assert all(0 < listed[p]["rtt_ms"] < 1000 for p in others), {p: listed[p]["rtt_ms"] for p in others}
        # Every frame's bytes on each link, both ways; the hidden states are part of them.
        link = {
            (s.labels["peer"], s.labels["direction"]): s.value
            for s in fams["meshd_peer_link_bytes"].samples
            if s.name.endswith("_total")
        }
        assert {p for p, _ in link} == others and all(v > 0 for v in link.values()), link
        hidden = fams.get("meshd_peer_activation_bytes")
        for s in hidden.samples if hidden else []:
            if s.name.endswith("_total"):
                assert s.value <= link[(s.labels["peer"], s.labels["direction"])], (s, link)
        for p in others:
            assert listed[p]["link_bytes"]["sent"] >= link[(p, "sent")] > 0  # /mesh was read after the scrape

    # Which stage daemon 1 holds depends on the plan (the last stage sends only token ids onward), so
    # the hidden-state bytes are checked over the whole mesh: every byte one daemon counts as sent,
    # its peer counts as received.
    def total(direction: str) -> float:
        return sum(
            s.value
            for fams in every
            if "meshd_peer_activation_bytes" in fams
            for s in fams["meshd_peer_activation_bytes"].samples
            if s.name.endswith("_total") and s.labels["direction"] == direction
        )

    assert total("sent") > 0 and total("sent") == total("received"), (total("sent"), total("received"))
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", _version(m))


def _version(m: dict) -> str:
    return next(s.labels["version"] for s in m["meshd_build_info"].samples)
