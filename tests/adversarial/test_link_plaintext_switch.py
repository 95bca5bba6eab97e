"""The benchmark's switch that takes the AEAD off links (``--insecure-plaintext-links``) cannot mix
with sealed links: a daemon with it and one without refuse each other at the handshake, each saying
why, and a hello cannot claim a third kind. Two daemons that both have it still number their frames.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hostile_peers import CODEC, SECRET, Mesh, hello, until

from meshd.cli import build_parser
from meshd.lab.emulate import build_parser as lab_parser
from peers.codec import Message
from peers.hello import INSECURE_PLAINTEXT, SEALED, Hello
from peers.link import HandshakeError, Link, LinkEmulation, LinkSecurity, accept_handshake, add_mesh_route, dial

PLAINTEXT = LinkSecurity(SECRET.secret, insecure_plaintext=True)


class Server:
    def __init__(self, security: LinkSecurity) -> None:
        self.security = security
        self.local = hello("server-node", links=security.links)
        self.refused: list[HandshakeError] = []
        self.links: list[Link] = []
        self.received: asyncio.Queue[Message] = asyncio.Queue()
        app = web.Application()
        add_mesh_route(app, self.accept)
        self.server = TestServer(app, host="127.0.0.1")

    async def accept(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        try:
            auth = await accept_handshake(ws, "127.0.0.1", self.local, self.security, CODEC, timeout=2)
        except HandshakeError as exc:
            self.refused.append(exc)
            return
        link = Link(ws, auth, codec=CODEC, remote="client", dialer=False)
        self.links.append(link)
        await link.run(lambda _, msg: self.received.put(msg))


async def dial_to(session: aiohttp.ClientSession, server: Server, security: LinkSecurity) -> Link:
    local = hello("client-node", links=security.links)
    return await dial(session, "127.0.0.1", server.server.port, local, security, CODEC, timeout=2)


@pytest.mark.parametrize(("server_side", "client_side"), [(SECRET, PLAINTEXT), (PLAINTEXT, SECRET)])
async def test_a_plaintext_end_and_a_sealed_end_refuse_each_other_clearly(server_side, client_side):
    server = Server(server_side)
    await server.server.start_server()
    try:
        with pytest.raises(HandshakeError) as err:
            async with aiohttp.ClientSession() as session:
                await dial_to(session, server, client_side)
        await until(lambda: server.refused, what="the server's refusal")
        # The server checks the client's hello first and refuses; the client hears its reason.
        for refusal in (server.refused[0], err.value):
            assert refusal.code == "links_mismatch"
            assert "--insecure-plaintext-links" in str(refusal) and INSECURE_PLAINTEXT in str(refusal)
        assert not server.links
    finally:
        await server.server.close()


async def test_two_plaintext_ends_link_and_still_deliver_in_order():
    server = Server(PLAINTEXT)
    await server.server.start_server()
    session = aiohttp.ClientSession()
    try:
        link = await dial_to(session, server, PLAINTEXT)
        task = asyncio.create_task(link.run(lambda *_: asyncio.sleep(0)))
        for i in range(20):
            await link.send(Message("prune", {"upto": i, "keep": [i], "commit": []}, epoch=1, request_id=i + 1))
        got = [await asyncio.wait_for(server.received.get(), 5) for _ in range(20)]
        assert [m["upto"] for m in got] == list(range(20))
        assert link.peer.links == INSECURE_PLAINTEXT and server.links[0].peer.links == INSECURE_PLAINTEXT
        await link.close()
        await task
    finally:
        await session.close()
        await server.server.close()


def test_a_hello_without_the_field_is_sealed_and_no_third_kind_is_accepted():
    wire = hello("peer").to_wire()
    del wire["links"]
    assert Hello.from_wire(wire).links == SEALED  # a peer that predates the switch seals
    with pytest.raises(Exception, match=r"hello\.links"):
        Hello.from_wire({**wire, "links": "none"})


async def test_mesh_nodes_link_only_with_nodes_that_run_the_same_links(tmp_path, caplog):
    """Through MeshNode, as the lab's daemons set it (``LinkEmulation(insecure_plaintext=True)``)."""
    mesh = Mesh(tmp_path)
    plain = LinkEmulation(insecure_plaintext=True)
    try:
        with caplog.at_level(logging.WARNING, logger="peers.mesh"):
            a = await mesh.start("a", emulation=plain)
        assert "INSECURE PLAINTEXT LINKS" in caplog.text and a.hello.links == INSECURE_PLAINTEXT
        sealed = await mesh.start("sealed", peers=[a.config.api_port])
        b = await mesh.start("b", peers=[a.config.api_port], emulation=plain)
        await until(lambda: b.node_id in a.peers, what="two plaintext nodes linking")
        await asyncio.sleep(1.0)  # the sealed node keeps redialling meanwhile
        assert sealed.node_id not in a.peers and not sealed.peers
    finally:
        await mesh.stop()


def test_only_the_lab_daemon_has_the_switch():
    """``meshd serve`` (what users run) cannot turn it on; ``python -m meshd.lab.emulate serve`` can."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--insecure-plaintext-links"])
    assert lab_parser().parse_args(["serve", "--insecure-plaintext-links"]).insecure_plaintext_links
    assert not lab_parser().parse_args(["serve"]).insecure_plaintext_links  # never the default
