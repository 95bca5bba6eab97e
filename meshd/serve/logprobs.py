"""OpenAI's log-probability objects, built from the verifier's per-token records.

Chat completions carry ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
"refusal": null}``; the legacy completions API carries parallel arrays ``tokens``,
``token_logprobs``, ``top_logprobs`` (a token -> logprob object that always includes the
sampled token, so up to ``logprobs + 1`` entries) and ``text_offset``. Streams carry the same
objects for the tokens each chunk adds. The numbers are the model's own log-probabilities
(``models.verify.TokenLogprobs``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from meshd.serve.textstream import TokenBytes
from models.verify import TokenLogprobs

FLOOR = -9999.0  # what OpenAI reports for a token the model gives no probability at all (JSON has no -inf)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


def _entry(tb: TokenBytes, token: int, logprob: float) -> dict[str, Any]:
    return {"token": tb.text(token), "logprob": _finite(logprob), "bytes": list(tb.bytes(token))}


def chat_logprobs(records: Sequence[TokenLogprobs], tb: TokenBytes) -> dict[str, Any]:
    """A chat choice's ``logprobs`` for ``records``."""
    content = []
    for r in records:
        e = _entry(tb, r.token, r.logprob)
        e["top_logprobs"] = [_entry(tb, t, lp) for t, lp in r.top]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(records: Sequence[TokenLogprobs], tb: TokenBytes, offsets: Sequence[int]) -> dict[str, Any]:
    """A completion choice's ``logprobs`` for ``records``; ``offsets``: each token's character offset in the text."""
    tops = []
    for r in records:
        top = {tb.text(t): _finite(lp) for t, lp in r.top}
        top.setdefault(tb.text(r.token), _finite(r.logprob))
        tops.append(top)
    return {
        "tokens": [tb.text(r.token) for r in records],
        "token_logprobs": [_finite(r.logprob) for r in records],
        "top_logprobs": tops,
        "text_offset": list(offsets),
    }
