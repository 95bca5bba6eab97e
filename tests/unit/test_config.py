"""``meshd serve`` configuration: precedence, types, errors that name the key and the file, and the
example file shipped in systemd/ staying complete and valid."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from meshd.cli import build_parser, main
from meshd.config import FIELDS, Config, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "meshd.toml.example"
ENV_EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "meshd.env.example"


def flags(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_defaults_without_any_source(tmp_path):
    cfg = load_config(flags(), env={"HOME": str(tmp_path)})
    assert (cfg.port, cfg.host, cfg.model, cfg.mdns, cfg.peers, cfg.api_key) == (
        8090,
        "0.0.0.0",
        "default",
        True,
        [],
        None,
    )
    assert cfg.state_dir == tmp_path / ".local" / "state" / "meshd" and cfg.config is None


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text(
        'port = 9001\nthreads = 2\nmodel = "/opt/models/a.gguf"\npeers = ["10.0.0.2:8090"]\n'
        "mdns = false\nsession_timeout = 5\n"
    )
    env = {
        "MESHD_PORT": "9002",
        "MESHD_THREADS": "3",
        "MESHD_PEERS": "10.0.0.3:8090, 10.0.0.4:8091",
        "HOME": str(tmp_path),
    }
    cfg = load_config(flags("--config", str(f), "--port", "9003"), env=env)
    assert cfg.port == 9003  # flag
    assert cfg.threads == 3  # env beats file
    assert cfg.peers == ["10.0.0.3:8090", "10.0.0.4:8091"]
    assert cfg.model == "/opt/models/a.gguf" and cfg.mdns is False  # file beats defaults
    assert cfg.session_timeout == 5.0 and isinstance(cfg.session_timeout, float)
    assert cfg.config == f
    cfg = load_config(flags("--config", str(f), "--mdns", "--peer", "h:1", "--peer", "h:2"), env=env)
    assert cfg.mdns is True and cfg.peers == ["h:1", "h:2"]


def test_default_file_in_xdg_config_home_and_state_directory(tmp_path):
    (tmp_path / "meshd").mkdir()
    (tmp_path / "meshd" / "meshd.toml").write_text('mesh_name = "lab"\n')
    cfg = load_config(flags(), env={"XDG_CONFIG_HOME": str(tmp_path), "STATE_DIRECTORY": "/var/lib/meshd"})
    assert cfg.mesh_name == "lab" and cfg.config == tmp_path / "meshd" / "meshd.toml"
    assert cfg.state_dir == Path("/var/lib/meshd")
    cfg = load_config(flags("--state-dir", str(tmp_path / "s")), env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert cfg.state_dir == tmp_path / "s"


def test_env_config_path_and_bools(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("port = 1234\n")
    cfg = load_config(flags(), env={"MESHD_CONFIG": str(f), "MESHD_MDNS": "off", "MESHD_API_KEY": "k"})
    assert (cfg.port, cfg.mdns, cfg.api_key) == (1234, False, "k")
    assert cfg.redacted()["api_key"] == "***" and cfg.redacted()["mesh_secret"] is None


def test_verbose_flag_means_debug(tmp_path):
    ns = build_parser().parse_args(["-v", "serve"])
    assert load_config(ns, env={"HOME": str(tmp_path)}).log_level == "debug"


@pytest.mark.parametrize(
    "toml,needle",
    [
        ('port = "8090"\n', "port must be an integer"),
        ("port = 70000\n", "port = 70000 is out of range"),
        ("mdns = 1\n", "mdns must be true or false"),
        ('peers = "a:1"\n', "peers must be an array of strings"),
        ('peers = ["nohostport"]\n', "peers: peer 'nohostport' is not host:port"),
        ('dtype = "fp8"\n', "dtype = 'fp8' is not one of auto, fp32, bf16, fp16"),
        ('memory = "lots"\n', "memory: cannot read size 'lots'"),
        ("prot = 8090\n", "unknown setting 'prot' (did you mean 'port'?)"),
        ("[network]\nport = 1\n", "settings are top-level keys"),
        ("port = \n", "not valid TOML"),
        ('config = "/x"\n', "unknown setting 'config'"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, toml, needle):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_config(flags("--config", str(f)), env={})
    assert needle in str(exc.value) and str(f) in str(exc.value)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"MESHD_PORT": "eighty"}, "environment variable MESHD_PORT: cannot read port from 'eighty'"),
        ({"MESHD_MDNS": "maybe"}, "MESHD_MDNS: cannot read mdns"),
        ({"MESHD_THREADS": "0"}, "MESHD_THREADS: threads = 0 is out of range"),
        ({"MESHD_LOG_LEVEL": "loud"}, "MESHD_LOG_LEVEL: log_level = 'loud' is not one of"),
    ],
)
def test_env_errors_name_the_variable(tmp_path, env, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(flags(), env={"HOME": str(tmp_path), **env})


def test_flag_errors_and_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match=r"flag --port: port = 0 is out of range"):
        load_config(flags("--port", "0"), env={"HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(flags("--config", str(tmp_path / "nope.toml")), env={})


def test_cli_reports_config_errors_cleanly(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("threads = -1\n")
    assert main(["serve", "--config", str(f)]) == 2
    assert f"meshd: error: {f}: threads = -1 is out of range" in capsys.readouterr().err


def test_example_file_lists_every_key_and_parses(tmp_path):
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^# (\w+) = ", text, re.M))
    settable = {n for n, f in FIELDS.items() if f.metadata.get("file", True)}
    assert keys == settable
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M))
    cfg = load_config(flags("--config", str(uncommented)), env={})
    assert cfg.peers == ["192.168.1.21:8090", "192.168.1.22:8090"] and cfg.memory == "2GiB"
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"#?MESHD_(\w+)=", line)
        if m:
            assert m.group(1).lower() in FIELDS, line


def test_every_setting_has_a_flag_and_help():
    helptext = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(Config):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in helptext and f.metadata["help"]


def test_served_name_and_aliases_from_flags_env_and_file(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('served_name = "smol"\naliases = ["a", "b:1"]\n')
    cfg = load_config(flags("--config", str(f)), env={})
    assert (cfg.served_name, cfg.aliases) == ("smol", ["a", "b:1"])
    cfg = load_config(flags("--served-name", "x", "--alias", "y", "--alias", "z"), env={"MESHD_ALIASES": "p,q"})
    assert (cfg.served_name, cfg.aliases) == ("x", ["y", "z"])
    assert load_config(flags(), env={"MESHD_ALIASES": "p, q", "HOME": str(tmp_path)}).aliases == ["p", "q"]
    with pytest.raises(ConfigError, match="served_name: model name ' ' must be non-empty"):
        load_config(flags("--served-name", " "), env={})
