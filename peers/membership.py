"""Who is alive: a peer is a member from its first authenticated frame until it goes silent.

Sans-IO: the mesh node feeds it what it hears and the clock, and publishes the events it returns.
Any frame counts as a sign of life, not only heartbeats, so a link busy with activations (whose
heartbeats may be skipped because its send queue is full) is never declared lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from peers.hello import Hello


@dataclass(frozen=True)
class PeerJoined:
    peer: Hello


@dataclass(frozen=True)
class PeerLost:
    node_id: str
    reason: str


MembershipEvent = PeerJoined | PeerLost


class Membership:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.members: dict[str, Hello] = {}
        self._last_heard: dict[str, float] = {}

    def heard(self, peer: Hello, now: float) -> list[MembershipEvent]:
        """Record a frame from ``peer``; a new member, or a restarted one (new instance), is an event."""
        known = self.members.get(peer.node_id)
        self.members[peer.node_id] = peer
        self._last_heard[peer.node_id] = now
        if known is None:
            return [PeerJoined(peer)]
        if known.instance != peer.instance:
            return [PeerLost(peer.node_id, "restarted"), PeerJoined(peer)]
        return []

    def touch(self, node_id: str, now: float) -> None:
        if node_id in self.members:
            self._last_heard[node_id] = now

    def lost(self, node_id: str, reason: str) -> list[MembershipEvent]:
        if self.members.pop(node_id, None) is None:
            return []
        del self._last_heard[node_id]
        return [PeerLost(node_id, reason)]

    def expire(self, now: float) -> list[MembershipEvent]:
        silent = [n for n, t in self._last_heard.items() if now - t > self.timeout]
        return [e for n in silent for e in self.lost(n, f"silent for more than {self.timeout:g} s")]
