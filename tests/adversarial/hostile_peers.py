"""What the link, plan and discovery attacks share: honest endpoints, a relay in the middle, mesh nodes.

Everything runs on loopback in the test's own event loop. The relay is a man in the middle that an
mDNS advert could have put there: it accepts the victim's websocket, opens its own to the real
peer, and forwards (or tampers with) every message in both directions.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from peers.codec import Codec, Message
from peers.hello import Hello
from peers.link import HandshakeError, Link, LinkSecurity, accept_handshake, add_mesh_route
from peers.mesh import MeshConfig, MeshNode
from peers.planner import ModelShape

CODEC = Codec(max_frame=1 << 20)
SECRET = LinkSecurity(b"correct horse battery staple")
SHAPE = ModelShape(n_layers=12, bytes_per_layer=1 << 20, replicated_bytes=16 << 20)
FAST = dict(heartbeat_interval=0.2, peer_timeout=1.5, plan_debounce=0.2, mdns=False, memory_budget=1 << 30)


def hello(node_id: str, **kw) -> Hello:
    return Hello(node_id, secrets.token_hex(4), time.time(), "test-mesh", "fp1", 2**30, **kw)


async def until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        await asyncio.sleep(0.02)


class Endpoint:
    """An honest ``/mesh/ws`` server that records its links and every message it is handed."""

    def __init__(self, local: Hello | None = None) -> None:
        self.local = local or hello("honest-server")
        self.links: list[Link] = []
        self.refused: list[HandshakeError] = []
        self.received: list[Message] = []
        app = web.Application()
        add_mesh_route(app, self.accept)
        self.server = TestServer(app, host="127.0.0.1")

    async def accept(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        try:
            auth = await accept_handshake(ws, request.remote or "?", self.local, SECRET, CODEC, timeout=2)
        except HandshakeError as exc:
            self.refused.append(exc)
            return
        link = Link(ws, auth, codec=CODEC, remote="relay", dialer=False)
        self.links.append(link)
        await link.run(self._on_message)

    async def _on_message(self, link: Link, msg: Message) -> None:
        self.received.append(msg)

    async def __aenter__(self) -> Endpoint:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for link in self.links:
            await link.close()
        await self.server.close()


# policy(connection number, index of the client->server message, its bytes) -> messages to forward now
Policy = Callable[[int, int, bytes], list[bytes]]


def forward(conn: int, i: int, data: bytes) -> list[bytes]:
    return [data]


class Relay:
    """A man in the middle between a dialer and ``upstream``; ``policy`` decides what goes up."""

    def __init__(self, upstream: Endpoint, policy: Policy = forward) -> None:
        self.upstream, self.policy = upstream, policy
        self.up: list[list[bytes]] = []  # per connection: client->server messages as received
        self.to_server: list[aiohttp.ClientWebSocketResponse] = []
        app = web.Application()
        app.router.add_get("/mesh/ws", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        self._session: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)
        assert self._session is not None
        url = f"http://127.0.0.1:{self.upstream.server.port}/mesh/ws"
        server = await self._session.ws_connect(url, max_msg_size=0)
        conn = len(self.up)
        self.up.append([])
        self.to_server.append(server)

        async def down() -> None:
            async for msg in server:
                if msg.type == WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
            await client.close()

        pump = asyncio.create_task(down())
        async for msg in client:
            if msg.type != WSMsgType.BINARY:
                continue
            self.up[conn].append(msg.data)
            for data in self.policy(conn, len(self.up[conn]) - 1, msg.data):
                await server.send_bytes(data)
        await server.close()
        await pump
        return client

    @property
    def port(self) -> int:
        return self.server.port

    async def __aenter__(self) -> Relay:
        self._session = aiohttp.ClientSession()
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()
        assert self._session is not None
        await self._session.close()


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class Mesh:
    """MeshNodes served by their own aiohttp apps on loopback; ``stop()`` tears all of them down."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: list[tuple[MeshNode, web.AppRunner]] = []

    async def start(self, name: str, sock: socket.socket | None = None, peers=(), node_kw=None, **kw) -> MeshNode:
        sock = sock or free_socket()
        config = MeshConfig(
            api_port=sock.getsockname()[1],
            state_dir=kw.pop("state_dir", self.tmp / name),
            mesh_name="adversarial",
            fingerprint=kw.pop("fingerprint", "fp1"),
            static_peers=[f"127.0.0.1:{p}" for p in peers],
            **{**FAST, "secret": "s3cret-s3cret-s3cret", **kw},
        )
        node = MeshNode(config, SHAPE, **(node_kw or {}))
        app = web.Application()
        node.attach(app)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await node.start()
        self.running.append((node, runner))
        return node

    async def stop(self) -> None:
        for node, runner in self.running:
            await node.stop()
            await runner.cleanup()


def agreed(*nodes: MeshNode) -> bool:
    plans = [n.plan for n in nodes]
    return all(p and p.committed for p in plans) and len({(p.epoch, p.stages) for p in plans}) == 1


async def linked_pair(mesh: Mesh, **kw) -> tuple[MeshNode, MeshNode]:
    """Two nodes with a committed two-stage plan."""
    sa, sb = free_socket(), free_socket()
    a = await mesh.start("a", sa, peers=[sb.getsockname()[1]], **kw)
    b = await mesh.start("b", sb, peers=[sa.getsockname()[1]], **kw)
    await until(lambda: agreed(a, b) and len(a.plan.stages) == 2, what="a two-stage plan")
    return a, b
