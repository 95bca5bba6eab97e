"""Who this daemon is: a node id that survives restarts, and a per-process instance id.

The node id orders the ring and picks the plan proposer, so it must be stable across restarts
(kept in the state directory) and unique in the mesh. A copied state directory breaks
uniqueness: a peer that presents this daemon's own node id is refused at the handshake and
reported (``peers/neighbours.py``), and neither daemon exits on the other's word, since a peer
could claim any start time. Other peers keep the process that started first (``Hello.started_before``).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_ID_FILE = "node_id"
_NODE_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/meshd``, falling back to ``~/.local/state/meshd`` as the XDG spec says."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshd"


def load_or_create_node_id(state_dir: Path) -> str:
    """Read the node id from the state directory, creating it (atomically) on first start."""
    path = state_dir / NODE_ID_FILE
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        node_id = secrets.token_hex(8)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(node_id + "\n")
        os.replace(tmp, path)
        return node_id
    if not _NODE_ID_RE.match(node_id):
        raise ValueError(f"{path} holds {node_id!r}, not a node id (16 hex digits); delete the file to get a new one")
    return node_id


@dataclass(frozen=True)
class Identity:
    node_id: str
    state_dir: Path
    start_time: float = field(default_factory=time.time)
    # Distinguishes two processes with the same node id (and a process from its own mDNS echo).
    instance: str = field(default_factory=lambda: secrets.token_hex(6))

    @classmethod
    def load(cls, state_dir: Path | None = None) -> Identity:
        state_dir = state_dir or default_state_dir()
        return cls(load_or_create_node_id(state_dir), state_dir)
