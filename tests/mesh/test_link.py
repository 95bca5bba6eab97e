"""Authenticated websocket links on loopback: handshake, refusals, bad frames, emulation, backpressure."""

from __future__ import annotations

import asyncio
import secrets
import time

import aiohttp
import pytest
import torch
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from peers.codec import Codec, Message
from peers.hello import Hello
from peers.link import (
    CLOSE_BAD_FRAMES,
    HandshakeError,
    Link,
    LinkEmulation,
    LinkSecurity,
    accept_handshake,
    add_mesh_route,
    dial,
)

CODEC = Codec(max_frame=1 << 20)
SECRET = LinkSecurity(b"correct horse battery staple")


def hello(node_id: str, fingerprint: str = "fp1", **kw) -> Hello:
    return Hello(node_id, secrets.token_hex(4), time.time(), "test-mesh", fingerprint, 2**30, **kw)


class Server:
    """A /mesh/ws endpoint that records accepted links, refusals and received messages."""

    def __init__(self, local: Hello, security: LinkSecurity, remote_override: str | None = None) -> None:
        self.local, self.security, self.remote_override = local, security, remote_override
        self.links: list[Link] = []
        self.refused: list[HandshakeError] = []
        self.received: asyncio.Queue[tuple[float, Message]] = asyncio.Queue()
        app = web.Application()
        add_mesh_route(app, self.accept)
        self.server = TestServer(app, host="127.0.0.1")

    async def accept(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        remote = self.remote_override or request.remote or "?"
        try:
            auth = await accept_handshake(ws, remote, self.local, self.security, CODEC, timeout=2)
        except HandshakeError as exc:
            self.refused.append(exc)
            return
        link = Link(ws, auth, codec=CODEC, remote=remote, dialer=False)
        self.links.append(link)
        await link.run(self.on_message)

    async def on_message(self, link: Link, msg: Message) -> None:
        await self.received.put((time.monotonic(), msg))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/mesh/ws"


async def eventually(condition, timeout: float = 2.0) -> None:
    """Wait for a condition that another task makes true (the other end of a socket)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def server():
    srv = Server(hello("server-node", cost_curve={1: 0.01, 8: 0.02}), SECRET)
    await srv.server.start_server()
    yield srv
    for link in srv.links:
        await link.close()
    await srv.server.close()


async def connect(session, server, local=None, security=SECRET, **opts) -> Link:
    local = local or hello("client-node", cost_curve={1: 0.5, 16: 0.75})
    return await dial(session, "127.0.0.1", server.server.port, local, security, CODEC, timeout=2, **opts)


async def running(link: Link) -> tuple[asyncio.Task, asyncio.Queue]:
    inbox: asyncio.Queue = asyncio.Queue()

    async def on_message(_, msg):
        await inbox.put(msg)

    return asyncio.create_task(link.run(on_message)), inbox


async def test_handshake_exchanges_hellos_and_delivers_in_order(session, server):
    link = await connect(session, server)
    task, inbox = await running(link)
    assert link.peer.node_id == "server-node" and link.peer.cost_curve == {1: 0.01, 8: 0.02}
    for i in range(50):
        await link.send(Message("prune", {"upto": i, "keep": [i], "commit": []}, epoch=1, request_id=i))
    got = [(await server.received.get())[1] for _ in range(50)]
    assert [m["upto"] for m in got] == list(range(50))
    assert server.links[0].peer.cost_curve == {1: 0.5, 16: 0.75}
    ones = torch.ones(2, 4, dtype=torch.float16)
    await server.links[0].send(Message("result", {"queue": 3, "nodes": [], "hidden": ones}))
    back = await asyncio.wait_for(inbox.get(), 2)
    assert torch.equal(back["hidden"], torch.ones(2, 4, dtype=torch.float16))
    await link.close()
    await task


async def test_wrong_secret_is_refused(session, server):
    with pytest.raises(HandshakeError) as err:
        await connect(session, server, security=LinkSecurity(b"wrong"))
    assert err.value.code == "auth" and "wrong mesh secret" in str(err.value)
    await eventually(lambda: server.refused)
    assert not server.links


async def test_other_model_fingerprint_is_refused(session, server):
    with pytest.raises(HandshakeError, match="model fingerprint") as err:
        await connect(session, server, local=hello("stranger", fingerprint="other-model"))
    assert err.value.code == "incompatible"
    link = await connect(session, server)  # and a good peer is still served
    assert link.peer.node_id == "server-node"
    await link.close()


async def raw_auth_frame(challenge_frame: bytes, local: Hello, security: LinkSecurity) -> bytes:
    nonce_s, nonce_c = CODEC.decode(challenge_frame)["nonce"], secrets.token_bytes(32)
    mac = security.mac(b"client", nonce_s, nonce_c, local.to_wire())
    return CODEC.encode(Message("auth", {"nonce": nonce_c, "mac": mac, "hello": local.to_wire()}))


async def test_replayed_client_handshake_is_refused(session, server):
    me = hello("replayer")
    async with session.ws_connect(server.url) as ws:
        auth = await raw_auth_frame((await ws.receive()).data, me, SECRET)
        await ws.send_bytes(auth)
        assert CODEC.decode((await ws.receive()).data).type == "welcome"  # the genuine run succeeds
    async with session.ws_connect(server.url) as ws:
        await ws.receive()  # a fresh challenge
        await ws.send_bytes(auth)  # the recorded answer to the old one
        refusal = CODEC.decode((await ws.receive()).data)
        assert refusal.type == "error" and refusal["code"] == "auth"
        assert (await ws.receive()).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)


async def test_replayed_server_handshake_is_refused(session):
    """A fake server replays a genuine welcome: the client's fresh nonce makes it worthless."""
    recorded: dict[str, bytes] = {}

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if "welcome" not in recorded:  # first connection: act as a real server and record
            peer_hello = hello("real-server")
            await accept_handshake(ws, "127.0.0.1", peer_hello, SECRET, CODEC)
            recorded["welcome"] = b"placeholder"
        else:
            await ws.send_bytes(recorded["challenge"])
            await ws.receive()
            await ws.send_bytes(recorded["welcome_frame"])
            await ws.receive()
        return ws

    # Record a real exchange by sniffing it from the client side.
    app = web.Application()
    app.router.add_get("/mesh/ws", handler)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        url = f"http://127.0.0.1:{srv.port}/mesh/ws"
        async with session.ws_connect(url) as ws:
            recorded["challenge"] = (await ws.receive()).data
            await ws.send_bytes(await raw_auth_frame(recorded["challenge"], hello("c"), SECRET))
            recorded["welcome_frame"] = (await ws.receive()).data
        with pytest.raises(HandshakeError, match="server failed authentication"):
            await dial(session, "127.0.0.1", srv.port, hello("victim"), SECRET, CODEC, timeout=2)
    finally:
        await srv.close()


async def test_unauthenticated_frames_are_refused(session, server):
    async with session.ws_connect(server.url) as ws:
        await ws.receive()  # challenge
        await ws.send_bytes(CODEC.encode(Message("plan_commit", {}, 9)))
        refusal = CODEC.decode((await ws.receive()).data)
        assert refusal.type == "error" and refusal["code"] == "unauthenticated"
    async with session.ws_connect(server.url) as ws:
        await ws.receive()
        await ws.send_bytes(b"\x00garbage")
        assert CODEC.decode((await ws.receive()).data)["code"] == "malformed"
    await eventually(lambda: len(server.refused) == 2)
    assert not server.links


async def test_no_secret_means_loopback_only(session):
    open_mesh = LinkSecurity(None)
    assert open_mesh.allows("127.0.0.1") and open_mesh.allows("::1") and open_mesh.allows("localhost")
    assert not open_mesh.allows("192.168.1.20") and SECRET.allows("192.168.1.20")
    with pytest.raises(HandshakeError, match="not loopback"):  # refused before any packet is sent
        await dial(session, "192.0.2.1", 9, hello("c"), open_mesh, CODEC)
    srv = Server(hello("s"), open_mesh, remote_override="192.0.2.7")  # as if the peer were on the LAN
    await srv.server.start_server()
    try:
        with pytest.raises(HandshakeError, match="only loopback"):
            await dial(session, "127.0.0.1", srv.server.port, hello("c"), open_mesh, CODEC, timeout=2)
    finally:
        await srv.server.close()


async def test_repeated_bad_frames_close_the_link(session, server):
    """Sealed and authentic, but not a valid frame (a peer's bug): answered twice, the third closes."""
    link = await connect(session, server)
    task, inbox = await running(link)
    for _ in range(2):
        assert link.offer(b"\xffnot cbor")  # offer() seals what it is given, valid CBOR or not
    for _ in range(2):  # each bad frame is answered, and the link survives
        err = await asyncio.wait_for(inbox.get(), 2)
        assert err.type == "error" and err["code"] == "malformed"
    await link.send(Message("close", {}, request_id=5))
    assert (await server.received.get())[1].request_id == 5
    assert link.offer(CODEC.encode(Message("close")) + b"trailing junk")
    await asyncio.wait_for(task, 2)  # the third one closes it
    assert server.links[0].closed and server.links[0].close_code == CLOSE_BAD_FRAMES
    assert "too many bad frames" in server.links[0].close_reason


async def test_emulated_latency_and_bandwidth_delay_delivery(session, server):
    emu = LinkEmulation(latency_ms=80, bandwidth_mbps=16)
    link = await connect(session, server, emulation=emu)
    task, _ = await running(link)
    payload = torch.zeros(50_000, dtype=torch.float16)  # ~100 kB: 50 ms at 16 Mbit/s
    msgs = [Message("result", {"queue": i, "nodes": [], "hidden": payload}) for i in range(3)]
    nbytes = len(CODEC.encode(msgs[0]))
    start = time.monotonic()
    for m in msgs:
        await link.send(m)
    arrivals = [await asyncio.wait_for(server.received.get(), 5) for _ in msgs]
    assert [m["queue"] for _, m in arrivals] == [0, 1, 2]
    for i, (at, _) in enumerate(arrivals):  # frame i waits for the i+1 frames before it on the wire
        assert at - start >= 0.080 + (i + 1) * emu.transmit_time(nbytes) - 0.005
    await link.close()
    await task


async def test_full_send_queue_blocks_the_sender(session, server):
    # 1 kB frames at 1 kbit/s: the first one occupies the emulated wire for 8 s, so nothing drains.
    link = await connect(session, server, queue_size=2, emulation=LinkEmulation(bandwidth_mbps=0.001))
    task, _ = await running(link)
    msg = Message("result", {"nodes": [], "hidden": torch.zeros(500, dtype=torch.float16)})
    for _ in range(3):  # one on the wire, two queued
        await asyncio.wait_for(link.send(msg), 1)
    await eventually(lambda: link.pending == 2)
    blocked = asyncio.create_task(link.send(msg))
    await asyncio.sleep(0.2)
    assert not blocked.done(), "send() must wait while the queue is full"
    await link.close()
    with pytest.raises(ConnectionError, match="closed"):
        await asyncio.wait_for(blocked, 1)  # and must not hang once the link is gone
    await task
