"""Three ``python -m peers`` processes on 127.0.0.1: real mDNS, real websockets, a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/mesh", timeout=1) as r:
            return json.load(r)
    except OSError:
        return None


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs, self.logs = tmp, {}, {}
        self.dead: set[int] = set()  # ports killed on purpose
        self.mesh = f"test-{uuid.uuid4().hex[:10]}"  # parallel runs never see each other

    def start(self, port: int, *args: str) -> None:
        log = self.tmp / f"{port}.log"
        cmd = [sys.executable, "-m", "peers", "--port", str(port), "--state-dir", str(self.tmp / f"state-{port}"),
               "--interface", "127.0.0.1", "--mesh-name", self.mesh, "--memory", "1GiB", "--layers", "30",
               "--heartbeat", "0.5", "--peer-timeout", "2", "--debounce", "0.5", *args]  # fmt: skip
        self.logs[port] = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs[port] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)

    def explain(self) -> str:
        return "\n".join(f"--- {port}\n{log.read_text()[-3000:]}" for port, log in self.logs.items())

    def wait(self, what: str, condition, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if condition():
                return time.monotonic() - start
            for port, p in self.procs.items():
                assert p.poll() is None or port in self.dead, f"{port} exited with {p.returncode}\n{self.explain()}"
            time.sleep(0.2)
        pytest.fail(f"{what} not within {timeout} s\n{self.explain()}")


def agreement(ports: list[int]) -> dict | None:
    """The plan all of them share, committed, with exactly these members; None otherwise."""
    views = [status(p) for p in ports]
    if not all(v and v["plan"] and v["plan"]["committed"] for v in views):
        return None
    plans = {json.dumps(v["plan"], sort_keys=True) for v in views}
    ids = sorted(v["node_id"] for v in views)
    plan = views[0]["plan"]
    return plan if len(plans) == 1 and plan["members"] == ids else None


def sees_all(ports: list[int]) -> bool:
    views = [status(p) for p in ports]
    return all(v and len(v["peers"]) == len(ports) - 1 for v in views)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.kill_all()


def run_scenario(cluster: Cluster, ports: list[int], capsys, label: str) -> None:
    t0 = time.monotonic()
    cluster.wait("all three serving GET /mesh", lambda: all(status(p) for p in ports), 20)
    up = time.monotonic() - t0
    found = cluster.wait("discovery of all peers", lambda: sees_all(ports), 10)
    cluster.wait("one committed plan", lambda: agreement(ports), 10)
    plan = agreement(ports)
    total = time.monotonic() - t0
    assert [s["first_layer"] for s in plan["stages"]] == [0, 10, 20] and plan["stages"][-1]["stop_layer"] == 30

    # Kill the proposer (lowest node id) outright: the survivors must notice, elect, and re-plan.
    victim = min(ports, key=lambda p: status(p)["node_id"])
    cluster.procs[victim].send_signal(signal.SIGKILL)
    cluster.dead.add(victim)
    survivors = [p for p in ports if p != victim]
    t_kill = time.monotonic()
    cluster.wait("a new plan among the survivors", lambda: agreement(survivors), 15)
    replan = time.monotonic() - t_kill
    new = agreement(survivors)
    assert new["epoch"] > plan["epoch"] and [s["stop_layer"] for s in new["stages"]] == [15, 30]

    for p in survivors:  # SIGTERM is a clean exit
        cluster.procs[p].send_signal(signal.SIGTERM)
    for p in survivors:
        assert cluster.procs[p].wait(timeout=10) == 0, cluster.explain()
    with capsys.disabled():
        print(f"\n[measure] {label}: processes up {up:.1f} s, all found {found:.1f} s later, "
              f"start->committed plan {total:.1f} s; SIGKILL -> new plan {replan:.1f} s")  # fmt: skip


def test_three_processes_mdns(cluster, capsys):
    ports = free_ports(4)
    for p in ports[:3]:
        cluster.start(p)
    cluster.start(ports[3], "--fingerprint", "some-other-model")  # advertised, but must be ignored
    run_scenario(cluster, ports[:3], capsys, "mDNS")
    assert (
        "ignoring" in cluster.logs[ports[0]].read_text() and "model fingerprint" in cluster.logs[ports[0]].read_text()
    )
    assert status(ports[3])["peers"] == []


def test_three_processes_static_peers(cluster, capsys):
    ports = free_ports(3)
    for p in ports:
        cluster.start(p, "--no-mdns", *[a for q in ports if q != p for a in ("--peer", f"127.0.0.1:{q}")])
    run_scenario(cluster, ports, capsys, "static")
    assert "mDNS" not in cluster.logs[ports[0]].read_text()
