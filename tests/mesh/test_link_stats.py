"""What a link measures about itself: bytes each way and the round trip of its pings, per peer."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from test_link import CODEC, SECRET, eventually, hello

from peers.codec import Message
from peers.link import Link, LinkMeter, accept_handshake, add_mesh_route, dial


async def test_links_count_bytes_both_ways_and_time_their_pings_per_peer():
    server_meter, client_meter = LinkMeter(), LinkMeter()
    heard: list[tuple[str, float]] = []
    client_meter.listeners.append(lambda peer, s: heard.append((peer, s)))
    server_links: list[Link] = []

    async def accept(ws: web.WebSocketResponse, request: web.Request) -> None:
        auth = await accept_handshake(ws, "127.0.0.1", hello("server-node"), SECRET, CODEC, timeout=2)
        link = Link(ws, auth, codec=CODEC, remote="127.0.0.1", dialer=False, meter=server_meter)
        server_links.append(link)

        async def ignore(_link: Link, _msg: Message) -> None:
            pass

        await link.run(ignore)

    app = web.Application()
    add_mesh_route(app, accept)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for round_ in range(2):  # a reconnect keeps counting where the last link stopped
                link = await dial(
                    session, "127.0.0.1", server.port, hello("client-node"), SECRET, CODEC, timeout=2,
                    meter=client_meter, ping_interval=0.05,
                )  # fmt: skip
                task = asyncio.create_task(link.run(lambda _l, _m: asyncio.sleep(0)))
                for i in range(20):
                    await link.send(Message("prune", {"upto": i, "keep": [i], "commit": []}, epoch=1, request_id=i))
                await eventually(lambda n=3 * (round_ + 1): len(heard) >= n, timeout=5)
                sent = client_meter.of("server-node").bytes_sent
                await eventually(lambda n=sent: server_meter.of("client-node").bytes_received == n)
                assert sent > 20 * 20 * (round_ + 1)  # 20 sealed frames per round, each well over 20 bytes
                await link.close()
                await task
    finally:
        for link in server_links:
            await link.close()
        await server.close()
    stats = client_meter.of("server-node")
    assert {p for p, _ in heard} == {"server-node"} and stats.pings_answered == len(heard)
    assert all(0 < s < 1.0 for _, s in heard) and stats.rtt == heard[-1][1]
    assert server_meter.of("client-node").pings_answered == 0  # the server's links were not told to ping
    assert set(client_meter.peers) == {"server-node"}
