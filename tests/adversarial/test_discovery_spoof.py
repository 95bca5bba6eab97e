"""Spoofed mDNS adverts: anyone on the LAN can announce (or say goodbye for) any node id at any address.

The adverts are handed to the node exactly as ``Discovery`` hands over a resolved service
(``add_discovered`` / ``remove_discovered``); forging the multicast packets themselves adds nothing.
"""

from __future__ import annotations

import asyncio

from hostile_peers import Mesh, free_socket, until

from peers.mesh import CLOSE_TIMED_OUT, MeshNode
from peers.neighbours import MAX_DIAL_FAILURES, MAX_DISCOVERED


async def found(a: MeshNode, b: MeshNode) -> None:
    """``a`` discovers ``b`` (and ``b`` never dials ``a``: only a's target keeps the pair linked)."""
    a.neighbours.dial_grace = 0.0
    a.neighbours.add_discovered(b.node_id, "127.0.0.1", b.config.api_port)
    await until(lambda: b.node_id in a.neighbours.links, what="the discovered link")


async def test_a_spoofed_advert_neither_moves_nor_removes_a_linked_peer(tmp_path):
    mesh = Mesh(tmp_path)
    dead = free_socket()  # bound, never listening: connection refused
    try:
        a = await mesh.start("a")
        b = await mesh.start("b")
        await found(a, b)
        a.neighbours.add_discovered(b.node_id, "127.0.0.1", dead.getsockname()[1])  # "b moved here"
        a.neighbours.remove_discovered(b.node_id)  # "b said goodbye"
        target = a.neighbours.targets.get(b.node_id)
        assert target is not None and (target.host, target.port) == ("127.0.0.1", b.config.api_port)

        await a.neighbours.close_link(b.node_id, CLOSE_TIMED_OUT, "a network blip")
        await until(lambda: b.node_id not in a.neighbours.links)
        await until(lambda: b.node_id in a.neighbours.links, what="re-linking to b's real address")
    finally:
        await mesh.stop()
        dead.close()


async def test_an_advert_while_unlinked_cannot_strand_a_peer_it_moves(tmp_path):
    mesh = Mesh(tmp_path)
    dead = free_socket()
    try:
        a = await mesh.start("a")
        b = await mesh.start("b")
        await found(a, b)
        a.neighbours.backoff = (0.05, 0.2)
        await a.neighbours.close_link(b.node_id, CLOSE_TIMED_OUT, "a network blip")
        await until(lambda: b.node_id not in a.neighbours.links)
        a.neighbours.add_discovered(b.node_id, "127.0.0.1", dead.getsockname()[1])  # lands while unlinked
        # the address that passed a handshake is tried again when the advertised one fails
        await until(lambda: b.node_id in a.neighbours.links, what="re-linking despite the advert")
    finally:
        await mesh.stop()
        dead.close()


async def test_an_advert_flood_is_bounded_and_dead_targets_are_dropped(tmp_path):
    mesh = Mesh(tmp_path)
    dead = free_socket()
    try:
        a = await mesh.start("a")
        a.neighbours.backoff = (0.01, 0.02)
        a.neighbours.dial_grace = 0.0
        for i in range(4 * MAX_DISCOVERED):
            a.neighbours.add_discovered(f"{i:016x}", "127.0.0.1", dead.getsockname()[1])
        assert len(a.neighbours.targets) <= MAX_DISCOVERED
        # each keeps failing; after MAX_DIAL_FAILURES tries it is given up (a restarted peer advertises anew)
        await until(lambda: not a.neighbours.targets, timeout=30, what=f"dropping after {MAX_DIAL_FAILURES} failures")
        await asyncio.sleep(0.2)
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("dial ")]
    finally:
        await mesh.stop()
        dead.close()
