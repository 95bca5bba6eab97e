"""The systemd unit passes ``systemd-analyze verify`` without a single warning, and keeps the
properties the daemon relies on (notify readiness, netlink for zeroconf, no W^X ban for torch)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
EXEC = "/opt/meshd/.venv/bin/meshd"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_verifies_without_warnings(tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, (
        "systemd-analyze is missing: install systemd (`apt-get install systemd`); "
        "`make test` does it by itself when run as root"
    )
    meshd = Path(sys.executable).with_name("meshd")
    assert meshd.is_file(), f"{meshd} missing: install the package (make venv)"
    unit = (SYSTEMD / "meshd.service").read_text()
    assert f"ExecStart={EXEC} serve --config /etc/meshd/meshd.toml" in unit
    (tmp_path / "meshd.service").write_text(unit.replace(EXEC, str(meshd)))
    res = subprocess.run([tool, "verify", str(tmp_path / "meshd.service")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", (
        f"systemd-analyze verify (rc {res.returncode}):\n{res.stdout}{res.stderr}"
    )


def test_unit_properties():
    d = directives((SYSTEMD / "meshd.service").read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert d.get("DynamicUser") == ["yes"] or "User" in d
    assert d["StateDirectory"] == ["meshd"]
    assert d["EnvironmentFile"] == ["-/etc/meshd/meshd.env"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "MemoryDenyWriteExecute" not in d  # torch JIT-compiles kernels
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
