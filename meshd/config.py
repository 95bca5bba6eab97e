"""The daemon's one configuration: every setting, where it may come from, and its checks.

Precedence, highest first: command-line flags > ``MESHD_*`` environment variables > the TOML
file (``--config``, ``$MESHD_CONFIG``, else ``$XDG_CONFIG_HOME/meshd/meshd.toml`` when it exists)
> defaults. Each setting is declared once (``Config``'s fields and their metadata); the flags,
the environment names and the TOML keys are all derived from it, so they cannot drift apart.
Every value is type-checked and range-checked where it comes in, and errors name the key and
where it came from (the file, the variable, the flag), because a daemon that starts with a
silently wrong setting is worse than one that refuses to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.formats import WEIGHT_FORMATS, WEIGHTS_HELP
from peers.codec import WIRE_ACTIVATIONS, WIRE_ACTIVATIONS_HELP
from peers.planner import ROLES
from peers.sizes import parse_size

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "MESHD_"
DTYPES = ("auto", "fp32", "bf16", "fp16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MIN_SECRET_BYTES = 16


class ConfigError(ValueError):
    """A setting is wrong; the message names the key and where it came from."""


def _opt(help: str, *, flag: str | None = None, env: bool = True, secret: bool = False, **kw: Any) -> dict:
    return {"help": help, "flag": flag, "env": env, "secret": secret, **kw}


def default_state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """systemd's ``StateDirectory=`` when run as a service, else the XDG state directory."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "meshd"


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "meshd" / "meshd.toml"


