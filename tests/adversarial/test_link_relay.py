"""A man in the middle that forwarded an honest handshake: it can neither inject, replay, reorder nor splice."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from hostile_peers import CODEC, SECRET, Endpoint, Relay, hello, until

from peers.codec import Message
from peers.link import CLOSE_INTEGRITY, Link, dial


async def noop(link: Link, msg: Message) -> None:
    pass


running: set[asyncio.Task[None]] = set()  # reader tasks; they end when their links close


async def victim(session: aiohttp.ClientSession, relay: Relay, name: str = "victim") -> Link:
    """An honest dialer whose link runs through the relay (as if a spoofed advert had sent it there)."""
    link = await dial(session, "127.0.0.1", relay.port, hello(name), SECRET, CODEC, timeout=2)
    running.add(asyncio.create_task(link.run(noop)))
    return link


def closes(rid: int) -> Message:
    return Message("close", {}, request_id=rid)  # ends request ``rid`` at a stage: worth forging


async def test_relay_cannot_inject_frames_of_its_own():
    async with Endpoint() as server, Relay(server) as relay, aiohttp.ClientSession() as session:
        link = await victim(session, relay)
        await link.send(closes(1))
        await until(lambda: len(server.received) == 1, what="honest traffic through the relay")
        assert link.peer.node_id == "honest-server"  # the handshake itself went through

        await relay.to_server[0].send_bytes(CODEC.encode(closes(666)))  # a well-formed frame of its own
        await until(lambda: server.links[0].closed, what="the injected frame closing the link")
        assert server.links[0].close_code == CLOSE_INTEGRITY
        assert [m.request_id for m in server.received] == [1]


async def test_relay_cannot_forge_a_sealed_looking_frame():
    async with Endpoint() as server, Relay(server) as relay, aiohttp.ClientSession() as session:
        link = await victim(session, relay)
        await link.send(closes(1))
        await until(lambda: len(server.received) == 1)
        # the next sequence number in clear, then bytes that are not under the session key
        await relay.to_server[0].send_bytes((1).to_bytes(8, "big") + bytes(64))
        await until(lambda: server.links[0].closed)
        assert server.links[0].close_code == CLOSE_INTEGRITY and "authentication" in server.links[0].close_reason
        assert [m.request_id for m in server.received] == [1]


@pytest.mark.parametrize(
    "attack",
    [
        "replay",  # message 1 again after message 2
        "reorder",  # message 2 before message 1
        "drop",  # message 1 never forwarded
    ],
)
async def test_replayed_reordered_or_dropped_frames_close_the_link(attack):
    held: list[bytes] = []

    def policy(conn: int, i: int, data: bytes) -> list[bytes]:
        # message 0 is the handshake's auth; 1, 2, 3 are the victim's frames
        if attack == "replay" and i == 2:
            return [data, relay.up[conn][1]]
        if attack == "reorder" and i == 1:
            held.append(data)
            return []
        if attack == "reorder" and i == 2:
            return [data, *held]
        if attack == "drop" and i == 1:
            return []
        return [data]

    async with Endpoint() as server, Relay(server, policy) as relay, aiohttp.ClientSession() as session:
        link = await victim(session, relay)
        for rid in (1, 2, 3):
            await link.send(closes(rid))
        await until(lambda: server.links and server.links[0].closed, what=f"the {attack} closing the link")
        assert server.links[0].close_code == CLOSE_INTEGRITY
        got = [m.request_id for m in server.received]
        assert got == [1, 2][: len(got)] and len(got) <= 2  # an in-order prefix, nothing twice, nothing late


async def test_a_frame_from_one_connection_is_refused_on_another():
    """Both connections join the same two peers, so only per-connection keys tell their frames apart."""

    def policy(conn: int, i: int, data: bytes) -> list[bytes]:
        if conn == 1 and i == 1:
            return [relay.up[0][1]]  # connection 0's first frame, at the same position on connection 1
        return [data]

    async with Endpoint() as server, Relay(server, policy) as relay, aiohttp.ClientSession() as session:
        first = await victim(session, relay)
        await first.send(closes(1))
        await until(lambda: len(server.received) == 1)
        second = await victim(session, relay)
        await second.send(closes(2))
        await until(lambda: len(server.links) == 2 and server.links[1].closed, what="the spliced frame")
        assert server.links[1].close_code == CLOSE_INTEGRITY
        assert [m.request_id for m in server.received] == [1]
        assert not server.links[0].closed
