"""A peer that stops reading (its handler hangs) while it keeps sending heartbeats.

Its heartbeats alone would keep it a member forever, and sends to it would wait forever. Bound under
test: a write blocked for ``send_timeout`` closes the link (checked every ``send_timeout / 4``, then
up to ``CLOSE_GRACE`` to close), and the peer is dropped from membership at that moment; a send
that finds the queue full waits at most ``send_timeout``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hostile_peers import Mesh, linked_pair, until

from peers.codec import Message
from peers.link import CLOSE_GRACE
from peers.membership import MembershipEvent, PeerLost

SEND_TIMEOUT = 1.0
BOUND = SEND_TIMEOUT * 1.25 + CLOSE_GRACE


@pytest.mark.parametrize("rows", [64, 1])  # 73 kB segments fill socket buffers fast; 1 kB ones are written at once
async def test_a_peer_that_stops_reading_is_declared_lost_within_the_bound(tmp_path, rows):
    mesh = Mesh(tmp_path)
    try:
        a, b = await linked_pair(mesh, send_timeout=SEND_TIMEOUT, peer_timeout=30.0)
        hang = asyncio.Event()

        async def stuck(sender: str, msg: Message) -> None:
            await hang.wait()  # b's reader for a's link never comes back; b's ticks keep beating

        b.on("segment", stuck)
        lost: list[tuple[float, MembershipEvent]] = []
        a.on_membership(lambda e: lost.append((time.monotonic(), e)) if isinstance(e, PeerLost) else None)

        hidden = torch.zeros(rows, 576, dtype=torch.float16)
        seg = Message(
            "segment", {"origin": a.node_id, "nodes": [0], "parents": [-1], "positions": [0], "hidden": hidden}
        )
        sent, error, blocked_at = 0, None, None
        start = time.monotonic()
        while time.monotonic() - start < 60:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(a.send(b.node_id, seg), SEND_TIMEOUT + BOUND)
            except ConnectionError as exc:
                error = exc
            if blocked_at is None and (error or time.monotonic() - t0 > 0.1):
                blocked_at = t0  # the queue was full: the writer had been stuck since before this send
            if error:
                break
            sent += 1
        assert error is not None, f"sent {sent} segments to a peer that reads nothing and never failed"
        await until(lambda: lost, timeout=BOUND + 1, what="b declared lost")
        at, event = lost[0]
        assert event.node_id == b.node_id and "stopped reading" in event.reason
        # 1 s of slack: event-loop scheduling on a loaded 2-core test machine, not the protocol's bound
        assert at - blocked_at <= BOUND + 1.0, f"declared lost {at - blocked_at:.2f} s after sends blocked"
        hang.set()
    finally:
        await mesh.stop()