@dataclass
class Config:
    """Every ``meshd serve`` setting. Field metadata drives flags, env names, TOML keys and checks."""

    # network
    host: str = field(default="0.0.0.0", metadata=_opt("address the API and mesh endpoint bind to", flag="--host"))
    port: int = field(default=8090, metadata=_opt("TCP port of the REST API and the mesh websocket", lo=1, hi=65535))
    peers: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "static peers as HOST:PORT (repeat the flag; in the environment, comma-separated), for networks "
            "without multicast",
            flag="--peer",
        ),
    )
    mdns: bool = field(default=True, metadata=_opt("find peers with mDNS (--no-mdns: static peers only)"))
    interface: str | None = field(
        default=None, metadata=_opt("IPv4 address of the interface mDNS should use (default: all)")
    )
    mesh_name: str = field(default="meshd", metadata=_opt("only peers with the same mesh name join each other"))
    mesh_secret: str | None = field(
        default=None,
        metadata=_opt("shared secret that authenticates peer links (every peer needs the same one)", secret=True),
    )
    api_key: str | None = field(
        default=None,
        metadata=_opt("require 'Authorization: Bearer KEY' on the REST API (/health stays open)", secret=True),
    )
    mesh_secret_file: Path | None = field(
        default=None,
        metadata=_opt("file holding the mesh secret (mode 600, at least 16 bytes): keeps it off the command line"),
    )
    api_key_file: Path | None = field(
        default=None, metadata=_opt("file holding the API key (mode 600, at least 16 bytes)")
    )
    max_body_bytes: int = field(default=1 << 20, metadata=_opt("largest accepted REST request body, in bytes", lo=1024))
    max_concurrent: int = field(
        default=8, metadata=_opt("generations the REST API runs at once; more wait in a queue", lo=1, hi=4096)
    )
    max_queued: int = field(
        default=32, metadata=_opt("generations that may wait for a slot; beyond, 429 + Retry-After", lo=0, hi=65536)
    )
    header_timeout: float = field(
        default=15.0,
        metadata=_opt("seconds a connection may take to send a request head, and may idle between requests", lo=1.0),
    )
    body_timeout: float = field(default=30.0, metadata=_opt("seconds a request body may take to arrive", lo=1.0))
    cors_origins: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "web origins (scheme://host:port, or *) whose pages may call the API from a browser; others are refused",
            flag="--cors-origin",
            metavar="ORIGIN",
        ),
    )
    allowed_hosts: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "host names the API answers to besides IP addresses, localhost and this machine's name (DNS rebinding "
            "guard)",
            flag="--allowed-host",
            metavar="NAME",
        ),
    )
    drain_timeout: float = field(
        default=20.0,
        metadata=_opt(
            "on SIGTERM, seconds in-flight requests get to finish before they fail (keep it under "
            "the unit's TimeoutStopSec)",
            lo=0.0,
            hi=3600.0,
        ),
    )
    # model and compute
    model: str = field(
        default="default",
        metadata=_opt(
            "GGUF file, HF safetensors directory, Hugging Face repo id already in the local cache (owner/name; "
            "never downloaded), or 'default' (the embedded SmolLM2-135M-Instruct)"
        ),
    )
    served_name: str | None = field(
        default=None,
        metadata=_opt("the name the API serves the model under (default: the model file's stem)", name=True),
    )
    aliases: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "other names requests may use for the model (repeat the flag; in the environment, comma-separated); "
            "the embedded default also answers to 'default'",
            flag="--alias",
            metavar="NAME",
            name=True,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_opt(
            "compute dtype (auto: bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA, else fp32)", choices=DTYPES
        ),
    )
    weights: str = field(default="auto", metadata=_opt(WEIGHTS_HELP, choices=WEIGHT_FORMATS))
    threads: int | None = field(default=None, metadata=_opt("torch threads (default: all cores)", lo=1, hi=1024))
    memory: str | None = field(
        default=None,
        metadata=_opt(
            "memory the whole daemon process may use, e.g. 2GiB: runtime, vocabulary ends, draft head, its layers "
            "and their KV cache (default: a share of MemAvailable)",
            size=True,
        ),
    )
    max_context: int = field(default=4096, metadata=_opt("longest prompt + completion, in tokens", lo=16, hi=1 << 20))
    session_timeout: float = field(
        default=300.0,
        metadata=_opt(
            "seconds a stage keeps a request's KV session without traffic before freeing it (its originator vanished)",
            lo=1.0,
            hi=86400.0,
        ),
    )
    flow_slots: int = field(
        default=0,
        metadata=_opt(
            "segments per flow request kept in flight (0, the default: as many as the ring's measured latency "
            "over its slowest step asks for; 1: one tree per round, the scheduler before slots, for comparison)",
            lo=0,
            hi=64,
        ),
    )
    flow_backoff: bool = field(
        default=True,
        metadata=_opt(
            "flow drafts only while its drafted trees yield more tokens a second than plain ones (the root alone, "
            "an ar token), timed per request; where drafts do not pay it sends plain trees and probes again later "
            "(--no-flow-backoff: every tree drafted, to measure a drafter's acceptance on the mesh)"
        ),
    )
    role: str = field(
        default="both",
        metadata=_opt(
            "what this device does in the mesh: both (holds layers and answers requests), stage (holds layers; "
            "the planner counts no originator work for it) or originator (holds no layers, answers requests "
            "through the others' stages, like FlowSpec's head device)",
            choices=ROLES,
        ),
    )
    contexts: int = field(
        default=2,
        metadata=_opt(
            "requests of max_context tokens whose KV each stage holds at once: the planner reserves memory for "
            "this many, and a stage refuses sessions beyond it",
            lo=1,
            hi=4096,
        ),
    )
    prefix_cache: bool = field(
        default=True,
        metadata=_opt(
            "keep finished requests' context KV at each stage, so a request that starts with it (a chat's next "
            "turn, a repeated system prompt) computes only the rest (--no-prefix-cache: off)"
        ),
    )
    prefix_cache_size: str = field(
        default="256MiB",
        metadata=_opt(
            "most memory each stage's kept prefixes may hold; they live inside the KV reserved for contexts x "
            "max_context and give way to live requests, so they never add to it",
            size=True,
        ),
    )
    sessions_per_peer: int = field(
        default=16,
        metadata=_opt("requests one peer may have open at a stage at once (a flood from one peer stops here)", lo=1),
    )
    stall_timeout: float = field(
        default=60.0,
        metadata=_opt(
            "seconds a request may wait for any answer from the ring before it fails with an error (a stage hung "
            "or dropped it)",
            lo=1.0,
            hi=86400.0,
        ),
    )
    resume_timeout: float = field(
        default=120.0,
        metadata=_opt(
            "seconds a request whose ring was lost (a stage died or was cut off) waits for a new plan; on the "
            "new plan it resumes where it stopped, after that it fails naming what the mesh lacks (0: fail at once)",
            lo=0.0,
            hi=86400.0,
        ),
    )
    wire_activations: str = field(default="auto", metadata=_opt(WIRE_ACTIVATIONS_HELP, choices=WIRE_ACTIVATIONS))
    drafter: str = field(
        default="auto",
        metadata=_opt(
            "drafter when this device originates a request: auto (the EAGLE head trained for the model, yours from "
            "`meshd train-draft` or the shipped one, with n-gram candidates; else ngram) | ngram | eagle[:DIR] | "
            "eagle+ngram | model:PATH[@LAYERS]"
        ),
    )
    # housekeeping
    state_dir: Path = field(
        default_factory=default_state_dir,
        metadata=_opt(
            "where this node keeps its identity and cached cost curves (default: $STATE_DIRECTORY, else "
            "$XDG_STATE_HOME/meshd)"
        ),
    )
    log_level: str = field(default="info", metadata=_opt("log level", choices=LOG_LEVELS))
    access_log: bool = field(
        default=False,
        metadata=_opt("log one line per HTTP request (logger meshd.access, level info; --no-access-log: none)"),
    )
    config: Path | None = field(
        default=None, metadata=_opt("TOML file read for settings not given as flags or MESHD_* variables", file=False)
    )

    def redacted(self) -> dict[str, Any]:
        """The settings for a log line, secrets masked."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and v else (str(v) if isinstance(v, Path) else v)
        return out


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


# ---- coercion and checks --------------------------------------------------------------------
def _kind(f: dataclasses.Field) -> str:
    t = str(f.type).replace(" ", "")
    for kind in ("list", "bool", "int", "float", "Path"):
        if t.startswith(kind) or t.startswith(kind + "|"):
            return kind
    return "str"


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def _check(f: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` already has the field's Python type; apply its range, choices and format checks."""
    md, name = f.metadata, f.name
    if value is None:
        return value
    if ("lo" in md and value < md["lo"]) or ("hi" in md and value > md["hi"]):
        raise ConfigError(f"{where}: {name} = {value!r} is out of range [{md.get('lo')}, {md.get('hi')}]")
    if "choices" in md and value not in md["choices"]:
        raise ConfigError(f"{where}: {name} = {value!r} is not one of {', '.join(md['choices'])}")
    if md.get("size"):
        try:
            parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {name}: {exc}") from None
    if md.get("name"):
        for n in value if isinstance(value, list) else [value]:
            if not n.strip() or n != n.strip():
                raise ConfigError(f"{where}: {name}: model name {n!r} must be non-empty, without surrounding spaces")
    if name == "peers":
        from peers.mesh import parse_host_port  # lazy: peers.mesh loads aiohttp, and `meshd --help` reads this module

        for p in value:
            try:
                parse_host_port(p)
            except ValueError as exc:
                raise ConfigError(f"{where}: peers: {exc}") from None
    return value


