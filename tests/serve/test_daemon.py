"""One real ``meshd serve`` process under systemd's notify protocol: ready, status, a clean SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from http.client import HTTPConnection

import pytest

from meshd.lab.testbed import LoopbackMesh, http

pytestmark = pytest.mark.slow


def test_a_daemon_that_exits_is_reported_with_the_end_of_its_log(tmp_path):
    """The testbed's error quotes what the daemon said before it exited: its work directory is usually
    gone (a temporary one) by the time anyone reads a failed test or benchmark."""
    said = r"(?s)daemon 0 exited with \d+; see .*node0\.log, which ends:\n.*missing\.gguf"
    mesh = LoopbackMesh(tmp_path / "mesh", 1, mdns=False, model=str(tmp_path / "missing.gguf"))
    with mesh, pytest.raises(RuntimeError, match=said):
        mesh.wait_plan([0], 1, timeout=120)


def test_notify_ready_then_sigterm_fails_in_flight_request_and_exits_cleanly(tmp_path, monkeypatch):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)  # the testbed's daemons inherit this environment
    mesh = LoopbackMesh(tmp_path / "mesh", 1, mdns=False)
    proc, port = mesh.procs[0], mesh.ports[0]
    seen: list[str] = []

    def until(pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            with contextlib.suppress(TimeoutError):
                seen.extend(sock.recv(4096).decode().splitlines())
        return pred()

    try:
        assert until(lambda: "READY=1" in seen, 180), (seen, (tmp_path / "mesh" / "node0.log").read_text()[-2000:])
        status = [s for s in seen if s.startswith("STATUS=")]
        assert any("plan epoch" in s for s in status), status  # systemctl status shows the plan
        assert http("GET", mesh.url(0) + "/health")[0] == 200

        # a long streamed request is in flight when SIGTERM arrives: it must end with an error, not hang
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(
                {
                    "model": "SmolLM2-135M-Instruct.Q4_1",
                    "messages": [{"role": "user", "content": "Write a long story."}],
                    "max_tokens": 2000,
                    "temperature": 0,
                    "stream": True,
                }
            ),
            {"content-type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        events: list[str] = []
        reader = threading.Thread(
            target=lambda: events.extend(line.decode().strip() for line in iter(resp.fp.readline, b""))
        )
        for _ in range(4):
            resp.fp.readline()
        reader.start()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        reader.join(10)
        data = [e[len("data: ") :] for e in events if e.startswith("data: ")]
        assert data and data[-1] == "[DONE]", events[-5:]
        err = json.loads(data[-2])
        assert "shutting down" in err["error"]["message"], err
        assert until(lambda: "STOPPING=1" in seen, 5), seen
    finally:
        mesh.close()
        sock.close()
