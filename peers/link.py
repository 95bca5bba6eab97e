"""One authenticated, encrypted, ordered, bounded websocket link to one neighbour.

Handshake (both sides prove they know the mesh secret, each over a nonce the other just made,
so a recorded handshake is worthless):

    server -> client   challenge {nonce_s}
    client -> server   auth      {nonce_c, mac_c = HMAC(secret, "client" | nonce_s | nonce_c | hello_c), hello_c}
    server -> client   welcome   {mac_s = HMAC(secret, "server" | nonce_c | nonce_s | hello_s), hello_s}

The role label stops a reflected MAC from passing for the other side's; the hello is inside the
MAC so a man in the middle cannot swap the node id or cost curve. Without a secret the same
exchange runs with an empty key, and only loopback addresses are accepted on either end.

Both sides then derive per-direction session keys (``peers/channel.py``) and every later frame
is sealed with ChaCha20-Poly1305 under a sequence number, so a relay that forwarded the handshake
cannot inject, and nobody can replay, reorder or read frames. Anything that fails to open closes
the link at once.

Before authentication a connection costs little: the websocket accepts messages of at most
``channel.MAX_MESSAGE`` bytes (larger frames travel as several sealed chunks once authenticated),
handshake frames are decoded only up to ``HANDSHAKE_MAX_FRAME``, and the whole handshake must
finish within its timeout.

After the handshake the link is symmetric: ``send()`` seals and writes a small frame at once when
nothing is queued, being written or waiting in the socket's buffer, and otherwise puts it on a
bounded queue (so a slow neighbour pushes back on its producer instead of growing memory) that one
writer task seals and drains in order; one reader task opens and decodes frames and hands them to
the owner's callback. A send that cannot get onto the queue within ``send_timeout`` raises
:class:`SendTimeout`; a websocket write that does not complete within ``send_timeout`` (the peer
stopped reading) closes the link with ``CLOSE_STALLED``.

Every link counts the bytes it carries and, with a ping interval, measures its round trip with
websocket pings, under the peer's node id in a :class:`LinkMeter` the owner keeps and reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import cbor2
from aiohttp import WSCloseCode, WSMsgType, web

from peers.channel import MAX_MESSAGE, IntegrityError, Opener, Sealer, SessionKeys
from peers.codec import Codec, CodecError, Message
from peers.hello import INSECURE_PLAINTEXT, SEALED, Hello, incompatibility

log = logging.getLogger(__name__)

WS_PATH = "/mesh/ws"
NONCE_BYTES = 32
HANDSHAKE_MAX_FRAME = 16 * 1024  # a hello with a 64-point cost curve is about 2 kB
HANDSHAKE_LABEL = b"meshd-link-v3|"
CLOSE_GOING_AWAY = WSCloseCode.GOING_AWAY  # the peer is shutting down on purpose: not a failure
CLOSE_DUPLICATE = 4000  # another link to the same peer won; the dialer should not hammer it
CLOSE_SAME_ID = 4002  # the peer presents our own node id (copied state directory)
CLOSE_INTEGRITY = 4003  # a sealed message failed to open: forged, replayed, reordered or corrupted
CLOSE_STALLED = 4004  # a write to the peer did not complete within the send timeout: it stopped reading
CLOSE_BAD_FRAMES = WSCloseCode.POLICY_VIOLATION
# aiohttp refuses a message whose size equals its limit, so the limit is one above the largest sealed message.
WS_MSG_LIMIT = MAX_MESSAGE + 1
CLOSE_GRACE = 1.0  # seconds a closing handshake may take before the socket is shut down regardless

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
MessageHandler = Callable[["Link", Message], Awaitable[None]]


class HandshakeError(ConnectionError):
    """The link could not be established; the message says which side refused and why."""

    def __init__(self, message: str, code: str = "handshake") -> None:
        super().__init__(message)
        self.code = code


class SendTimeout(ConnectionError):
    """The link's send queue stayed full for the whole send timeout."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LinkSecurity:
    """The mesh secret, or None for a loopback-only mesh (tests, a single machine).

    ``insecure_plaintext`` is for one benchmark (the AEAD's cost in a running ring): frames keep their
    sequence numbers but are neither encrypted nor authenticated. Both ends must agree (``links`` in
    the hello); ``meshd serve`` never sets it.
    """

    secret: bytes | None = None
    insecure_plaintext: bool = False

    @property
    def links(self) -> str:
        """What this end's hello must say about its links."""
        return INSECURE_PLAINTEXT if self.insecure_plaintext else SEALED

    def allows(self, host: str) -> bool:
        return self.secret is not None or is_loopback(host)

    def mac(self, role: bytes, nonce_a: bytes, nonce_b: bytes, hello: dict[str, Any]) -> bytes:
        data = HANDSHAKE_LABEL + role + b"|" + nonce_a + nonce_b + cbor2.dumps(hello, canonical=True)
        return hmac.new(self.secret or b"", data, hashlib.sha256).digest()

    def session_keys(
        self, nonce_s: bytes, nonce_c: bytes, client: Hello, server: Hello, mac_c: bytes, mac_s: bytes
    ) -> SessionKeys:
        return SessionKeys.derive(
            self.secret or b"",
            nonce_s,
            nonce_c,
            client.node_id,
            server.node_id,
            mac_c + mac_s,
            insecure_plaintext=self.insecure_plaintext,
        )


