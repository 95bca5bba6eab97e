"""What a peer says about itself: advertised in mDNS TXT (the small part) and in the link handshake.

Compatibility is decided here once, so discovery (before dialing) and the handshake (for static
peers, which mDNS never vetted) reject the same peers for the same reasons.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import asdict, dataclass, field
from typing import Any

from peers.codec import PROTO_VERSION, SchemaError
from peers.planner import ROLES

# a peer that predates a field may leave it out (version "": unknown; links: sealed; role "both";
# no originator work; held bytes 0: the proposer's own figures)
OPTIONAL_FIELDS = {"version", "links", "role", "origin_layers", "layer_bytes", "replicated_bytes"}
SEALED, INSECURE_PLAINTEXT = "sealed", "insecure-plaintext"  # how a peer runs its links (peers/channel.py)


@functools.cache
def software_version() -> str:
    """The installed meshd release (this package's distribution), shown by ``meshd status``."""
    try:
        return importlib.metadata.version("meshd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Hello:
    node_id: str
    instance: str
    start_time: float
    mesh: str
    fingerprint: str
    memory_budget: int
    compute_score: float = 1.0
    api_port: int = 0
    # Seconds for one forward of T tokens through this peer's slice, measured by the models package.
    # Opaque here: carried so originators can size their draft trees.
    cost_curve: dict[int, float] = field(default_factory=dict)
    proto: int = PROTO_VERSION
    version: str = field(default_factory=software_version)  # informational: never decides compatibility
    # SEALED, or INSECURE_PLAINTEXT on a benchmark's daemons; both ends of a link must agree (peers/link.py).
    links: str = SEALED
    # both | stage | originator (peers.planner.ROLES): an originator-only peer holds no layers
    role: str = "both"
    # the originator's own work per round in layers of this peer's forward (the planner's discount)
    origin_layers: float = 0.0
    # bytes one decoder layer's weights and the replicated parts take in this peer's own weight format
    # (peers.planner.PeerResources); 0: not said
    layer_bytes: int = 0
    replicated_bytes: int = 0

    def started_before(self, other: Hello) -> bool:
        """Total order on processes: earlier start first, instance id breaks exact ties."""
        return (self.start_time, self.instance) < (other.start_time, other.instance)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> Hello:
        if not isinstance(d, dict):
            raise SchemaError("hello: expected a map")
        types: dict[str, tuple[type, ...]] = {
            "node_id": (str,),
            "instance": (str,),
            "start_time": (int, float),
            "mesh": (str,),
            "fingerprint": (str,),
            "memory_budget": (int,),
            "compute_score": (int, float),
            "api_port": (int,),
            "cost_curve": (dict,),
            "proto": (int,),
            "version": (str,),
            "links": (str,),
            "role": (str,),
            "origin_layers": (int, float),
            "layer_bytes": (int,),
            "replicated_bytes": (int,),
        }
        if not set(types) - OPTIONAL_FIELDS <= set(d) <= set(types):
            raise SchemaError(f"hello: fields {sorted(d)} differ from {sorted(types)}")
        for k, ts in types.items():
            if k in d and type(d[k]) not in ts:
                raise SchemaError(f"hello.{k}: expected {'/'.join(t.__name__ for t in ts)}")
        if d.get("links", SEALED) not in (SEALED, INSECURE_PLAINTEXT):
            raise SchemaError(f"hello.links: expected {SEALED!r} or {INSECURE_PLAINTEXT!r}")
        curve = d["cost_curve"]
        if not all(type(k) is int and type(v) in (int, float) for k, v in curve.items()):
            raise SchemaError("hello.cost_curve: expected a map of int token counts to seconds")
        if d.get("role", "both") not in ROLES:
            raise SchemaError(f"hello.role: {d['role']!r} is not one of {', '.join(ROLES)}")
        if not float(d.get("origin_layers", 0.0)) >= 0.0:
            raise SchemaError("hello.origin_layers: expected a number >= 0")
        for k in ("layer_bytes", "replicated_bytes"):
            if d.get(k, 0) < 0:
                raise SchemaError(f"hello.{k}: expected an integer >= 0")
        return cls(
            **{
                "version": "",
                "links": SEALED,
                **d,
                "start_time": float(d["start_time"]),
                "compute_score": float(d["compute_score"]),
                "origin_layers": float(d.get("origin_layers", 0.0)),
            }
        )


def incompatibility(local: Hello, mesh: str, fingerprint: str, proto: int) -> str | None:
    """Why a peer with these properties cannot join ``local``'s mesh, or None if it can."""
    if proto != local.proto:
        return f"protocol version {proto} (this daemon speaks {local.proto})"
    if mesh != local.mesh:
        return f"mesh name {mesh!r} (this daemon is in {local.mesh!r})"
    if fingerprint != local.fingerprint:
        return f"model fingerprint {fingerprint!r} (this daemon serves {local.fingerprint!r})"
    return None
