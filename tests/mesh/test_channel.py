"""The sealed channel without sockets: keys, chunking, and every way a message can fail to open."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest

from peers.channel import CHUNK_BYTES, HEADER_BYTES, MAX_MESSAGE, OVERHEAD, IntegrityError, SessionKeys
from peers.codec import FrameTooLarge


def keys(**kw) -> SessionKeys:
    args = {"secret": b"s" * 16, "nonce_server": b"n" * 32, "nonce_client": b"c" * 32, "client_id": "a"}
    return SessionKeys.derive(**{**args, "server_id": "b", "transcript": b"macs", **kw})


def test_every_input_of_the_derivation_changes_both_keys():
    base = keys()
    assert base.client_to_server != base.server_to_client
    for change in (
        {"secret": b"t" * 16},
        {"nonce_server": b"m" * 32},
        {"nonce_client": b"d" * 32},
        {"client_id": "x"},
        {"server_id": "x"},
        {"transcript": b"other"},
    ):
        other = keys(**change)
        assert other.client_to_server != base.client_to_server and other.server_to_client != base.server_to_client


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 5])
def test_frames_of_any_size_round_trip_in_bounded_messages(size):
    sealer, _ = keys().for_client()
    _, opener = keys().for_server()
    frame = secrets.token_bytes(size)
    messages = sealer.seal(frame)
    assert len(messages) == max(1, -(-size // CHUNK_BYTES)) and all(len(m) <= MAX_MESSAGE for m in messages)
    assert sum(len(m) for m in messages) == size + OVERHEAD * len(messages)
    assert [opener.open(m) for m in messages][-1] == frame
    assert opener.open(sealer.seal(b"next")[0]) == b"next"  # and the stream goes on


def test_a_message_fails_to_open_if_anything_about_it_is_off():
    sealer, _ = keys().for_client()
    first, second = sealer.seal(b"one")[0], sealer.seal(b"two")[0]

    def fresh():
        return keys().for_server()[1]

    with pytest.raises(IntegrityError, match="out of order"):
        fresh().open(second)
    opener = fresh()
    opener.open(first)
    with pytest.raises(IntegrityError, match="replayed"):
        opener.open(first)
    flipped = bytearray(first)
    flipped[-1] ^= 1
    with pytest.raises(IntegrityError, match="authentication"):
        fresh().open(bytes(flipped))
    more = bytearray(first)
    more[8] = 1  # claim more chunks follow: the flag is authenticated too
    with pytest.raises(IntegrityError, match="authentication"):
        fresh().open(bytes(more))
    with pytest.raises(IntegrityError, match="authentication"):  # the other direction's key
        keys().for_client()[1].open(first)
    with pytest.raises(IntegrityError, match="shorter"):
        fresh().open(first[:10])


def test_a_chunked_frame_over_the_limit_is_refused_before_it_is_complete():
    sealer, _ = keys().for_client()
    _, opener = keys().for_server()
    opener.max_frame = 2 * CHUNK_BYTES
    messages = sealer.seal(bytes(3 * CHUNK_BYTES))
    assert opener.open(messages[0]) is None and opener.open(messages[1]) is None
    with pytest.raises(FrameTooLarge):
        opener.open(messages[2])


def plain_keys() -> SessionKeys:
    return replace(keys(), insecure_plaintext=True)


def test_insecure_plaintext_keeps_framing_and_sequence_rules_but_drops_the_cipher():
    sealer, _ = plain_keys().for_client()
    _, opener = plain_keys().for_server()
    frame = secrets.token_bytes(2 * CHUNK_BYTES + 3)
    messages = sealer.seal(frame)
    assert len(messages) == 3 and all(len(m) <= MAX_MESSAGE for m in messages)
    assert sum(len(m) for m in messages) == len(frame) + HEADER_BYTES * 3  # header only, no tag
    assert frame[:CHUNK_BYTES] in messages[0]  # readable on the wire: this is what the switch measures
    assert [opener.open(m) for m in messages][-1] == frame
    first, second = sealer.seal(b"one")[0], sealer.seal(b"two")[0]
    with pytest.raises(IntegrityError, match="out of order"):
        opener.open(second)
    assert opener.open(first) == b"one"
    with pytest.raises(IntegrityError, match="replayed"):
        opener.open(first)
    with pytest.raises(IntegrityError, match="shorter"):
        opener.open(first[:5])
    bad_flag = bytearray(second)
    bad_flag[8] = 7
    with pytest.raises(IntegrityError, match="chunk flag"):
        opener.open(bytes(bad_flag))


def test_a_sealed_end_refuses_plaintext_messages_and_vice_versa():
    plain, _ = plain_keys().for_client()
    _, sealed_opener = keys().for_server()
    with pytest.raises(IntegrityError, match="authentication"):
        sealed_opener.open(plain.seal(b"x" * 40)[0])
    sealed, _ = keys().for_client()
    _, plain_opener = plain_keys().for_server()
    assert plain_opener.open(sealed.seal(b"secret")[0]) != b"secret"  # ciphertext and tag, not the frame
