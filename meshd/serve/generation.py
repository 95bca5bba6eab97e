"""One generation, whichever dialect asked for it: the OpenAI routes (``meshd.serve.api``) and
Ollama's (``meshd.serve.ollama``) both start requests here and read them through :class:`Generation`.

What they share, in one place: the application's keys (engine, counters, metrics, model card),
reading a JSON body within the size limit, the ``503`` of a mesh that cannot serve, the prompt's
encoding, the token budget, the submission to the engine (:func:`start_generation`), and the
running request that turns token chunks into text deltas, stops at stop strings, hands out
log-probabilities and is cancelled everywhere when its client goes away. Each dialect only
parses its own request shape and writes its own response shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshd.serve.apischema import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    CompletionRequest,
)
from meshd.serve.engine import Engine, GenerateParams, RequestHandle, RuntimeUnavailable
from meshd.serve.guard import parse_json, read_body
from meshd.serve.logprobs import chat_logprobs, completion_logprobs
from meshd.serve.metrics import Metrics, RequestTimer
from meshd.serve.modelcard import ModelCard
from meshd.serve.textstream import TextStream, TokenBytes
from models.engine import Stats
from models.text import decode, encode_messages, encode_prompt

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1


class ApiState:
    """What the API itself counts, merged into ``/metrics``."""

    def __init__(self, api_key: str | None, max_body_bytes: int, idle_comment_s: float | None = None):
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.idle_comment_s = idle_comment_s  # a silent stream's comment line every this many s (None: never)
        self.requests: Counter[tuple[str, int]] = Counter()
        self.disconnects = 0
        self.streams_active = 0


ENGINE = web.AppKey("engine", Engine)
STATE = web.AppKey("api_state", ApiState)
METRICS = web.AppKey("metrics", Metrics)
CARD = web.AppKey("model_card", ModelCard)
TOKEN_BYTES = web.AppKey("token_bytes", TokenBytes)


# ---- the request body ---------------------------------------------------------------------
def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than this daemon's limit of {limit} bytes.", code="request_too_large"
    )


async def read_json(request: web.Request) -> Any:
    """The body as JSON, refused (413) past the daemon's size limit and (400) when empty or not JSON."""
    limit = request.app[STATE].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    body = await read_body(request, limit, lambda: too_large(limit))
    if not body:
        raise ApiError(400, "The request body is empty: send a JSON object.", code="invalid_json")
    try:
        return parse_json(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400,
            f"We could not parse the JSON body of your request ({exc}). Send valid JSON "
            "with 'Content-Type: application/json'.",
            code="invalid_json",
        ) from None


# ---- starting a generation ----------------------------------------------------------------
def unavailable(why: str) -> ApiError:
    return ApiError(
        503,
        f"The mesh cannot serve requests right now: {why}",
        type="service_unavailable",
        code="mesh_not_ready",
        headers={"Retry-After": "2"},
    )


def encode(tokenizer: Any, req: CompletionRequest) -> list[int]:
    """The prompt's token ids: messages through the chat template, a completion's prompt as it is."""
    if req.kind == "chat":
        return encode_messages(tokenizer, req.messages or [])
    return encode_prompt(tokenizer, req.prompt or "", chat=False)


def token_budget(req: CompletionRequest, prompt_tokens: int, context: int, default: int | None = None) -> int:
    """max_tokens as asked, or ``default`` (None: the endpoint's) bounded by the context left; OpenAI's
    context_length_exceeded when the prompt and the request do not fit."""
    if prompt_tokens == 0:
        raise ApiError(400, "The prompt is empty after tokenisation.", param="prompt", code="invalid_value")
    left = context - prompt_tokens
    if req.max_tokens is None:
        if default is None:
            default = DEFAULT_CHAT_MAX_TOKENS if req.kind == "chat" else DEFAULT_COMPLETION_MAX_TOKENS
        if left >= 1:
            return min(default, left)
    elif req.max_tokens <= left:
        return req.max_tokens
    asked = req.max_tokens or 1
    param = "messages" if req.kind == "chat" else "prompt"
    raise ApiError(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + asked} tokens ({prompt_tokens} in the {param}, {asked} in the completion). "
        "Please reduce the length of the prompt or max_tokens.",
        param=param,
        code="context_length_exceeded",
    )


