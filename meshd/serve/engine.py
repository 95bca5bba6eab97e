"""What the REST API needs from the thing that generates: the ``Engine`` and ``RequestHandle`` protocols.

The API (``meshd.serve.api``) is typed against these, not against a class, so the daemon's
``meshd.serve.runtime.Runtime`` and the tests' ``FakeRuntime`` (``tests/support.py``) are
interchangeable behind it. The names are the runtime's own; a member is listed here only if
the API reads it (``tests/serve/test_engine.py`` checks that both implementations have all).

``submit`` takes :class:`GenerateParams` and raises :class:`RuntimeUnavailable` when the mesh
cannot serve, ``ValueError`` when the
request does not fit (the API answers 503 and 400).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshd.modes import MESH_DEFAULT
from models.engine import Stats
from models.verify import Sampling, TokenLogprobs


class RuntimeUnavailable(RuntimeError):
    """The mesh cannot take requests right now (no committed plan, a stage is gone)."""


@dataclass
class GenerateParams:
    """What one request asks for besides its prompt."""

    max_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)  # the target's distribution, as the verifier uses it
    seed: int | None = None
    mode: str = MESH_DEFAULT
    logprobs: int | None = None  # None: none; else each token's log-probability and this many alternatives
    prefix_cache: bool = True  # reuse a prefix the stages kept, and keep this request's context when it finishes


class RequestHandle(Protocol):
    """One submitted request: its accepted tokens as they come, then how it ended."""

    request_id: str
    prompt_tokens: int
    finish_reason: str | None  # None while running; then "stop" | "length" | "error" | "cancelled"
    error: str | None  # why, when finish_reason is "error" or "cancelled"
    stats: Stats | None  # set when the request ends
    logprobs: list[TokenLogprobs]  # one per accepted token so far, when the request asked for them
    # time.monotonic() when the request's current pause began (its ring was lost: it waits for a new plan or
    # replays on one), None while it runs: a stream tells its client why no token comes
    paused_since: float | None

    def __aiter__(self) -> AsyncIterator[list[int]]:
        """Chunks of accepted token ids (one per verification round) until the request ends; a chunk's
        ``logprobs`` are in place by the time it is yielded."""
        ...

    async def cancel(self) -> None:
        """Stop the request everywhere it is computing; a no-op once it has ended."""
        ...


class Engine(Protocol):
    """A model served behind the API: the ring of one daemon, or a stand-in in tests."""

    model_name: str
    tokenizer: Any  # a Hugging Face tokenizer (models.text encodes and decodes with it)
    max_context: int  # prompt + completion tokens one request may use
    started: float  # Unix time the engine started (the model card's ``created``)

    def ready(self) -> tuple[bool, str]:
        """Whether requests can be served now, and if not, why (a sentence for the user)."""
        ...

    async def submit(self, prompt_ids: list[int], params: GenerateParams) -> RequestHandle:
        """Start generating after ``prompt_ids``."""
        ...

    def status(self) -> dict[str, Any]:
        """``GET /mesh``: plan, peers, this device's stage and load (JSON-serialisable)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """``GET /metrics``: flat numbers or labelled families (see ``meshd.serve.metrics``)."""
        ...
