"""The REST API: OpenAI-compatible completions plus the mesh's own status endpoints.

``create_app(engine)`` builds the aiohttp application around an ``Engine``
(``meshd.serve.engine``: the daemon's ``Runtime``, or a stand-in in tests); the daemon mounts its
mesh websocket on the same app and port. Routes:

- ``POST /v1/chat/completions``, ``POST /v1/completions``: stream or not, as OpenAI clients
  expect (SSE chunks, then ``data: [DONE]``), with a ``meshd`` object carrying the request's
  speculative-decoding statistics and the extension field ``mode`` (``meshd.modes``: flow | chunk | ar);
- ``GET /v1/models``, ``GET /v1/models/{id}``;
- Ollama's ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version``, ``/api/chat``, ``/api/generate``
  (``meshd.serve.ollama``);
- ``GET /mesh`` (``engine.status()``), ``GET /health`` (200 when ready, 503 and why not),
  ``GET /metrics`` (Prometheus text);
- ``GET /`` and ``GET /events``: the live page and its event stream (``meshd.serve.page``).

Every error is OpenAI's error JSON. A client that goes away cancels its request, so no stage
of the ring keeps computing for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from meshd.serve.apischema import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    CompletionRequest,
    parse_chat,
    parse_completion,
)
from meshd.serve.engine import Engine, GenerateParams, RequestHandle, RuntimeUnavailable
from meshd.serve.guard import GUARD, RestGuard, parse_json, read_body
from meshd.serve.logprobs import chat_logprobs, completion_logprobs
from meshd.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from meshd.serve.metrics import Metrics, RequestTimer
from meshd.serve.modelcard import ModelCard
from meshd.serve.page import add_page_routes
from meshd.serve.textstream import TextStream, TokenBytes
from models.engine import Stats
from models.text import decode, encode_messages, encode_prompt

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # never behind the API key: load balancers and systemd probes need them
PROTECTED_PREFIXES = ("/v1/", "/api/")
PROTECTED_PATHS = ("/mesh", "/metrics", "/events")  # the page itself (/, /static/) holds no data
MESH_NAMESPACE = "/mesh/"  # the peers' websocket lives here: it authenticates itself and speaks no JSON errors
DISCONNECT_POLL_S = 0.1


class ApiState:
    """What the API itself counts, merged into ``/metrics``."""

    def __init__(self, api_key: str | None, max_body_bytes: int):
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.requests: Counter[tuple[str, int]] = Counter()
        self.disconnects = 0
        self.streams_active = 0


ENGINE = web.AppKey("engine", Engine)
STATE = web.AppKey("api_state", ApiState)
METRICS = web.AppKey("metrics", Metrics)
CARD = web.AppKey("model_card", ModelCard)
TOKEN_BYTES = web.AppKey("token_bytes", TokenBytes)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    guard: RestGuard | None = None,
    card: ModelCard | None = None,
) -> web.Application:
    """The API as an aiohttp application around ``engine``, behind ``guard`` (a default one if None);
    ``card`` names the model (default: the engine's model name and context, nothing else known)."""
    guard = guard or RestGuard()
    app = web.Application(middlewares=[_errors_middleware, *guard.middlewares, _auth_middleware])
    app[GUARD] = guard
    app[ENGINE] = engine
    app[STATE] = ApiState(api_key, max_body_bytes)
    app[METRICS] = Metrics()
    app[CARD] = card or ModelCard(engine.model_name, context_length=engine.max_context)
    app[TOKEN_BYTES] = TokenBytes(engine.tokenizer)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/mesh", mesh)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    add_page_routes(app, engine, api_key=api_key, on_rtt=app[METRICS].observe_rtt)

    from meshd.serve import ollama  # here, not at the top: ollama.py speaks through this module (a cycle)

    ollama.add_routes(app)
    return app


# ---- middlewares --------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error JSON, including aiohttp's own 404/405."""
    if request.path.startswith(MESH_NAMESPACE):
        return await handler(request)
    state = request.app[STATE]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        resp = await handler(request)
    except ApiError as err:
        resp = _json_error(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            err = ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
        elif exc.status == 405:
            err = ApiError(
                405,
                f"{request.method} is not allowed on {request.path}",
                code="method_not_allowed",
                headers={"Allow": exc.headers.get("Allow", "")},
            )
        elif exc.status == 413:
            err = _too_large(state.max_body_bytes)
        else:
            err = ApiError(exc.status, exc.reason or "request failed")
        resp = _json_error(err)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        resp = _json_error(ApiError(500, "internal error in meshd; see the daemon's log", type="server_error"))
    state.requests[(endpoint, resp.status)] += 1
    return resp


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token on the API and status routes; ``/health`` and the mesh websocket stay open
    (peers authenticate their links themselves)."""
    key = request.app[STATE].api_key
    path = request.path
    if key is None or path in OPEN_PATHS or not (path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_PATHS):
        # /mesh/ws and anything unrouted: peers authenticate their links with the mesh secret
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
            "(the daemon's --api-key / MESHD_API_KEY).",
            code="missing_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="meshd"'},
        )
    if not hmac.compare_digest(token.strip().encode(), key):
        raise ApiError(
            401,
            "Incorrect API key provided.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="meshd", error="invalid_token"'},
        )
    return await handler(request)


# ---- status routes ------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    ok, why = request.app[ENGINE].ready()
    if ok:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable", "reason": why}, status=503, headers={"Retry-After": "1"})


async def mesh(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].status(), dumps=_dumps)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = dict(request.app[ENGINE].metrics())
    data["api_requests_total"] = {(("endpoint", ep), ("status", str(st))): n for (ep, st), n in state.requests.items()}
    data["api_client_disconnects_total"] = state.disconnects
    data["api_streams_active"] = state.streams_active
    return web.Response(body=request.app[METRICS].render(data), headers={"Content-Type": METRICS_CONTENT_TYPE})


def _model_card(request: web.Request) -> dict[str, Any]:
    """OpenAI's model object, plus what local-model clients show: names, context, layers, storage,
    and the committed plan (which peer computes which layers)."""
    card, engine = request.app[CARD], request.app[ENGINE]
    plan = engine.status().get("plan")
    return {
        "id": card.name,
        "object": "model",
        "created": int(engine.started),
        "owned_by": "meshd",
        "aliases": list(card.names[1:]),
        "context_length": card.context_length,
        "n_layers": card.n_layers,
        "architecture": card.architecture,
        "parameters": card.parameters,
        "quantization": card.quantization,
        "dtype": card.dtype,
        "fingerprint": card.fingerprint,
        "plan": _plan(plan) if plan else None,
    }


def _plan(plan: dict[str, Any]) -> dict[str, Any]:
    stages = [
        {
            "node_id": s["node_id"],
            "first_layer": s["first_layer"],
            "stop_layer": s["stop_layer"],
            "n_layers": s["stop_layer"] - s["first_layer"],
        }
        for s in plan.get("stages", [])
    ]
    return {"epoch": plan.get("epoch"), "committed": bool(plan.get("committed")), "stages": stages}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]}, dumps=_dumps)


async def get_model(request: web.Request) -> web.Response:
    _check_model(request.app[CARD], request.match_info["model"])
    return web.json_response(_model_card(request), dumps=_dumps)


def _check_model(card: ModelCard, model: str | None) -> None:
    if not card.accepts(model):
        raise ApiError(404, card.not_found(model), param="model", code="model_not_found")


# ---- completions --------------------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat(await _read_json(request), request.app[ENGINE].max_context)
    return await _complete(request, req)


async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(await _read_json(request), request.app[ENGINE].max_context)
    return await _complete(request, req)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than this daemon's limit of {limit} bytes.", code="request_too_large"
    )


async def _read_json(request: web.Request) -> Any:
    limit = request.app[STATE].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    body = await read_body(request, limit, lambda: _too_large(limit))
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


async def _complete(request: web.Request, req: CompletionRequest) -> web.StreamResponse:
    engine = request.app[ENGINE]
    _check_model(request.app[CARD], req.model)
    ok, why = engine.ready()
    if not ok:
        raise _unavailable(why)
    prompt_ids = await asyncio.to_thread(_encode, engine.tokenizer, req)
    max_tokens = _budget(req, len(prompt_ids), engine.max_context)
    params = GenerateParams(
        max_tokens=max_tokens,
        sampling=req.sampling,
        seed=req.seed,
        mode=req.mode,
        logprobs=req.logprobs,
    )
    try:
        handle = await engine.submit(prompt_ids, params)
    except RuntimeUnavailable as exc:
        raise _unavailable(str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    gen = _Generation(request, engine, req, handle)
    if req.stream:
        return await _stream(request, req, gen)
    return await _whole(req, gen)


def _unavailable(why: str) -> ApiError:
    return ApiError(
        503,
        f"The mesh cannot serve requests right now: {why}",
        type="service_unavailable",
        code="mesh_not_ready",
        headers={"Retry-After": "2"},
    )


def _encode(tokenizer: Any, req: CompletionRequest) -> list[int]:
    if req.kind == "chat":
        return encode_messages(tokenizer, req.messages or [])
    return encode_prompt(tokenizer, req.prompt or "", chat=False)


def _budget(req: CompletionRequest, prompt_tokens: int, context: int) -> int:
    """max_tokens as asked, or the endpoint's default bounded by the context left; OpenAI's
    context_length_exceeded when the prompt and the request do not fit."""
    if prompt_tokens == 0:
        raise ApiError(400, "The prompt is empty after tokenisation.", param="prompt", code="invalid_value")
    left = context - prompt_tokens
    if req.max_tokens is None:
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


class _Generation:
    """One running request: token chunks from the engine become text deltas, stop strings end it,
    and a vanished client cancels it everywhere."""

    def __init__(self, request: web.Request, engine: Engine, req: CompletionRequest, handle: RequestHandle):
        self.request, self.engine, self.handle, self.mode = request, engine, handle, req.mode
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

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until the request ends; then ``finish_reason`` / ``error`` are set."""
        watcher = asyncio.ensure_future(_client_gone(self.request))
        chunks = self.handle.__aiter__()
        try:
            while True:
                nxt = asyncio.ensure_future(_next(chunks))
                done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    self.disconnected = True
                    self.request.app[STATE].disconnects += 1
                    log.info("client went away: cancelling request %s", self.handle.request_id)
                    return
                chunk = nxt.result()
                if chunk is None:
                    break
                self.timer.chunk(len(chunk))
                delta = self.text.push(chunk)
                if delta:
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
            await self._cancel_if_running()
            st = self.handle.stats or Stats()
            self.timer.finish(st.verified_nodes, st.accepted_drafts)

    async def _cancel_if_running(self) -> None:
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
            "new_tokens": st.new_tokens,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(st.new_tokens / seconds, 3) if seconds > 0 else 0.0,
            "target_forwards": st.target_forwards,
            "verified_nodes": st.verified_nodes,
            "resumed": st.resumed,  # replays on a new ring after the mesh lost or re-planned this request's ring
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


async def _whole(req: CompletionRequest, gen: _Generation) -> web.Response:
    async with contextlib.aclosing(gen.deltas()) as deltas:
        async for _ in deltas:
            pass
    if gen.disconnected:
        return web.Response(status=499)  # nobody is listening; the status only reaches the access log
    if gen.error is not None:
        raise ApiError(
            503,
            f"Generation failed: {gen.error}",
            type="server_error",
            code="generation_failed",
            headers={"Retry-After": "2"},
        )
    text = gen.text.text
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": gen.logprobs(),
            "finish_reason": gen.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": gen.logprobs(), "finish_reason": gen.finish_reason}
        obj = "text_completion"
    return web.json_response(
        {
            "id": gen.id,
            "object": obj,
            "created": gen.created,
            "model": gen.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": gen.usage(),
            "meshd": gen.stats(),
        },
        dumps=_dumps,
    )


async def _stream(request: web.Request, req: CompletionRequest, gen: _Generation) -> web.StreamResponse:
    state = request.app[STATE]
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    chat = req.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        delta: str | None,
        finish: str | None = None,
        *,
        role: bool = False,
        logprobs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        if chat:
            d: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            )
            choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": gen.id,
            "object": obj,
            "created": gen.created,
            "model": gen.model,
            "system_fingerprint": None,
            "choices": [choice],
            **extra,
        }

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else _dumps(payload)
        await resp.write(f"data: {data}\n\n".encode())

    state.streams_active += 1
    try:
        await resp.prepare(request)
        if chat:
            await send(chunk(None, role=True))
        async with contextlib.aclosing(gen.deltas()) as deltas:
            async for delta in deltas:
                await send(chunk(delta, logprobs=gen.logprobs()))
        if gen.disconnected:
            return resp
        if gen.error is not None:
            await send(
                ApiError(503, f"Generation failed: {gen.error}", type="server_error", code="generation_failed").body()
            )
        else:
            usage = gen.usage()
            await send(chunk(None, gen.finish_reason, logprobs=gen.logprobs(), usage=usage, meshd=gen.stats()))
            if req.include_usage:
                last = chunk(None, usage=usage)
                last["choices"] = []
                await send(last)
        await send("[DONE]")
        await resp.write_eof()
    except ConnectionError:
        state.disconnects += 1
        log.info("client went away mid-stream (request %s)", gen.handle.request_id)
    finally:
        state.streams_active -= 1
        await gen._cancel_if_running()
    return resp


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_jsonable)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_json"):
        return o.to_json()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)