async def start_generation(
    request: web.Request,
    req: CompletionRequest,
    *,
    before: Sequence[int] = (),
    default_max_tokens: int | None = None,
) -> Generation:
    """Submit a checked request to the engine and return it running.

    ``before``: token ids the prompt continues (Ollama's ``context``); ``default_max_tokens``: the
    answer's length when the request sets none (None: the endpoint's default). Raises ``ApiError``:
    503 when the mesh cannot serve, 400 when the prompt does not fit or the engine refuses a value.
    The model name is the caller's to check: each dialect names models its own way.
    """
    engine = request.app[ENGINE]
    ok, why = engine.ready()
    if not ok:
        raise unavailable(why)
    prompt_ids = list(before) + await asyncio.to_thread(encode, engine.tokenizer, req)
    max_tokens = token_budget(req, len(prompt_ids), engine.max_context, default_max_tokens)
    params = GenerateParams(
        max_tokens=max_tokens,
        sampling=req.sampling,
        seed=req.seed,
        mode=req.mode,
        logprobs=req.logprobs,
        prefix_cache=req.prefix_cache,
    )
    try:
        handle = await engine.submit(prompt_ids, params)
    except RuntimeUnavailable as exc:
        raise unavailable(str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    return Generation(request, engine, req, handle, prompt_ids)


# ---- a running generation -----------------------------------------------------------------
@dataclass(frozen=True)
class Idle:
    """No text for ``seconds``: a stream's moment to tell its client it is still there (proxies and clients
    with idle timeouts drop a silent connection). ``paused``: how long the request has been paused (a stage
    was lost and it waits for the mesh to re-plan, or replays on the new plan), None when it is not."""

    seconds: float
    paused: float | None


class Generation:
    """One running request: token chunks from the engine become text deltas, stop strings end it,
    and a vanished client cancels it everywhere."""

    def __init__(
        self, request: web.Request, engine: Engine, req: CompletionRequest, handle: RequestHandle, prompt_ids: list[int]
    ):
        self.request, self.engine, self.handle, self.mode = request, engine, handle, req.mode
        self.prompt_ids = prompt_ids
        self.model = request.app[CARD].name
        self.kind, self.want_logprobs = req.kind, req.logprobs is not None
        self.logprobs_sent = 0  # records already handed out (streams send each token's once)
        self.text = TextStream(lambda ids: decode(engine.tokenizer, ids), req.stop)
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.timer: RequestTimer = request.app[METRICS].request(handle.prompt_tokens)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.disconnected = False

    async def deltas(self, idle_every: float | None = None) -> AsyncIterator[str | Idle]:
        """Text deltas until the request ends; then ``finish_reason`` / ``error`` are set. With ``idle_every``,
        also an :class:`Idle` each time that many seconds pass without a delta (never without it)."""
        watcher = asyncio.ensure_future(_client_gone(self.request))
        chunks = self.handle.__aiter__()
        nxt: asyncio.Future | None = None
        last_text = notice = time.monotonic()  # the last delta, the last delta or idle notice
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(_next(chunks))
                wait = None if idle_every is None else max(0.0, notice + idle_every - time.monotonic())
                done, _ = await asyncio.wait({nxt, watcher}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # only with idle_every: the chunk is still awaited, across the notice
                    notice = time.monotonic()
                    since = self.handle.paused_since
                    yield Idle(notice - last_text, None if since is None else notice - since)
                    continue
                if nxt not in done:
                    self.disconnected = True
                    self.request.app[STATE].disconnects += 1
                    log.info("client went away: cancelling request %s", self.handle.request_id)
                    return
                chunk, nxt = nxt.result(), None
                if chunk is None:
                    break
                self.timer.chunk(len(chunk))
                delta = self.text.push(chunk)
                if delta:
                    last_text = notice = time.monotonic()
                    yield delta
                if self.text.stopped:
                    self.finish_reason = "stop"
                    return
            tail = self.text.finish()
            if tail:
                yield tail
            reason = self.handle.finish_reason
            if reason == "error":
                self.error = self.handle.error or "the mesh failed while generating"
            elif reason == "cancelled":  # we never read on after cancelling, so someone else did
                self.error = self.handle.error or "the request was cancelled by the daemon"
            self.finish_reason = "length" if reason == "length" else "stop"
        finally:
            watcher.cancel()
            if nxt is not None:
                nxt.cancel()
            await self.cancel_if_running()
            st = self.handle.stats or Stats()
            self.timer.finish(st.verified_nodes, st.accepted_drafts)

    async def cancel_if_running(self) -> None:
        """Cancel the request in the engine unless it already ended (a response that stopped early)."""
        if self.handle.finish_reason is None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self.handle.cancel())

    def logprobs(self, shape: str | None = None) -> dict[str, Any] | None:
        """The choice's ``logprobs`` for the tokens not reported yet (None when not asked for, or none
        new), in the request's shape or ``shape`` ("chat" | "completion"). Only kept tokens count: a
        stop string's cut drops the tokens after it, as usage does."""
        if not self.want_logprobs:
            return None
        n = min(len(self.text.token_ids), len(self.handle.logprobs))
        start, self.logprobs_sent = self.logprobs_sent, max(self.logprobs_sent, n)
        if n <= start:
            return None
        records, tb = self.handle.logprobs[start:n], self.request.app[TOKEN_BYTES]
        if (shape or self.kind) == "chat":
            return chat_logprobs(records, tb)
        ids, limit = self.text.token_ids, len(self.text.text)
        offsets = [min(limit, len(self.text.decode(ids[:i]))) for i in range(start, n)]
        return completion_logprobs(records, tb, offsets)

    def usage(self) -> dict[str, int]:
        p, c = self.handle.prompt_tokens, len(self.text.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stats(self) -> dict[str, Any]:
        """The response's ``meshd`` object. A request that ended without the engine's statistics
        (cancelled before its first round) reports what the API itself saw."""
        st = self.handle.stats or Stats(new_tokens=len(self.text.token_ids))
        seconds = st.seconds or time.perf_counter() - self.started
        return {
            "request_id": str(self.handle.request_id),
            "mode": self.mode,
            "rounds": st.rounds,
            "mean_accepted": round(st.mean_accepted, 4),
            "trees": st.trees,
            "plain_trees": st.plain_trees,
            "accepted_per_tree": round(st.mean_per_tree, 4),
            # summed over its trees: from each fresh root to the tree's first tokens (a mesh's rounds wait so)
            "first_tokens_seconds": round(sum(st.first_tokens_seconds), 4),
            "tree_ends": dict(st.tree_ends),  # flow with slots: why its drafted trees ended (missed, unsent, undrafted)
            "new_tokens": st.new_tokens,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(st.new_tokens / seconds, 3) if seconds > 0 else 0.0,
            "prefill_seconds": round(st.prefill_seconds, 4),
            # the server's time to first token: from the request's submission to its first tokens reaching the
            # API (the prefill, the first token's verification and the hand-over to the event loop; None: none)
            "first_token_seconds": round(first - self.handle.submitted, 4)
            if (first := self.handle.first_token_at) is not None
            else None,
            "target_forwards": st.target_forwards,
            "verified_nodes": st.verified_nodes,
            "prefix_hit": st.prefix_hit,
            "resumed": st.resumed,  # replays of its history after its ring was lost or re-planned, or its path broke
            "paused_seconds": round(st.paused_seconds, 3),
            "token_ids": list(self.text.token_ids),
        }


async def _next(it: AsyncIterator[list[int]]) -> list[int] | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _client_gone(request: web.Request) -> None:
    """Returns once the client's connection is closed (aiohttp does not cancel handlers by default)."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(DISCONNECT_POLL_S)