def _from_toml(f: dataclasses.Field, v: Any, where: str) -> Any:
    """A TOML value must already have the right type (TOML is typed; no string guessing here)."""
    kind = _kind(f)
    ok = {
        "bool": isinstance(v, bool),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "list": isinstance(v, list) and all(isinstance(x, str) for x in v),
        "Path": isinstance(v, str),
        "str": isinstance(v, str),
    }[kind]
    if not ok:
        want = {
            "list": "an array of strings",
            "Path": "a string (path)",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
        }[kind]
        raise ConfigError(f"{where}: {f.name} must be {want}, not {type(v).__name__} {v!r}")
    if kind == "float":
        v = float(v)
    elif kind == "Path":
        v = Path(v).expanduser()
    return _check(f, v, where)


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _from_string(f: dataclasses.Field, text: str, where: str) -> Any:
    """An environment variable: parse the string by the field's type."""
    kind = _kind(f)
    s = text.strip()
    if s == "" and _optional(f):
        return None
    try:
        if kind == "bool":
            if s.lower() not in _TRUE | _FALSE:
                raise ValueError("use true/false, yes/no, on/off or 1/0")
            v: Any = s.lower() in _TRUE
        elif kind == "int":
            v = int(s)
        elif kind == "float":
            v = float(s)
        elif kind == "list":
            v = [p for p in (x.strip() for x in s.replace(" ", ",").split(",")) if p]
        elif kind == "Path":
            v = Path(s).expanduser()
        else:
            v = s
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot read {f.name} from {text!r}: {exc}") from None
    return _check(f, v, where)


