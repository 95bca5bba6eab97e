"""Simulated links: latency and bandwidth of one direction between two devices, and message sizes.

A message occupies the wire for ``bytes * 8 / bandwidth`` and arrives ``latency`` later (latency
overlaps, bandwidth serialises, as ``peers/link.py``'s emulation does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SEGMENT_META_BYTES, ROW_META_BYTES, TOKEN_BYTES = 96, 9, 4  # CBOR frame + ids/parents/positions per row


@dataclass(frozen=True)
class LinkModel:
    """A simulated link (the mesh's real one is ``peers/link.py: Link``)."""

    latency: float = 0.0  # seconds, one way
    bandwidth: float = math.inf  # bits per second

    def wire_seconds(self, nbytes: int) -> float:
        return nbytes * 8 / self.bandwidth if math.isfinite(self.bandwidth) else 0.0

    def __str__(self) -> str:
        bw = "inf" if not math.isfinite(self.bandwidth) else f"{self.bandwidth / 1e6:g}mbit"
        return f"{self.latency * 1e3:g}ms/{bw}"


_LAT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}
_BW = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "mbps": 1e6, "gbit": 1e9, "": 1e6}


def parse_link(spec: str) -> LinkModel:
    """``1ms/150mbit``, ``500us/1gbit``, ``0/inf`` (bare numbers: ms and Mbit/s)."""
    lat, _, bw = spec.strip().lower().partition("/")
    m1 = re.fullmatch(r"([0-9.]+)\s*(us|ms|s|)", lat)
    m2 = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|mbps|gbit|)", bw) if bw not in ("", "inf", "0") else None
    if m1 is None or (m2 is None and bw not in ("", "inf", "0")):
        raise ValueError(f"link {spec!r}: expected LATENCY/BANDWIDTH, e.g. 1ms/150mbit or 0/inf")
    bandwidth = float(m2.group(1)) * _BW[m2.group(2)] if m2 else math.inf
    return LinkModel(float(m1.group(1)) * _LAT[m1.group(2)], bandwidth if bandwidth > 0 else math.inf)
