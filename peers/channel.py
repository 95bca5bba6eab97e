"""The protected channel a link runs on once the handshake is done. Sans-IO.

The handshake (``peers/link.py``) proves that both ends know the mesh secret; it does not protect
what follows. A relay that forwarded the handshake between two honest peers, or anyone who can
write to the TCP stream, could otherwise inject, replay, reorder or read frames. So both ends
derive two session keys (one per direction) from the secret, both handshake nonces, both node ids
and both handshake MACs, and every frame after the handshake travels sealed with
ChaCha20-Poly1305 under a per-direction sequence number:

    websocket message = header | ChaCha20-Poly1305(key, nonce = 0^4 | seq, aad = header, plaintext = data)
    header            = seq (8 bytes, big-endian) | flag (1 byte)

The receiver expects exactly the next sequence number, so a replayed, dropped or reordered
message is refused before decryption, and a forged one fails the tag. Keys that depend on both
fresh nonces make a relay's own frames (and frames recorded on another connection) fail too.

Frames larger than ``CHUNK_BYTES`` are split into several sealed chunks (``flag`` 1 = more follow,
0 = last), so the websocket's own message limit stays small for every connection, authenticated or
not, and a peer is never made to buffer more than one chunk before its tag is checked.

**Insecure plaintext links, for one benchmark only.** ``insecure_plaintext=True`` keeps the same
messages (header, sequence numbers, chunks, the same checks on receipt) but leaves out the cipher and
its tag, so a benchmark can measure what the AEAD costs a running ring (``python -m meshd.lab.linkcost
flow``). Such a link is readable and forgeable by anyone on the path; only the lab's daemons can turn it
on (``python -m meshd.lab.emulate serve --insecure-plaintext-links``, never ``meshd serve``), both ends
must have it (the hello says which, and a mismatch is refused at the handshake), and the daemon logs a
warning at start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peers.codec import CodecError, FrameTooLarge

KEY_LABEL = b"meshd-link-v3 session keys"
SEQ_BYTES = 8
TAG_BYTES = 16
CHUNK_BYTES = 64 * 1024  # plaintext per sealed websocket message
HEADER_BYTES = SEQ_BYTES + 1  # sequence number, chunk flag
OVERHEAD = HEADER_BYTES + TAG_BYTES  # per chunk
MAX_MESSAGE = CHUNK_BYTES + OVERHEAD  # the websocket message limit for every mesh connection
_MORE, _LAST = 1, 0
_SEQ_LIMIT = 2**64 - 1


class _NoCipher:
    """INSECURE, benchmarks only: the AEAD's interface with neither encryption nor authentication."""

    def encrypt(self, nonce: bytes, data: memoryview, aad: bytes) -> bytes:
        return bytes(data)

    def decrypt(self, nonce: bytes, data: memoryview, aad: bytes) -> bytes:
        return bytes(data)


def _cipher(key: bytes, insecure_plaintext: bool) -> tuple[ChaCha20Poly1305 | _NoCipher, int]:
    """The cipher for one direction and the length of its tag."""
    return (_NoCipher(), 0) if insecure_plaintext else (ChaCha20Poly1305(key), TAG_BYTES)


class IntegrityError(CodecError):
    """A sealed message that is forged, corrupted, replayed or out of order: the link must close."""

    code = "integrity"


@dataclass(frozen=True)
class SessionKeys:
    """One key per direction; the client's sending key is the server's receiving key."""

    client_to_server: bytes
    server_to_client: bytes
    insecure_plaintext: bool = False  # benchmarks only: same framing and sequence checks, no cipher (see above)

    @classmethod
    def derive(
        cls,
        secret: bytes,
        nonce_server: bytes,
        nonce_client: bytes,
        client_id: str,
        server_id: str,
        transcript: bytes,
        *,
        insecure_plaintext: bool = False,
    ) -> SessionKeys:
        """HKDF-SHA256 over the secret; salt = both nonces; info binds both node ids and the handshake MACs."""
        info = b"|".join((KEY_LABEL, client_id.encode(), server_id.encode(), hashlib.sha256(transcript).digest()))
        okm = HKDF(algorithm=SHA256(), length=64, salt=nonce_server + nonce_client, info=info).derive(secret)
        return cls(okm[:32], okm[32:], insecure_plaintext)

    def for_client(self) -> tuple[Sealer, Opener]:
        plain = self.insecure_plaintext
        return Sealer(self.client_to_server, insecure_plaintext=plain), Opener(
            self.server_to_client, insecure_plaintext=plain
        )

    def for_server(self) -> tuple[Sealer, Opener]:
        plain = self.insecure_plaintext
        return Sealer(self.server_to_client, insecure_plaintext=plain), Opener(
            self.client_to_server, insecure_plaintext=plain
        )