# ---- sources --------------------------------------------------------------------------------
def read_toml(path: Path) -> dict[str, Any]:
    """The file's settings, checked; a typo'd key is an error (with a suggestion), not ignored."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    out = {}
    for key, value in data.items():
        f = FIELDS.get(key)
        if f is None or f.metadata.get("file") is False:
            near = difflib.get_close_matches(key, [k for k, g in FIELDS.items() if g.metadata.get("file", True)], 1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            if isinstance(value, dict):
                hint += "; settings are top-level keys, not tables"
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
        out[key] = _from_toml(f, value, str(path))
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for name, f in FIELDS.items():
        if not f.metadata.get("env", True) or name == "config":
            continue
        var = env_name(name)
        if var in env:
            out[name] = _from_string(f, env[var], f"environment variable {var}")
    return out


def read_flags(ns: argparse.Namespace | None) -> dict[str, Any]:
    """Flags the user actually gave (``add_arguments`` leaves absent ones unset)."""
    if ns is None:
        return {}
    out = {}
    for name, f in FIELDS.items():
        v = getattr(ns, name, None)
        if v is None or (_kind(f) == "list" and v == []):
            continue
        if isinstance(v, str) and _kind(f) not in ("str", "Path"):
            v = _from_string(f, v, f"flag --{name.replace('_', '-')}")
        out[name] = _check(f, Path(v).expanduser() if _kind(f) == "Path" else v, f"flag {_flag(name, f)}")
    if getattr(ns, "verbose", 0) and "log_level" not in out:
        out["log_level"] = "debug"
    return out


def load_config(
    ns: argparse.Namespace | None = None, env: Mapping[str, str] | None = None, path: str | Path | None = None
) -> Config:
    """Merge defaults < TOML file < ``MESHD_*`` environment < flags into a checked ``Config``."""
    env = os.environ if env is None else env
    flags = read_flags(ns)
    explicit = path or flags.get("config") or env.get(ENV_PREFIX + "CONFIG") or None
    file_path = Path(explicit).expanduser() if explicit else default_config_path(env)
    from_file = read_toml(file_path) if explicit or file_path.is_file() else {}
    values: dict[str, Any] = {**from_file, **read_env(env), **flags}
    values["config"] = file_path if (explicit or file_path.is_file()) else None
    if "state_dir" not in values:
        values["state_dir"] = default_state_dir(env)
    return Config(**values)


def with_secret_files(cfg: Config) -> Config:
    """``cfg`` with ``mesh_secret`` and ``api_key`` read from their ``*_file`` settings (``meshd serve`` calls
    this once at start-up; reading secrets is not part of merging settings)."""
    out = dataclasses.replace(cfg)
    for key in ("mesh_secret", "api_key"):
        path = getattr(cfg, key + "_file")
        if path is not None:
            if getattr(cfg, key):
                raise ConfigError(f"give {key} or {key}_file, not both")
            setattr(out, key, read_secret(path, key.replace("_", " ")))
    return out


def read_secret(path: Path, what: str) -> str:
    """A secret from a file readable by its owner only, at least ``MIN_SECRET_BYTES`` long once stripped."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the {what} file {path} is readable by others (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
        )
    if len(text.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the {what} in {path} is shorter than {MIN_SECRET_BYTES} bytes; make one with: "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return text


# ---- argparse -------------------------------------------------------------------------------
def _flag(name: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``meshd serve``'s flags, one per setting; unset flags stay None so the file and env apply."""
    for name, f in FIELDS.items():
        md, kind = f.metadata, _kind(f)
        flag = _flag(name, f)
        env_note = f" [env {env_name(name)}]" if name != "config" else " [env MESHD_CONFIG]"
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default in (None, "") or md.get("secret") else f" (default: {default})"
        help = md["help"] + shown + env_note
        if kind == "bool":
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind == "list":
            metavar = md.get("metavar", "HOST:PORT")
            p.add_argument(flag, dest=name, action="append", default=None, metavar=metavar, help=help)
        else:
            conv: Callable[[str], Any] = {"int": int, "float": float, "Path": str}.get(kind, str)
            p.add_argument(
                flag,
                dest=name,
                type=conv,
                default=None,
                choices=md.get("choices"),
                metavar=name.upper() if "choices" not in md else None,
                help=help,
            )
    p.add_argument("--bind", dest="host", default=None, help="alias of --host")
