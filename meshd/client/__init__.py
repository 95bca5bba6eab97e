"""Clients of a running daemon: ``meshd chat``, ``query`` and ``status`` over its REST API.

``http`` talks to the daemon, ``commands`` runs the three commands, ``statusview`` renders
``meshd status``; their flags are defined in ``meshd.cli``. Which daemon and which API key come
from the same places as ``meshd serve``'s settings, so on a device configured once both agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from meshd import config

DEFAULT_PEER = "http://127.0.0.1:8090"
SYSTEM_CONFIG = Path("/etc/meshd/meshd.toml")  # where the systemd unit's `meshd serve --config` reads
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}  # a daemon bound to every interface answers on loopback


def default_peer() -> str:
    """The daemon the commands talk to unless told otherwise: ``$MESHD_PEER``, else the local one."""
    return os.environ.get("MESHD_PEER") or DEFAULT_PEER


def daemon_settings(
    peer: str | None, api_key: str | None, config_path: str | Path | None, env: Mapping[str, str] = os.environ
) -> tuple[str, str | None]:
    """The daemon's URL and API key: flags first, then ``$MESHD_PEER`` for the URL, then the daemon's
    own settings (its TOML file: ``config_path``, ``$MESHD_CONFIG``, the user's default path, else the
    service's ``/etc/meshd/meshd.toml``; and ``MESHD_*`` variables, merged as ``meshd serve`` merges
    them: its ``host``/``port`` and ``api_key``)."""
    if peer is None and env.get("MESHD_PEER"):
        peer = env["MESHD_PEER"]
    if peer is not None and api_key is not None:
        return peer, api_key
    if config_path is None and not env.get("MESHD_CONFIG") and not config.default_config_path(env).is_file():
        config_path = SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None  # the service's file, if this is its host
    cfg = config.load_config(None, env=env, path=config_path)
    if peer is None:
        host = "127.0.0.1" if cfg.host in WILDCARD_HOSTS else cfg.host
        peer = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.port}"
    return peer, api_key if api_key is not None else cfg.api_key
