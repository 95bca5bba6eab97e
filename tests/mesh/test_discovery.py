"""What mDNS carries and which advertisements are ignored (the live browse is in test_peers_integration)."""

from __future__ import annotations

import logging

from peers.codec import PROTO_VERSION
from peers.discovery import Discovery, txt_record
from peers.hello import Hello

LOCAL = Hello(
    "aa11",
    "inst-a",
    0.0,
    "home",
    "fp-smollm2",
    3 << 30,
    compute_score=2.5,
    api_port=8090,
    cost_curve={1: 0.02, 64: 0.05},
)


def test_txt_record_has_the_small_part_and_no_cost_curve():
    txt = txt_record(LOCAL)
    assert txt == {
        "pv": str(PROTO_VERSION),
        "mesh": "home",
        "fp": "fp-smollm2",
        "id": "aa11",
        "inst": "inst-a",
        "mem": str(3 << 30),
        "cs": "2.5",
        "port": "8090",
    }
    assert all(isinstance(v, str) for v in txt.values())  # the curve travels in the handshake, never in TXT


def test_incompatible_or_incomplete_advertisements_are_named():
    d = Discovery(LOCAL, interface=None, on_found=lambda *a: None, on_removed=lambda n: None)
    good = txt_record(Hello("bb22", "inst-b", 0.0, "home", "fp-smollm2", 1 << 30, api_port=8091))
    assert d._problem(good, ["127.0.0.1"], 8091) is None
    assert "mesh name 'office'" in d._problem({**good, "mesh": "office"}, ["127.0.0.1"], 8091)
    assert "model fingerprint 'fp-other'" in d._problem({**good, "fp": "fp-other"}, ["127.0.0.1"], 8091)
    assert "protocol version 99" in d._problem({**good, "pv": "99"}, ["127.0.0.1"], 8091)
    assert "incomplete" in d._problem({k: v for k, v in good.items() if k != "id"}, ["127.0.0.1"], 8091)
    assert "incomplete" in d._problem(good, [], 8091)


async def test_an_ignored_peer_is_logged_once(caplog, monkeypatch):
    """A peer of another mesh re-announces every few seconds; its reason is logged the first time only."""
    found: list[str] = []
    d = Discovery(LOCAL, interface=None, on_found=lambda i, a, p: found.append(i), on_removed=lambda n: None)
    other = txt_record(Hello("cc33", "inst-c", 0.0, "office", "fp-smollm2", 1 << 30, api_port=8092))

    class Info:
        def __init__(self, *a):
            self.properties = {k.encode(): v.encode() for k, v in other.items()}
            self.port = 8092

        async def async_request(self, *a):
            return True

        def parsed_addresses(self, *a):
            return ["127.0.0.1"]

    class Zc:
        zeroconf = None

    monkeypatch.setattr("peers.discovery.AsyncServiceInfo", Info)
    d._zc = Zc()
    with caplog.at_level(logging.INFO, logger="peers.discovery"):
        for _ in range(3):
            await d._resolve("cc33._meshd._tcp.local.")
    assert found == []
    assert [r.getMessage() for r in caplog.records].count(
        "mDNS: ignoring cc33._meshd._tcp.local.: it has another mesh name 'office' (this daemon is in 'home')"
    ) == 1
