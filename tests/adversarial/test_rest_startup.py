"""What ``meshd serve`` refuses or warns about before it serves: exposed APIs, loose secrets; and its watchdog.

Before: the README put the mesh secret on the command line (visible in ps and shell history), a
secret could sit in a world-readable file, a daemon listening on 0.0.0.0 with no API key said
nothing, and a daemon whose torch thread was stuck still looked healthy to systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from meshd.config import ConfigError, load_config, with_secret_files
from meshd.serve import notify
from meshd.serve.daemon import Daemon
from meshd.serve.guard import exposure_warning

GOOD = "k3Yq2m7cUhR0vW9x4sTzA1bC"  # 24 bytes


def secret_file(tmp_path, text: str, mode: int):
    path = tmp_path / "secret"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("key", ["mesh_secret", "api_key"])
def test_secret_files_must_be_private_and_long_enough(tmp_path, key):
    env = {f"MESHD_{key.upper()}_FILE": str(secret_file(tmp_path, GOOD, 0o600))}
    assert getattr(with_secret_files(load_config(env=env, path=None)), key) == GOOD
    for mode in (0o640, 0o604, 0o644):
        os.chmod(env[f"MESHD_{key.upper()}_FILE"], mode)
        with pytest.raises(ConfigError, match=r"readable by others .* chmod 600"):
            with_secret_files(load_config(env=env))
    short = secret_file(tmp_path, "hunter2", 0o600)
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        with_secret_files(load_config(env={f"MESHD_{key.upper()}_FILE": str(short)}))
    with pytest.raises(ConfigError, match="cannot read"):
        with_secret_files(load_config(env={f"MESHD_{key.upper()}_FILE": str(tmp_path / "missing")}))
    both = {**env, f"MESHD_{key.upper()}": GOOD}
    os.chmod(env[f"MESHD_{key.upper()}_FILE"], 0o600)
    with pytest.raises(ConfigError, match="not both"):
        with_secret_files(load_config(env=both))
    assert load_config(env=env).redacted()[key] is None  # the file's content is read only at start-up


def test_listening_beyond_loopback_without_a_key_is_warned_about():
    for host in ("0.0.0.0", "::", "192.168.1.20", "meshd.lan"):
        warning = exposure_warning(host, None)
        assert warning is not None and "no API key" in warning and "--api-key-file" in warning
    for host, key in (("127.0.0.1", None), ("::1", None), ("localhost", None), ("0.0.0.0", GOOD)):
        assert exposure_warning(host, key) is None


async def test_the_watchdog_pings_only_while_the_torch_thread_answers(tmp_path, monkeypatch):
    sock_path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == pytest.approx(0.5)  # never below half a second

    stuck = threading.Event()

    class Runtime:
        async def ping_torch(self) -> None:
            await asyncio.to_thread(stuck.wait)

    daemon = Daemon.__new__(Daemon)
    daemon.runtime = Runtime()
    stuck.set()  # the torch thread answers
    task = asyncio.ensure_future(daemon._watchdog())
    await asyncio.sleep(1.2)
    pings = _received(server)
    assert pings.count(b"WATCHDOG=1") >= 2
    stuck.clear()  # now it is stuck for good
    await asyncio.sleep(1.2)
    _received(server)
    await asyncio.sleep(1.2)
    assert _received(server) == []  # no pings: systemd will restart the daemon after WatchdogSec
    task.cancel()
    stuck.set()
    server.close()


def _received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out
