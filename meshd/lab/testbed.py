"""A mesh of real daemons on 127.0.0.1, for end-to-end tests and benchmarks.

Each daemon is a separate ``meshd serve`` process with its own state directory, started through
``python -m meshd.lab.emulate serve`` so benchmarks can add ``--device-slowdown`` and ``--link``
to its flags; they find each other through real mDNS (or a static peer list) under a random mesh name, so several
testbeds on one machine never join each other.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from peers.identity import NODE_ID_FILE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """One JSON request; HTTP errors come back as (status, body) instead of raising."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ids_placing(first: int, at: int, n: int) -> list[str]:
    """``n`` fresh node ids, one per daemon, such that daemon ``first`` sorts ``at``-th of them (from 0), the
    others in their own order: the planner puts stages in ring order (ascending node id), so where every
    daemon holds a stage, daemon ``first`` then holds stage ``at``."""
    if not (0 <= first < n and 0 <= at < n):
        raise ValueError(f"daemon {first} at stage {at}: a mesh of {n} daemons has daemons and stages 0..{n - 1}")
    ids = sorted(secrets.token_hex(8) for _ in range(n))
    mine = ids.pop(at)
    ids.insert(first, mine)
    return ids


class LoopbackMesh:
    """``n`` daemons; ``extra`` flags go to every one (e.g. ``--link 5ms/100mbit``), ``extra_for[i]`` to
    daemon ``i`` alone (e.g. ``--role originator``); ``node_ids``: each daemon's node id (default: each
    draws its own), which orders the ring (:func:`ids_placing`)."""

    def __init__(
        self,
        workdir: Path,
        n: int,
        *,
        mdns: bool = True,
        model: str = "default",
        dtype: str = "fp32",
        threads: int = 1,
        extra: list[str] | None = None,
        extra_for: dict[int, list[str]] | None = None,
        node_ids: list[str] | None = None,
    ):
        if node_ids is not None and len(node_ids) != n:
            raise ValueError(f"{len(node_ids)} node ids for {n} daemons")
        self.workdir = Path(workdir)
        self.name = f"testbed-{uuid.uuid4().hex[:8]}"
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen] = []
        self.cmds: list[list[str]] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i, port in enumerate(self.ports):
            cmd = [
                sys.executable,
                "-m",
                "meshd.lab.emulate",
                "serve",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--state-dir",
                str(self.workdir / f"node{i}"),
                "--mesh-name",
                self.name,
                "--model",
                model,
                "--dtype",
                dtype,
                "--threads",
                str(threads),
                "--log-level",
                "info",
                *(extra or []),
                *(extra_for or {}).get(i, []),
            ]
            if mdns:
                cmd += ["--interface", "127.0.0.1"]
            else:
                cmd += ["--no-mdns"] + [a for p in self.ports if p != port for a in ("--peer", f"127.0.0.1:{p}")]
            self.workdir.mkdir(parents=True, exist_ok=True)
            if node_ids is not None:  # what the daemon reads at its first start instead of drawing one
                state = self.workdir / f"node{i}"
                state.mkdir(parents=True, exist_ok=True)
                (state / NODE_ID_FILE).write_text(node_ids[i] + "\n")
            self.cmds.append(cmd)
            self.procs.append(self._start(i, "w"))

    def _start(self, i: int, mode: str) -> subprocess.Popen:
        log = open(self.workdir / f"node{i}.log", mode)  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen(
            self.cmds[i], stdout=log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL
        )

    def restart(self, i: int) -> None:
        """Start daemon ``i`` again after :meth:`kill`: same flags, state directory and port; its log is appended."""
        self.procs[i] = self._start(i, "a")

    def log_tail(self, i: int, lines: int = 20) -> str:
        """The last ``lines`` of daemon ``i``'s log: an error quotes them, since a test's or a benchmark's
        work directory is often gone by the time someone reads the message."""
        try:
            return "\n".join((self.workdir / f"node{i}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(unreadable: {e})"

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def status(self, i: int) -> dict | None:
        try:
            return http("GET", self.url(i) + "/mesh", timeout=5)[1]
        except OSError:
            return None

    def plan(self, i: int) -> dict | None:
        st = self.status(i)
        return st.get("plan") if st else None

    def node_id(self, i: int) -> str:
        return self.status(i)["node_id"]

    def wait_plan(
        self,
        live: list[int],
        stages: int | range,
        timeout: float,
        progress: Callable[[str], None] | None = None,
    ) -> dict:
        """Until every live daemon reports the same committed plan with ``stages`` stages (a number, or a
        range of acceptable numbers) and is healthy. ``progress`` hears each daemon's state (its ``/health``
        reason) whenever it changes."""
        deadline, t0 = time.monotonic() + timeout, time.monotonic()
        said: dict[int, str] = {}

        def report() -> None:
            if progress is None:
                return
            for i in live:
                state = self._state(i)
                if said.get(i) != state:
                    said[i] = state
                    progress(f"  daemon {i} ({time.monotonic() - t0:.0f} s): {state}")

        while time.monotonic() < deadline:
            report()
            for i in live:
                if self.procs[i].poll() is not None:
                    raise RuntimeError(
                        f"daemon {i} exited with {self.procs[i].returncode}; see {self.workdir / f'node{i}.log'}, "
                        f"which ends:\n{self.log_tail(i)}"
                    )
            plans = [self.plan(i) for i in live]
            sizes = range(stages, stages + 1) if isinstance(stages, int) else stages
            agreed = all(p and p["committed"] and len(p["stages"]) in sizes and p == plans[0] for p in plans)
            if agreed and all(http("GET", self.url(i) + "/health", timeout=5)[0] == 200 for i in live):
                report()  # a plan committed since this round's report: say each daemon is ready before returning
                return plans[0]
            time.sleep(0.5)
        raise TimeoutError(
            f"no common committed plan of {stages} stages within {timeout} s: {[self.plan(i) for i in live]}"
        )

    def _state(self, i: int) -> str:
        try:
            code, body = http("GET", self.url(i) + "/health", timeout=5)
        except OSError:
            return "starting (loading the model before its API opens)"
        return "ready" if code == 200 else str(body.get("reason") or f"/health answered {code}")

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10)

    def terminate(self, i: int) -> None:
        """SIGTERM: daemon ``i`` drains (``drain_timeout``) and leaves; returns at once, see :meth:`wait_exit`."""
        self.procs[i].send_signal(signal.SIGTERM)

    def wait_exit(self, i: int, timeout: float) -> int:
        return self.procs[i].wait(timeout)

    def cut(self, i: int) -> None:
        """Cut daemon ``i``'s links while it lives on (needs ``--partitionable`` in ``extra``)."""
        self.procs[i].send_signal(signal.SIGUSR1)

    def heal(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGUSR2)

    def stage_index(self, i: int, plan: dict) -> int | None:
        """Daemon ``i``'s stage in ``plan`` (None: it holds no layers)."""
        node = self.node_id(i)
        return next((k for k, s in enumerate(plan["stages"]) if s["node_id"] == node), None)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def __enter__(self) -> LoopbackMesh:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
