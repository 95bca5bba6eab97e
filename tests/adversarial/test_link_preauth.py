"""Before the handshake a stranger costs little: small messages, few handshakes at once, and a deadline.

Bound under test: an unauthenticated connection can make a daemon buffer one websocket message of
at most ``channel.MAX_MESSAGE`` (64 KiB + 25 bytes), decode at most ``HANDSHAKE_MAX_FRAME`` (16 KiB),
and hold it for the handshake timeout; at most ``MAX_HANDSHAKES`` (32) such connections at once,
4 from one address: about 2 MiB in all, whatever the frame sizes the peers announce.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import threading
import tracemalloc

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType
from hostile_peers import SECRET, Endpoint, Mesh, hello, until

from peers.codec import Codec
from peers.link import HandshakeError, dial

HUGE = 16 * 1024 * 1024
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame_header(length: int, masked: bool) -> bytes:
    """A final binary websocket frame of ``length`` bytes; a zero mask key leaves the payload as it is."""
    return bytes([0x82, (0x80 if masked else 0) | 127]) + struct.pack("!Q", length) + (b"\0\0\0\0" if masked else b"")


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def close_code(data: bytes) -> int | None:
    """The code of the first close frame in a server's (unmasked) byte stream."""
    i = 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = struct.unpack("!H", data[i : i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i : i + 8])[0], i + 8
        if opcode == 0x8:
            return struct.unpack("!H", data[i : i + 2])[0] if n >= 2 else None
        i += n
    return None


def send_huge_first_frame(port: int, payload: bytes, result: dict) -> None:
    """A stranger that upgrades to /mesh/ws and answers the challenge with one huge message."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /mesh/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    read_until(sock, b"\r\n\r\n")
    try:
        sock.sendall(frame_header(len(payload), masked=True))
        view = memoryview(payload)
        for start in range(0, len(payload), 1 << 20):
            sock.sendall(view[start : start + (1 << 20)])
    except OSError as exc:  # the server hung up before the message was through: what a bound looks like
        result["send_error"] = exc
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    result["close_code"] = close_code(received)
    sock.close()


async def test_a_huge_unauthenticated_message_is_refused_without_buffering_it():
    payload = bytes(HUGE)  # allocated before tracing starts: only what the server allocates counts
    async with Endpoint() as server:
        result: dict = {}
        tracemalloc.start()
        try:
            thread = threading.Thread(target=send_huge_first_frame, args=(server.server.port, payload, result))
            thread.start()
            await until(lambda: not thread.is_alive(), what="the server ending the connection")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result["close_code"] == WSCloseCode.MESSAGE_TOO_BIG
        assert peak < 2 * 1024 * 1024, f"the server allocated {peak} bytes for a refused {HUGE}-byte message"
        assert not server.links


def serve_huge_challenge(listener: socket.socket, payload: bytes) -> None:
    """A fake peer (what a spoofed advert points at) whose challenge is one huge message."""
    conn, _ = listener.accept()
    request = read_until(conn, b"\r\n\r\n").decode()
    key = next(
        line.split(":", 1)[1].strip() for line in request.split("\r\n") if line.lower().startswith("sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
    conn.sendall(
        f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    try:
        conn.sendall(frame_header(len(payload), masked=False))
        view = memoryview(payload)
        for start in range(0, len(payload), 1 << 20):
            conn.sendall(view[start : start + (1 << 20)])
        conn.recv(1)
    except OSError:
        pass
    conn.close()


async def test_a_dialer_refuses_a_huge_challenge_without_buffering_it():
    payload = bytes(HUGE)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    thread = threading.Thread(target=serve_huge_challenge, args=(listener, payload), daemon=True)
    thread.start()
    async with aiohttp.ClientSession() as session:
        tracemalloc.start()
        try:
            with pytest.raises(HandshakeError):
                # the daemon's own codec (64 MiB frames once authenticated)
                await dial(session, "127.0.0.1", listener.getsockname()[1], hello("dialer"), SECRET, Codec(), 5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    listener.close()
    assert peak < 2 * 1024 * 1024, f"the dialer allocated {peak} bytes for a refused {HUGE}-byte challenge"


async def closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    while (await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
        pass


async def test_silent_strangers_hold_few_handshakes_and_not_for_long(tmp_path):
    mesh = Mesh(tmp_path)
    try:
        node = await mesh.start("victim")
        node.neighbours.handshake_timeout = 1.0
        url = f"http://127.0.0.1:{node.config.api_port}/mesh/ws"
        async with aiohttp.ClientSession() as session:
            strangers = [await session.ws_connect(url) for _ in range(8)]
            first = await asyncio.gather(*(asyncio.wait_for(ws.receive(), 3) for ws in strangers))
            challenged = [ws for ws, m in zip(strangers, first) if m.type == WSMsgType.BINARY]
            assert len(challenged) == 4, "one address may hold 4 handshakes; the others are refused at once"
            assert all(ws.close_code == WSCloseCode.TRY_AGAIN_LATER for ws in strangers if ws not in challenged)
            # the four that got a challenge and never answer are cut off at the handshake deadline
            await asyncio.wait_for(asyncio.gather(*(closed(ws) for ws in challenged)), 3)
            for ws in strangers:
                await ws.close()
        honest = await mesh.start("honest", peers=[node.config.api_port])
        await until(lambda: honest.node_id in node.peers, what="an honest peer linking after the flood")
    finally:
        await mesh.stop()
