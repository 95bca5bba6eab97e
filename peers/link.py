"""One authenticated, ordered, bounded websocket link to one neighbour.

Handshake (both sides prove they know the mesh secret, each over a nonce the other just made,
so a recorded handshake is worthless):

    server -> client   challenge {nonce_s}
    client -> server   auth      {nonce_c, mac_c = HMAC(secret, "client" | nonce_s | nonce_c | hello_c), hello_c}
    server -> client   welcome   {mac_s = HMAC(secret, "server" | nonce_c | nonce_s | hello_s), hello_s}

The role label stops a reflected MAC from passing for the other side's; the hello is inside the
MAC so a man in the middle cannot swap the node id or cost curve. Without a secret the same
exchange runs with an empty key, and only loopback addresses are accepted on either end.

After the handshake the link is symmetric: ``send()`` puts an encoded frame on a bounded queue
(so a slow neighbour pushes back on its producer instead of growing memory) and one writer task
drains it in order; one reader task decodes frames and hands them to the owner's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import cbor2
from aiohttp import WSCloseCode, WSMsgType, web

from peers.codec import Codec, CodecError, Message
from peers.hello import Hello, incompatibility

log = logging.getLogger(__name__)

WS_PATH = "/mesh/ws"
NONCE_BYTES = 32
CLOSE_GOING_AWAY = WSCloseCode.GOING_AWAY  # the peer is shutting down on purpose: not a failure
CLOSE_DUPLICATE = 4000  # another link to the same peer won; the dialer should not hammer it
CLOSE_SAME_ID = 4002  # the peer presents our own node id (copied state directory)
CLOSE_BAD_FRAMES = WSCloseCode.POLICY_VIOLATION

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
MessageHandler = Callable[["Link", Message], Awaitable[None]]


class HandshakeError(ConnectionError):
    """The link could not be established; the message says which side refused and why."""

    def __init__(self, message: str, code: str = "handshake") -> None:
        super().__init__(message)
        self.code = code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LinkSecurity:
    """The mesh secret, or None for a loopback-only mesh (tests, a single machine)."""

    secret: bytes | None = None

    def allows(self, host: str) -> bool:
        return self.secret is not None or is_loopback(host)

    def mac(self, role: bytes, nonce_a: bytes, nonce_b: bytes, hello: dict[str, Any]) -> bytes:
        data = b"meshd-link-v1|" + role + b"|" + nonce_a + nonce_b + cbor2.dumps(hello, canonical=True)
        return hmac.new(self.secret or b"", data, hashlib.sha256).digest()


@dataclass(frozen=True)
class LinkEmulation:
    """A slower network than loopback, for benchmarks: applied by the sender, order preserved."""

    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0  # 0 = unlimited

    def transmit_time(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.bandwidth_mbps > 0


# --- handshake -----------------------------------------------------------------------------------


async def _receive(ws: WebSocket, codec: Codec, timeout: float, expect: str) -> Message:
    try:
        raw = await asyncio.wait_for(ws.receive(), timeout)
    except asyncio.TimeoutError:
        raise HandshakeError(f"no {expect} within {timeout:.0f} s", "timeout") from None
    if raw.type != WSMsgType.BINARY:
        raise HandshakeError(f"connection closed while waiting for {expect} ({raw.type.name})", "closed")
    try:
        msg = codec.decode(raw.data)
    except CodecError as exc:
        raise HandshakeError(f"bad frame while waiting for {expect}: {exc}", exc.code) from None
    if msg.type == "error":
        raise HandshakeError(f"peer refused the link: {msg['message']}", msg["code"])
    if msg.type != expect:
        raise HandshakeError(f"unauthenticated {msg.type!r} frame where {expect} was due", "unauthenticated")
    return msg


async def _refuse(ws: WebSocket, codec: Codec, exc: HandshakeError) -> None:
    with contextlib.suppress(Exception):
        await ws.send_bytes(codec.encode(Message("error", {"code": exc.code, "message": str(exc)})))
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=exc.code.encode()[:120])


def _check_peer(local: Hello, raw_hello: Any) -> Hello:
    try:
        peer = Hello.from_wire(raw_hello)
    except CodecError as exc:
        raise HandshakeError(f"bad hello: {exc}", "schema") from None
    why = incompatibility(local, peer.mesh, peer.fingerprint, peer.proto)
    if why:
        raise HandshakeError(f"peer {peer.node_id} has another {why}", "incompatible")
    return peer


async def accept_handshake(
    ws: WebSocket, remote: str, local: Hello, security: LinkSecurity, codec: Codec, timeout: float = 5.0
) -> Hello:
    """Server side. Returns the authenticated peer's hello; refuses (and closes) on any failure."""
    try:
        if not security.allows(remote):
            raise HandshakeError(
                f"no mesh secret is configured, so only loopback peers are accepted (got {remote})", "auth"
            )
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        await ws.send_bytes(codec.encode(Message("challenge", {"nonce": nonce_s})))
        auth = await _receive(ws, codec, timeout, "auth")
        nonce_c = auth["nonce"]
        expected = security.mac(b"client", nonce_s, nonce_c, auth["hello"])
        if len(nonce_c) != NONCE_BYTES or not hmac.compare_digest(auth["mac"], expected):
            raise HandshakeError(f"authentication failed for {remote}: wrong mesh secret or replayed handshake", "auth")
        peer = _check_peer(local, auth["hello"])
        hello = local.to_wire()
        mac = security.mac(b"server", nonce_c, nonce_s, hello)
        await ws.send_bytes(codec.encode(Message("welcome", {"mac": mac, "hello": hello})))
        return peer
    except HandshakeError as exc:
        await _refuse(ws, codec, exc)
        raise


