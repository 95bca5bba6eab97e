"""Incremental detokenisation: never broken UTF-8, never text a stop string later takes back."""

from __future__ import annotations

from meshd.serve.textstream import TextStream


def byte_decoder(ids: list[int]) -> str:
    """A byte-level 'tokenizer': each id is one byte, like a byte-fallback BPE on rare characters."""
    return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stops=(), chunk: int = 1) -> tuple[list[str], TextStream]:
    ts = TextStream(byte_decoder, stops)
    data = list(text.encode())
    out = [ts.push(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    out.append(ts.finish())
    return out, ts


def test_multibyte_characters_are_held_until_complete():
    out, ts = feed("a🎉b日本")
    assert all("\ufffd" not in d for d in out)
    assert "".join(out) == "a🎉b日本" == ts.text
    assert out[1:4] == ["", "", ""]  # three bytes of the emoji: nothing yet


def test_a_character_cut_off_at_the_end_is_dropped():
    ts = TextStream(byte_decoder)
    assert ts.push([0x61, 0xF0, 0x9F]) == "a"  # "a" and half an emoji (max_tokens ran out)
    assert ts.finish() == "" and ts.text == "a"
    ts = TextStream(byte_decoder)
    assert ts.push(list("a\ufffdb".encode())) == "a\ufffdb"  # a replacement character inside the text is text


def test_stop_string_cuts_and_prefix_is_held_back():
    out, ts = feed("Hello STOP world", ["STOP"])
    assert "".join(out) == "Hello " and ts.stopped and ts.text == "Hello "
    assert ts.token_ids == list(b"Hello STOP")  # trimmed to the token completing the stop string
    # a partial match is held, then released when it turns out not to be the stop string
    out, ts = feed("a STORM", ["STOP"])
    assert out[:7] == ["a", " ", "", "", "", "STOR", "M"] and not ts.stopped


def test_earliest_of_several_stops_wins_and_chunks_can_overshoot():
    out, ts = feed("one, two. three", [".", ","], chunk=5)
    assert "".join(out) == "one" and ts.token_ids == list(b"one,")


def test_held_prefix_released_at_finish():
    out, _ = feed("end with ST", ["STOP"])
    assert out[-1] == "ST" and "".join(out) == "end with ST"


def test_pushes_after_stop_are_ignored():
    ts = TextStream(byte_decoder, ["x"])
    assert ts.push(list(b"abx")) == "ab"
    assert ts.push(list(b"more")) == "" and ts.finish() == ""
