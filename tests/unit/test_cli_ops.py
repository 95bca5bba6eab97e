"""Operating meshd: ``--version`` (and in the peer hello, shown by ``meshd status``), journald-friendly log
lines, the access log, the client commands reading ``meshd serve``'s settings, Hugging Face repo ids
resolved from the local cache only, and progress while layers load."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshd import __version__, config, logs
from meshd.client import daemon_settings
from meshd.client.statusview import render
from meshd.serve.api import create_app
from meshd.serve.daemon import ACCESS_FORMAT
from meshd.serve.loading import ProgressReader, load_layers
from models.config import ModelError
from models.ranges import LayerRange
from models.source import ModelSource, hf_hub_cache
from models.stage import Stage
from peers.hello import Hello, software_version

ROOT = Path(__file__).resolve().parents[2]


def _meshd(*argv: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshd.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=60,
        **kw,
    )


# ---- version ------------------------------------------------------------------------------
def test_version_flag():
    out = _meshd("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"meshd {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)


def test_hello_carries_the_version_and_accepts_peers_without_it():
    hello = Hello("n1", "i1", 1.0, "mesh", "fp", 1 << 30)
    assert hello.version == software_version() == __version__
    assert Hello.from_wire(hello.to_wire()) == hello
    old = {k: v for k, v in hello.to_wire().items() if k != "version"}  # a peer from before the field
    assert Hello.from_wire(old).version == ""  # unknown, not ours
    with pytest.raises(ValueError):
        Hello.from_wire({**hello.to_wire(), "version": 3})
    with pytest.raises(ValueError):
        Hello.from_wire({**hello.to_wire(), "surprise": 1})


def test_status_shows_each_versions():
    status = {
        "node_id": "aaaa",
        "version": "0.1.0",
        "ready": True,
        "peers": [{"node_id": "bbbb", "address": "10.0.0.2:8090", "memory_budget": 1 << 30, "version": "0.0.9"}],
    }
    text = render("http://x", status)
    assert "meshd 0.1.0" in text.splitlines()[0]
    assert re.search(r"bbbb\s+10\.0\.0\.2:8090\s+.*0\.0\.9", text), text


# ---- logging ------------------------------------------------------------------------------
LOG_SCRIPT = """
import logging, sys
from meshd import logs
logs.configure("info")
log = logging.getLogger("meshd")
log.info("plain news")
log.warning("NO MESH SECRET CONFIGURED")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("compute step failed")
"""

JOURNAL_LINE = re.compile(r"^<(\d)>(.*)$")


def _journal_entries(text: str) -> list[tuple[int, str]]:
    """Split stderr as journald does with SyslogLevelPrefix=yes: ``<N>`` sets the line's priority
    (without one a line is logged at the unit's default, info)."""
    out = []
    for line in text.splitlines():
        m = JOURNAL_LINE.match(line)
        out.append((int(m.group(1)), m.group(2)) if m else (6, line))
    return out


def test_under_systemd_warnings_carry_the_warning_priority_and_no_timestamp(tmp_path):
    err = tmp_path / "stderr"
    with open(err, "w") as fh:
        st = os.fstat(fh.fileno())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", LOG_SCRIPT], stderr=fh, env=env, check=True, timeout=60)
    entries = _journal_entries(err.read_text())
    assert (4, "meshd: NO MESH SECRET CONFIGURED") in entries  # `journalctl -p warning` shows it
    assert (6, "meshd: plain news") in entries
    error = [e for e in entries if e[0] == 3]
    assert error[0][1] == "meshd: compute step failed" and any("ZeroDivisionError" in t for _, t in error)
    assert len(error) == len(entries) - 2  # every traceback line keeps the error priority
    assert not any(re.match(r"\d{4}-\d\d-\d\d", t) for _, t in entries)  # the journal has the time


def test_outside_systemd_lines_have_time_and_level(tmp_path):
    err = tmp_path / "stderr"
    with open(err, "w") as fh:  # JOURNAL_STREAM inherited by a process whose stderr was redirected since
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": "1:2"}
        subprocess.run([sys.executable, "-c", LOG_SCRIPT], stderr=fh, env=env, check=True, timeout=60)
    first = err.read_text().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO meshd: plain news$", first), first


def test_syslog_priorities():
    assert [logs.syslog_priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


async def test_access_log_lines(rt, caplog):
    app = create_app(rt)
    runner = web.AppRunner(app, access_log=logging.getLogger("meshd.access"), access_log_format=ACCESS_FORMAT)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        with caplog.at_level(logging.INFO, logger="meshd.access"):
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "meshd.access"]
    assert len(lines) == 1 and re.fullmatch(
        r'127\.0\.0\.1 "GET /health HTTP/1\.1" 200 \d+ [\d.]+ "Python/.*"', lines[0]
    )


def test_access_log_setting():
    assert config.load_config(None, env={}).access_log is False
    assert config.load_config(None, env={"MESHD_ACCESS_LOG": "yes"}).access_log is True
    ns = argparse.ArgumentParser()
    config.add_arguments(ns)
    assert config.load_config(ns.parse_args(["--access-log"]), env={}).access_log is True


# ---- client commands read serve's settings --------------------------------------------------
def test_client_commands_use_serves_config_file(tmp_path, monkeypatch):
    monkeypatch.setattr("meshd.client.SYSTEM_CONFIG", tmp_path / "absent.toml")  # whatever this host has
    toml = tmp_path / "meshd.toml"
    toml.write_text('port = 8123\napi_key = "from-file"\n')
    env = {"HOME": str(tmp_path)}
    assert daemon_settings(None, None, toml, env) == ("http://127.0.0.1:8123", "from-file")
    assert daemon_settings(None, None, None, {**env, "MESHD_CONFIG": str(toml)}) == (
        "http://127.0.0.1:8123",
        "from-file",
    )
    # the environment overrides the file, flags override both, as for `meshd serve`
    assert daemon_settings(None, None, toml, {**env, "MESHD_API_KEY": "env", "MESHD_PORT": "9000"}) == (
        "http://127.0.0.1:9000",
        "env",
    )
    assert daemon_settings("http://h:1", "flag", toml, {**env, "MESHD_PEER": "http://p:2"}) == ("http://h:1", "flag")
    assert daemon_settings(None, None, toml, {**env, "MESHD_PEER": "http://p:2"}) == ("http://p:2", "from-file")
    toml.write_text('host = "192.168.1.5"\n')
    assert daemon_settings(None, None, toml, env) == ("http://192.168.1.5:8090", None)
    assert daemon_settings(None, None, None, env) == ("http://127.0.0.1:8090", None)  # no file: the default


def test_client_commands_fall_back_to_the_services_config(tmp_path, monkeypatch):
    system = tmp_path / "etc-meshd.toml"
    system.write_text("port = 8777\n")
    monkeypatch.setattr("meshd.client.SYSTEM_CONFIG", system)
    env = {"HOME": str(tmp_path)}
    assert daemon_settings(None, None, None, env) == ("http://127.0.0.1:8777", None)
    user = tmp_path / ".config" / "meshd" / "meshd.toml"
    user.parent.mkdir(parents=True)
    user.write_text("port = 8666\n")  # the user's own file comes first, as for `meshd serve`
    assert daemon_settings(None, None, None, env) == ("http://127.0.0.1:8666", None)


def test_client_command_reads_the_config_end_to_end(tmp_path):
    """`meshd status --config` talks to the port the file names (nothing listens: the error names it)."""
    toml = tmp_path / "meshd.toml"
    toml.write_text("port = 1\n")
    out = _meshd("status", "--config", str(toml), env={"HOME": str(tmp_path)})
    assert out.returncode == 1 and "http://127.0.0.1:1" in out.stderr, out.stderr
    toml.write_text("prot = 1\n")
    out = _meshd("status", "--config", str(toml), env={"HOME": str(tmp_path)})
    assert out.returncode == 2 and "did you mean 'port'" in out.stderr, out.stderr


# ---- Hugging Face repo ids from the local cache -----------------------------------------------
def _cache_repo(cache: Path, repo: str, files_from: Path, rev: str = "0123abcd") -> Path:
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return snap


def test_hf_repo_id_resolves_from_the_local_cache(tmp_path, tiny_dir, monkeypatch):
    cache = tmp_path / "hub"
    snap = _cache_repo(cache, "someone/tiny-llama", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    src = ModelSource.resolve("someone/tiny-llama")
    assert src.path == snap and src.kind == "safetensors" and src.name == "tiny-llama"
    assert src.config.n_layers == 4
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache .* never downloads.*huggingface-cli"):
        ModelSource.resolve("someone/absent-model")


def test_hf_cache_location_follows_huggingface_variables(tmp_path):
    assert hf_hub_cache({"HF_HUB_CACHE": "/a"}) == Path("/a")
    assert hf_hub_cache({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hf_hub_cache({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hf_hub_cache({"HOME": "/home/u"}) == Path("/home/u/.cache/huggingface/hub")


# ---- progress while loading -----------------------------------------------------------------
def test_layers_report_progress_while_loading(tiny_dir, caplog, monkeypatch):
    src = ModelSource.resolve(tiny_dir)
    seen: list[int] = []
    stage = Stage.load(src, LayerRange(1, 4), vocab=False, reader=ProgressReader(src, on_layer=seen.append))
    assert seen == [1, 2, 3] and stage.n_layers == 3
    monkeypatch.setattr("meshd.serve.loading.PROGRESS_EVERY_S", 0.0)  # report every layer
    with caplog.at_level(logging.INFO, logger="meshd"):
        load_layers(src, LayerRange(0, 4), stage.dtype, stage.weights, "loading layers 0:4")
    msgs = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in msgs[:4]] == [f"loading layers 0:4: layer {i} of 4" for i in range(1, 5)]
    assert re.fullmatch(r"loading layers 0:4: 4 layers in [\d.]+ s", msgs[-1])
