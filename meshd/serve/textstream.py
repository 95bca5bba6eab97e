"""Token ids in, text deltas out: incremental detokenisation with stop strings.

Decoding tokens one by one is wrong for byte-level tokenizers: a multi-byte character (an
emoji, most CJK text) can span tokens, and decoding half of it yields U+FFFD. So every push
decodes the whole output and hands out only the new suffix, holding back a trailing U+FFFD
until the next token completes the character. Stop strings are matched on the decoded text;
while the output ends with what could be the start of a stop string, that tail is held back
too, so a client never sees text that is later cut. If the output ends mid-character (max_tokens
cut it), the dangling U+FFFD is dropped rather than sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """One request's output as text. ``push`` per token chunk, ``finish`` once at the end."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at the stop string once one matched)
        self.sent = ""  # the part already handed out
        self.stopped = False  # a stop string matched: the request should end with reason "stop"

    def push(self, ids: Sequence[int]) -> str:
        """Add accepted tokens; return the text that is now safe to send (may be empty)."""
        if self.stopped or not ids:
            return ""
        before = len(self.token_ids)
        self.token_ids.extend(int(i) for i in ids)
        full = self.decode(self.token_ids)
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            self._trim_tokens(before)
            self.text = full[:cut]
            return self._advance(self.text)
        self.text = full
        safe = full.rstrip(REPLACEMENT)
        return self._advance(safe[: len(safe) - self._held_prefix(safe)])

    def finish(self) -> str:
        """The generation ended: release what was held back for a stop string. A trailing U+FFFD
        is half a character cut off by max_tokens, never something worth sending: it is dropped."""
        self.text = self.text.rstrip(REPLACEMENT)
        return self._advance(self.text)

    # ---- internals --------------------------------------------------------------------------
    def _advance(self, upto: str) -> str:
        # Decoding is prefix-stable for byte-level BPE; if a tokenizer ever rewrites earlier text
        # (space clean-up), send nothing rather than text that contradicts what was sent.
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta = upto[len(self.sent) :]
        self.sent = upto
        return delta

    def _find_stop(self, text: str) -> int | None:
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _held_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        held = 0
        for s in self.stops:
            for j in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:j]):
                    held = j
                    break
        return held

    def _trim_tokens(self, before: int) -> None:
        """Keep only the tokens up to the one that completed the stop string (usage counts them)."""
        for n in range(before + 1, len(self.token_ids) + 1):
            if self._find_stop(self.decode(self.token_ids[:n])) is not None:
                del self.token_ids[n:]
                return


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins, back to the bytes they stand for (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 up, in order)."""
    own = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table = {chr(b): b for b in own}
    for n, b in enumerate(b for b in range(256) if b not in own):
        table[chr(256 + n)] = b
    return table


class TokenBytes:
    """One token's own bytes and text, as log-probabilities report them.

    Decoding a lone token is not enough: half an emoji decodes to U+FFFD and its bytes are lost.
    A byte-level BPE token's string spells its bytes exactly, so those are read back; other
    tokenizers' tokens are decoded alone (exact for everything but byte-fallback pieces).
    """

    ALPHABET = _byte_level_alphabet()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._cache: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        got = self._cache.get(token)
        if got is None:
            piece = self.tokenizer.convert_ids_to_tokens(token) if self.byte_level else None
            if piece is not None and all(c in self.ALPHABET for c in piece):
                got = bytes(self.ALPHABET[c] for c in piece)
            else:
                got = self.tokenizer.decode([token]).encode()
            self._cache[token] = got
        return got

    def text(self, token: int) -> str:
        """The token's text; bytes that are only part of a character show as U+FFFD."""
        return self.bytes(token).decode("utf-8", errors="replace")
