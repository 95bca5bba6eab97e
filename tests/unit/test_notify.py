"""sd_notify over a real datagram socket: path and abstract addresses, no-op without systemd."""

from __future__ import annotations

import os
import socket

import pytest

from meshd.serve import notify


@pytest.fixture
def listener(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_ready_status_stopping_reach_the_socket(listener):
    assert notify.ready()
    assert listener.recv(4096) == b"READY=1"
    assert notify.status("serving; plan epoch 3:\n  a:0-14, b:15-29")
    assert listener.recv(4096) == b"STATUS=serving; plan epoch 3: a:0-14, b:15-29"
    assert notify.ready("up")
    assert listener.recv(4096) == b"READY=1\nSTATUS=up"
    assert notify.stopping() and listener.recv(4096) == b"STOPPING=1"


def test_abstract_namespace(monkeypatch):
    name = f"meshd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_op_without_systemd_and_survives_a_dead_socket(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False and notify.status("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.ready() is False  # logged, not raised
    assert "could not notify systemd" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify.ready() is False