@dataclass(frozen=True)
class LinkEmulation:
    """A slower network than loopback, for benchmarks: applied by the sender, order preserved."""

    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0  # 0 = unlimited
    # Links without the AEAD (sequence numbers kept), to measure what sealing costs a running ring:
    # see LinkSecurity. INSECURE; only the lab's daemons set it.
    insecure_plaintext: bool = False

    def transmit_time(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.bandwidth_mbps > 0


@dataclass
class LinkStats:
    """What the links to one peer carried and how quickly that peer answers on them.

    Bytes are the websocket messages as they cross the socket (sealed chunks: every frame,
    hidden states and control alike, with its encryption overhead; websocket headers and the
    handshake not counted). ``rtt`` is the last round trip of a websocket ping on the link: the
    peer's link reader answers it, so it is the network's latency plus however long that reader
    was busy, which is what a frame on the link waits too.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    rtt: float | None = None  # seconds, the last answered ping
    pings_answered: int = 0


RttListener = Callable[[str, float], None]


class LinkMeter:
    """Every peer's :class:`LinkStats`, kept across that peer's links (a reconnect must not set a
    byte counter back), and listeners that hear each round trip as it is measured."""

    def __init__(self) -> None:
        self.peers: dict[str, LinkStats] = {}
        self.listeners: list[RttListener] = []

    def of(self, node_id: str) -> LinkStats:
        return self.peers.setdefault(node_id, LinkStats())

    def round_trip(self, node_id: str, seconds: float) -> None:
        stats = self.of(node_id)
        stats.rtt, stats.pings_answered = seconds, stats.pings_answered + 1
        for listener in self.listeners:
            listener(node_id, seconds)


@dataclass(frozen=True)
class Authenticated:
    """What a successful handshake yields: the peer's hello and this end's half of the channel."""

    peer: Hello
    sealer: Sealer
    opener: Opener


# --- handshake -----------------------------------------------------------------------------------


def handshake_codec(codec: Codec) -> Codec:
    """The same message types under the small pre-authentication frame limit."""
    return Codec(codec.registry, max_frame=min(codec.max_frame, HANDSHAKE_MAX_FRAME))


async def _receive(ws: WebSocket, codec: Codec, deadline: float, expect: str) -> Message:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        raw = await asyncio.wait_for(ws.receive(), max(remaining, 0.0))
    except asyncio.TimeoutError:
        raise HandshakeError(f"handshake not finished in time (waiting for {expect})", "timeout") from None
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
        await ws.send_bytes(codec.encode(Message("error", {"code": exc.code, "message": str(exc)[:500]})))
        await asyncio.wait_for(
            ws.close(code=WSCloseCode.POLICY_VIOLATION, message=exc.code.encode()[:120]), CLOSE_GRACE
        )


def _check_peer(local: Hello, raw_hello: Any, security: LinkSecurity) -> Hello:
    try:
        peer = Hello.from_wire(raw_hello)
    except CodecError as exc:
        raise HandshakeError(f"bad hello: {exc}", "schema") from None
    why = incompatibility(local, peer.mesh, peer.fingerprint, peer.proto)
    if why:
        raise HandshakeError(f"peer {peer.node_id} has another {why}", "incompatible")
    if peer.links != security.links:
        raise HandshakeError(
            f"peer {peer.node_id} runs {peer.links} links and this daemon runs {security.links} links; "
            f"insecure plaintext links are a benchmark switch (--insecure-plaintext-links) that every daemon "
            f"of the mesh must have, or none",
            "links_mismatch",
        )
    if peer.node_id == local.node_id:
        if peer.instance == local.instance:
            raise HandshakeError("this is a link to this daemon itself", "self")
        raise HandshakeError(
            f"the peer presents this daemon's node id {local.node_id} (instance {peer.instance}, started at "
            f"{peer.start_time:.0f}); one of the two state directories is a copy: stop one daemon, delete its "
            f"node_id file and start it again",
            "duplicate_id",
        )
    return peer


async def accept_handshake(
    ws: WebSocket, remote: str, local: Hello, security: LinkSecurity, codec: Codec, timeout: float = 5.0
) -> Authenticated:
    """Server side. Returns the authenticated peer; refuses (and closes) on any failure.

    ``timeout`` bounds the whole exchange, so a silent or slow client holds the connection no longer.
    """
    small = handshake_codec(codec)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        if not security.allows(remote):
            raise HandshakeError(
                f"no mesh secret is configured, so only loopback peers are accepted (got {remote})", "auth"
            )
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        await ws.send_bytes(small.encode(Message("challenge", {"nonce": nonce_s})))
        auth = await _receive(ws, small, deadline, "auth")
        nonce_c, mac_c = auth["nonce"], auth["mac"]
        expected = security.mac(b"client", nonce_s, nonce_c, auth["hello"])
        if len(nonce_c) != NONCE_BYTES or not hmac.compare_digest(mac_c, expected):
            raise HandshakeError(f"authentication failed for {remote}: wrong mesh secret or replayed handshake", "auth")
        peer = _check_peer(local, auth["hello"], security)
        hello = local.to_wire()
        mac_s = security.mac(b"server", nonce_c, nonce_s, hello)
        await ws.send_bytes(small.encode(Message("welcome", {"mac": mac_s, "hello": hello})))
        sealer, opener = security.session_keys(nonce_s, nonce_c, peer, local, mac_c, mac_s).for_server()
        return Authenticated(peer, sealer, opener)
    except HandshakeError as exc:
        await _refuse(ws, small, exc)
        raise


async def dial_handshake(
    ws: WebSocket, local: Hello, security: LinkSecurity, codec: Codec, timeout: float = 5.0
) -> Authenticated:
    """Client side, after the websocket is open. Returns the authenticated server."""
    small = handshake_codec(codec)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        challenge = await _receive(ws, small, deadline, "challenge")
        nonce_s, nonce_c = challenge["nonce"], secrets.token_bytes(NONCE_BYTES)
        if len(nonce_s) != NONCE_BYTES:
            raise HandshakeError(f"challenge nonce of {len(nonce_s)} bytes, not {NONCE_BYTES}", "schema")
        hello = local.to_wire()
        mac_c = security.mac(b"client", nonce_s, nonce_c, hello)
        await ws.send_bytes(small.encode(Message("auth", {"nonce": nonce_c, "mac": mac_c, "hello": hello})))
        welcome = await _receive(ws, small, deadline, "welcome")
        mac_s = welcome["mac"]
        if not hmac.compare_digest(mac_s, security.mac(b"server", nonce_c, nonce_s, welcome["hello"])):
            raise HandshakeError("the server failed authentication: wrong mesh secret or replayed handshake", "auth")
        peer = _check_peer(local, welcome["hello"], security)
        sealer, opener = security.session_keys(nonce_s, nonce_c, local, peer, mac_c, mac_s).for_client()
        return Authenticated(peer, sealer, opener)
    except HandshakeError as exc:
        await _refuse(ws, small, exc)
        raise


# --- the link ------------------------------------------------------------------------------------

# A sealed frame at most this large, written onto an empty socket buffer, stays under the transport's
# high-water mark (64 KiB), so its write cannot pause the transport and wait (Link._can_write_now).
DIRECT_WRITE_MAX = 32 * 1024


class Link:
    """An authenticated, sealed websocket to one peer with an ordered, bounded send path."""

    def __init__(
        self,
        ws: WebSocket,
        auth: Authenticated,
        *,
        codec: Codec,
        remote: str,
        dialer: bool,
        queue_size: int = 64,
        emulation: LinkEmulation | None = None,
        max_bad_frames: int = 3,
        send_timeout: float = 10.0,
        meter: LinkMeter | None = None,
        ping_interval: float = 0.0,
    ) -> None:
        """``meter`` counts this link's bytes and round trips under the peer's node id; with
        ``ping_interval`` > 0 the link pings the peer that often to measure its round trip."""
        self.ws, self.peer, self.codec, self.remote, self.dialer = ws, auth.peer, codec, remote, dialer
        self.meter = meter if meter is not None else LinkMeter()
        self.stats = self.meter.of(auth.peer.node_id)
        self.ping_interval = ping_interval
        self._ping: tuple[bytes, float] | None = None  # the ping awaiting its pong: (payload, perf_counter sent)
        self._sealer, self._opener = auth.sealer, auth.opener
        self._opener.max_frame = codec.max_frame
        self.emulation = emulation if emulation and emulation.active else None
        self.max_bad_frames = max_bad_frames
        self.send_timeout = send_timeout
        self.bad_frames = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._inflight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._close_done = asyncio.Event()  # set once close() has finished (see close)
        self._closer: asyncio.Task[None] | None = None
        self._writing_since: float | None = None  # loop time the websocket write under way began
        self._write_lock = asyncio.Lock()  # held from sealing a frame until its last chunk is written

    def __repr__(self) -> str:
        return f"<Link {self.peer.node_id}@{self.remote} {'out' if self.dialer else 'in'}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def pending(self) -> int:
        """Frames queued but not yet handed to the socket."""
        return self._queue.qsize() + self._inflight.qsize()

    async def send(self, msg: Message, timeout: float | None = None) -> None:
        """Queue a message; waits while the queue is full, at most ``timeout`` (default: the send timeout).

        Raises ConnectionError once closed, SendTimeout (a ConnectionError) if no room came in time.
        """
        frame = self.codec.encode(msg)
        if self._can_write_now(frame):
            await self._write_now(frame)
            return
        if not self.closed and not self._queue.full():
            self._queue.put_nowait(frame)
            return
        # Slow path: wait for room, but not past the link's end (a closed link is never drained).
        put, closed = asyncio.ensure_future(self._queue.put(frame)), asyncio.ensure_future(self._closed.wait())
        limit = self.send_timeout if timeout is None else timeout
        try:
            await asyncio.wait({put, closed}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not put.done():
                put.cancel()
        if self.closed:
            raise ConnectionError(f"link to {self.peer.node_id} is closed ({self.close_reason})")
        if not put.done() or put.cancelled():
            raise SendTimeout(f"link to {self.peer.node_id}: send queue still full after {limit:g} s")

    def _can_write_now(self, frame: bytes) -> bool:
        """Whether ``frame`` may skip the queue: nothing queued or being written, no emulated link, and a
        small frame onto an empty socket buffer, which cannot pause the transport, so the write never waits
        (a peer that stopped reading, or a prompt's hidden states, still go through the writer task, and
        ``send`` keeps its bound). The buffer is read off aiohttp's writer (not public API): without it,
        every frame is queued."""
        if self.closed or self.emulation is not None or len(frame) > DIRECT_WRITE_MAX:
            return False
        if not self._queue.empty() or self._write_lock.locked():
            return False
        transport = getattr(getattr(self.ws, "_writer", None), "transport", None)
        return transport is not None and transport.get_write_buffer_size() == 0

    async def _write_now(self, frame: bytes) -> None:
        """Seal and write ``frame`` in the caller's task (see :meth:`_can_write_now`).

        A frame then reaches the socket before the caller goes on (a stage's next forward, say), not after
        the writer task's turn on a loop that the torch thread shares the GIL with: that turn cost 0.1-0.4
        ms a hop."""
        async with self._write_lock:
            try:
                for message in self._sealer.seal(frame):
                    await self._write(message)
            except Exception as exc:
                self._fail(WSCloseCode.ABNORMAL_CLOSURE, f"send failed: {exc!r}")
                raise ConnectionError(f"link to {self.peer.node_id}: send failed: {exc!r}") from exc

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
        """Read until the link closes. Bad frames are answered and dropped; too many close the link.

        A message that fails to open (forged, replayed, reordered) closes the link at once.
        """
        self._tasks.append(asyncio.create_task(self._write_loop()))
        self._tasks.append(asyncio.create_task(self._watchdog()))
        if self.emulation:
            self._tasks.append(asyncio.create_task(self._deliver_loop()))
        if self.ping_interval > 0:
            self._tasks.append(asyncio.create_task(self._ping_loop()))
        try:
            while not self.closed:
                raw = await self.ws.receive()
                if raw.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                if raw.type in (WSMsgType.PING, WSMsgType.PONG):  # answered here, not by aiohttp: see _ping_loop
                    await self._on_ping_or_pong(raw.type, raw.data)
                    continue
                if raw.type == WSMsgType.BINARY:
                    self.stats.bytes_received += len(raw.data)
                try:
                    if raw.type != WSMsgType.BINARY:
                        raise IntegrityError(f"{raw.type.name} websocket message where a sealed frame was due")
                    frame = self._opener.open(raw.data)
                except CodecError as exc:  # IntegrityError, or a chunked frame over the limit
                    log.warning("closing %s: %s", self, exc)
                    await self.close(CLOSE_INTEGRITY if isinstance(exc, IntegrityError) else CLOSE_BAD_FRAMES, str(exc))
                    break
                if frame is None:
                    continue  # more chunks of this frame follow
                try:
                    msg = self.codec.decode(frame)
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
        """Close the link; returns within about CLOSE_GRACE even if the peer no longer reads.

        A second caller waits for the first one's close to finish: the link's reader ends as soon as a
        local close starts, and whoever owns the websocket (a dialer's ``async with``) would otherwise
        close it first with a plain 1000, and the peer would miss why the link ended (going away).
        """
        if self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._close_done.wait(), CLOSE_GRACE + 1.0)
            return
        self._closed.set()
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason or "closed locally"
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        # In a task of its own: aiohttp's writers share one drain future, and cancelling the writer task
        # above cancels it, which would otherwise raise CancelledError here, in the caller's task.
        closing = asyncio.ensure_future(self.ws.close(code=code, message=reason.encode()[:120]))
        closing.add_done_callback(lambda t: t.cancelled() or t.exception())  # outcome not needed
        await asyncio.wait({closing}, timeout=CLOSE_GRACE)
        closing.cancel()
        # aiohttp can give up on a close (a peer that does not read) without waking the reader, and then
        # drops the socket from its event loop's readers: shutting it down ends the connection for certain.
        self._shut_down_socket()
        self._close_done.set()

    def _shut_down_socket(self) -> None:
        """Tear the TCP connection down under aiohttp, so a reader blocked on it wakes up.

        Through a duplicate of the descriptor: the event loop's own socket object may refuse
        ``shutdown()`` (uvloop's does), and a shutdown acts on the connection, not on one descriptor.
        """
        sock = self.ws.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return  # already closed
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as dup:
            dup.shutdown(socket.SHUT_RDWR)

    def _fail(self, code: int, reason: str) -> None:
        self._closer = asyncio.create_task(self.close(code, reason))

    async def _bad_frame(self, exc: CodecError) -> None:
        self.bad_frames += 1
        log.warning("dropped a bad frame from %s (%d/%d): %s", self, self.bad_frames, self.max_bad_frames, exc)
        if self.bad_frames >= self.max_bad_frames:
            await self.close(CLOSE_BAD_FRAMES, f"too many bad frames ({self.bad_frames}); last: {exc.code}")
            return
        with contextlib.suppress(asyncio.QueueFull, CodecError):
            self._queue.put_nowait(self.codec.encode(Message("error", {"code": exc.code, "message": str(exc)})))

    async def _write(self, message: bytes) -> None:
        self._writing_since = asyncio.get_running_loop().time()
        await self.ws.send_bytes(message)
        self._writing_since = None
        self.stats.bytes_sent += len(message)

    async def _ping_loop(self) -> None:
        """Ping the peer every ``ping_interval`` s; its pong gives the link's round trip.

        Both ends read pings and pongs themselves (``autoping=False``), so a pong leaves the peer
        only when its link reader gets to it, in order with the frames before it. A ping not
        answered by the next one is superseded: a late pong is then ignored, never mistimed.
        """
        n = 0
        while True:
            await asyncio.sleep(self.ping_interval)
            n += 1
            payload = n.to_bytes(8, "big")
            self._ping = (payload, time.perf_counter())  # not loop.time(): uvloop's ticks in whole milliseconds
            try:
                await self.ws.ping(payload)
            except ConnectionError:
                return  # the link is going; its reader sees the end and closes it

    async def _on_ping_or_pong(self, kind: WSMsgType, data: bytes) -> None:
        if kind == WSMsgType.PING:
            with contextlib.suppress(ConnectionError):  # a link that is going: its reader sees the end next
                await self.ws.pong(data)
        elif self._ping is not None and data == self._ping[0]:
            rtt = time.perf_counter() - self._ping[1]
            self._ping = None
            self.meter.round_trip(self.peer.node_id, rtt)

    async def _watchdog(self) -> None:
        """Close the link when one websocket write has been blocked for the send timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.send_timeout / 4)
            since = self._writing_since
            if since is not None and loop.time() - since >= self.send_timeout:
                reason = f"a write blocked for more than {self.send_timeout:g} s: the peer stopped reading"
                log.warning("closing %s: %s", self, reason)
                self._fail(CLOSE_STALLED, reason)
                return

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wire_free = 0.0
        try:
            while True:
                frame = await self._queue.get()
                async with self._write_lock:
                    for message in self._sealer.seal(frame):
                        if self.emulation is None:
                            await self._write(message)
                            continue
                        # Bandwidth serialises messages on the wire; latency overlaps (the deliver loop applies it).
                        wire_free = max(loop.time(), wire_free) + self.emulation.transmit_time(len(message))
                        await self._inflight.put((wire_free + self.emulation.latency_ms / 1000, message))
                        await asyncio.sleep(wire_free - loop.time())
        except Exception as exc:  # a dead socket; the reader sees it too, but do not wait for that
            self._fail(WSCloseCode.ABNORMAL_CLOSURE, f"send failed: {exc!r}")

    async def _deliver_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                at, message = await self._inflight.get()
                await asyncio.sleep(at - loop.time())
                await self._write(message)
        except Exception as exc:  # a dead socket; the reader sees it too, but do not wait for that
            self._fail(WSCloseCode.ABNORMAL_CLOSURE, f"send failed: {exc!r}")


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
        session.ws_connect(url, max_msg_size=WS_MSG_LIMIT, autoping=False, heartbeat=None), timeout
    )
    try:
        auth = await dial_handshake(ws, local, security, codec, timeout)
    except BaseException:
        await ws.close()
        raise
    return Link(ws, auth, codec=codec, remote=f"{host}:{port}", dialer=True, **link_options)


AcceptHandler = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]


def add_mesh_route(app: web.Application, accept: AcceptHandler) -> None:
    """Serve ``/mesh/ws`` on the daemon's own application (REST shares the port).

    The websocket message limit is the sealed chunk size for every connection: before the
    handshake nobody can make this daemon buffer more than that per message.
    """

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=WS_MSG_LIMIT, autoping=False)  # Link answers pings (round trips)
        await ws.prepare(request)
        await accept(ws, request)
        return ws

    app.router.add_get(WS_PATH, handler)