async def dial_handshake(
    ws: WebSocket, local: Hello, security: LinkSecurity, codec: Codec, timeout: float = 5.0
) -> Hello:
    """Client side, after the websocket is open. Returns the authenticated server's hello."""
    try:
        challenge = await _receive(ws, codec, timeout, "challenge")
        nonce_s, nonce_c = challenge["nonce"], secrets.token_bytes(NONCE_BYTES)
        hello = local.to_wire()
        mac = security.mac(b"client", nonce_s, nonce_c, hello)
        await ws.send_bytes(codec.encode(Message("auth", {"nonce": nonce_c, "mac": mac, "hello": hello})))
        welcome = await _receive(ws, codec, timeout, "welcome")
        if not hmac.compare_digest(welcome["mac"], security.mac(b"server", nonce_c, nonce_s, welcome["hello"])):
            raise HandshakeError("the server failed authentication: wrong mesh secret or replayed handshake", "auth")
        return _check_peer(local, welcome["hello"])
    except HandshakeError as exc:
        await _refuse(ws, codec, exc)
        raise


# --- the link ------------------------------------------------------------------------------------


class Link:
    """An authenticated websocket to one peer with an ordered, bounded send path."""

    def __init__(
        self,
        ws: WebSocket,
        peer: Hello,
        *,
        codec: Codec,
        remote: str,
        dialer: bool,
        queue_size: int = 64,
        emulation: LinkEmulation | None = None,
        max_bad_frames: int = 3,
    ) -> None:
        self.ws, self.peer, self.codec, self.remote, self.dialer = ws, peer, codec, remote, dialer
        self.emulation = emulation if emulation and emulation.active else None
        self.max_bad_frames = max_bad_frames
        self.bad_frames = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._inflight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Link {self.peer.node_id}@{self.remote} {'out' if self.dialer else 'in'}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def pending(self) -> int:
        """Frames queued but not yet handed to the socket."""
        return self._queue.qsize() + self._inflight.qsize()

    async def send(self, msg: Message) -> None:
        """Queue a message; waits while the queue is full. Raises ConnectionError once closed."""
        frame = self.codec.encode(msg)
        if not self.closed and not self._queue.full():
            self._queue.put_nowait(frame)
            return
        # Slow path: wait for room, but not past the link's end (a closed link is never drained).
        put, closed = asyncio.ensure_future(self._queue.put(frame)), asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({put, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled() or self.closed:
            raise ConnectionError(f"link to {self.peer.node_id} is closed ({self.close_reason})")

    def offer(self, frame: bytes) -> bool:
        """Queue an encoded frame only if there is room: for traffic that is better skipped than late."""
        if self.closed:
            return False
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    async def run(self, on_message: MessageHandler) -> None:
        """Read until the link closes. Bad frames are answered and dropped; too many close the link."""
        self._tasks.append(asyncio.create_task(self._write_loop()))
        if self.emulation:
            self._tasks.append(asyncio.create_task(self._deliver_loop()))
        try:
            while not self.closed:
                raw = await self.ws.receive()
                if raw.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                try:
                    if raw.type != WSMsgType.BINARY:
                        raise CodecError(f"{raw.type.name} websocket message where a binary frame was due")
                    msg = self.codec.decode(raw.data)
                except CodecError as exc:
                    await self._bad_frame(exc)
                    continue
                try:
                    await on_message(self, msg)
                except Exception:
                    log.exception("handler for %s from %s failed; the link stays up", msg.type, self.peer.node_id)
        finally:
            if self.close_code is None:
                self.close_code = self.ws.close_code
                self.close_reason = self.close_reason or f"closed by peer (code {self.ws.close_code})"
            await self.close()

    async def close(self, code: int = WSCloseCode.OK, reason: str = "") -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason or "closed locally"
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=reason.encode()[:120])

    def _fail(self, exc: Exception) -> None:
        self.close_reason = f"send failed: {exc!r}"
        self._closer = asyncio.create_task(self.close(WSCloseCode.ABNORMAL_CLOSURE, self.close_reason))

    async def _bad_frame(self, exc: CodecError) -> None:
        self.bad_frames += 1
        log.warning("dropped a bad frame from %s (%d/%d): %s", self, self.bad_frames, self.max_bad_frames, exc)
        if self.bad_frames >= self.max_bad_frames:
            await self.close(CLOSE_BAD_FRAMES, f"too many bad frames ({self.bad_frames}); last: {exc.code}")
            return
        with contextlib.suppress(asyncio.QueueFull, CodecError):
            self._queue.put_nowait(self.codec.encode(Message("error", {"code": exc.code, "message": str(exc)})))

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wire_free = 0.0
        try:
            while True:
                frame = await self._queue.get()
                if self.emulation is None:
                    await self.ws.send_bytes(frame)
                    continue
                # Bandwidth serialises frames on the wire; latency overlaps (the deliver loop applies it).
                wire_free = max(loop.time(), wire_free) + self.emulation.transmit_time(len(frame))
                await self._inflight.put((wire_free + self.emulation.latency_ms / 1000, frame))
                await asyncio.sleep(wire_free - loop.time())
        except Exception as exc:  # a dead socket; the reader sees it too, but do not wait for that
            self._fail(exc)

    async def _deliver_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                at, frame = await self._inflight.get()
                await asyncio.sleep(at - loop.time())
                await self.ws.send_bytes(frame)
        except Exception as exc:  # a dead socket; the reader sees it too, but do not wait for that
            self._fail(exc)


async def dial(
    session: aiohttp.ClientSession,
    host: str,
    port: int,
    local: Hello,
    security: LinkSecurity,
    codec: Codec,
    timeout: float = 5.0,
    **link_options: Any,
) -> Link:
    """Open and authenticate a link to ``host:port``; raises HandshakeError or OSError."""
    if not security.allows(host):
        raise HandshakeError(f"no mesh secret is configured, so {host} (not loopback) is not dialed", "auth")
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{WS_PATH}"
    ws = await asyncio.wait_for(
        session.ws_connect(url, max_msg_size=2 * codec.max_frame, autoping=True, heartbeat=None), timeout
    )
    try:
        peer = await dial_handshake(ws, local, security, codec, timeout)
    except BaseException:
        await ws.close()
        raise
    return Link(ws, peer, codec=codec, remote=f"{host}:{port}", dialer=True, **link_options)


AcceptHandler = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]


def add_mesh_route(app: web.Application, accept: AcceptHandler, max_frame: int) -> None:
    """Serve ``/mesh/ws`` on the daemon's own application (REST shares the port)."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=2 * max_frame, autoping=True)
        await ws.prepare(request)
        await accept(ws, request)
        return ws

    app.router.add_get(WS_PATH, handler)