def _nonce(seq: bytes) -> bytes:
    return b"\x00\x00\x00\x00" + seq


class Sealer:
    """Seals frames for one direction, numbering websocket messages 0, 1, 2, … in the order sealed.

    Sealing order is sending order: the link seals in its single writer task.
    """

    def __init__(self, key: bytes, chunk_bytes: int = CHUNK_BYTES, *, insecure_plaintext: bool = False) -> None:
        self._aead, _ = _cipher(key, insecure_plaintext)
        self._chunk = chunk_bytes
        self.seq = 0

    def seal(self, frame: bytes) -> list[bytes]:
        """The websocket messages that carry ``frame`` (one unless it exceeds the chunk size)."""
        view = memoryview(frame)  # chunks are slices of it, not copies
        starts = range(0, max(len(frame), 1), self._chunk)
        last = len(starts) - 1
        return [
            self._seal_one(view[start : start + self._chunk], _LAST if i == last else _MORE)
            for i, start in enumerate(starts)
        ]

    def _seal_one(self, plaintext: memoryview, flag: int) -> bytes:
        if self.seq >= _SEQ_LIMIT:
            raise ConnectionError("the link has sent 2^64-1 messages; it must be re-established")
        seq = self.seq.to_bytes(SEQ_BYTES, "big")
        self.seq += 1
        header = seq + bytes((flag,))
        return header + self._aead.encrypt(_nonce(seq), plaintext, header)


class Opener:
    """Opens the other direction's messages, in order, and reassembles chunked frames."""

    def __init__(self, key: bytes, max_frame: int | None = None, *, insecure_plaintext: bool = False) -> None:
        self._aead, tag = _cipher(key, insecure_plaintext)
        self._overhead = HEADER_BYTES + tag
        self.max_frame = max_frame
        self.seq = 0
        self._parts: list[bytes] = []
        self._size = 0

    def open(self, message: bytes) -> bytes | None:
        """The complete frame once its last chunk is in, else None; raises IntegrityError or FrameTooLarge."""
        if len(message) < self._overhead:
            raise IntegrityError(f"sealed message of {len(message)} bytes is shorter than its overhead")
        view = memoryview(message)
        header, seq_bytes = bytes(view[:HEADER_BYTES]), bytes(view[:SEQ_BYTES])
        seq = int.from_bytes(seq_bytes, "big")
        if seq != self.seq:
            what = "replayed" if seq < self.seq else "out of order (messages missing)"
            raise IntegrityError(f"message {seq} is {what}: expected message {self.seq}")
        try:
            data = self._aead.decrypt(_nonce(seq_bytes), view[HEADER_BYTES:], header)
        except InvalidTag:
            raise IntegrityError(
                f"message {seq} failed authentication: forged, corrupted or not for this link"
            ) from None
        self.seq += 1
        flag = header[SEQ_BYTES]
        if flag not in (_MORE, _LAST):
            raise IntegrityError(f"message {seq} has chunk flag {flag!r}")
        self._size += len(data)
        if self.max_frame is not None and self._size > self.max_frame:
            raise FrameTooLarge(f"chunked frame exceeds the limit of {self.max_frame} bytes")
        if flag == _MORE:
            self._parts.append(data)
            return None
        if not self._parts:
            self._size = 0
            return data
        self._parts.append(data)
        frame = b"".join(self._parts)
        self._parts, self._size = [], 0
        return frame
