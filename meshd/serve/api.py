"""The REST API: OpenAI-compatible completions plus the mesh's own status endpoints.

``create_app(engine)`` builds the aiohttp application around an ``Engine``
(``meshd.serve.engine``: the daemon's ``Runtime``, or a stand-in in tests); the daemon mounts its
mesh websocket on the same app and port. Routes:

- ``POST /v1/chat/completions``, ``POST /v1/completions``: stream or not, as OpenAI clients
  expect (SSE chunks, then ``data: [DONE]``), with a ``meshd`` object carrying the request's
  speculative-decoding statistics and the extension field ``mode`` (``meshd.modes``: flow | chunk | ar).
  A stream that has sent no text for ``idle_comment_s`` sends an SSE comment line (which clients
  ignore) saying why: the request is paused while the mesh re-plans, or is still computing;
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
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from meshd.serve import ollama
from meshd.serve.apischema import ApiError, CompletionRequest, parse_chat, parse_completion
from meshd.serve.engine import Engine
from meshd.serve.generation import (
    CARD,
    ENGINE,
    METRICS,
    STATE,
    TOKEN_BYTES,
    ApiState,
    Generation,
    Idle,
    read_json,
    start_generation,
    too_large,
)
from meshd.serve.guard import GUARD, RestGuard
from meshd.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from meshd.serve.metrics import Metrics
from meshd.serve.modelcard import ModelCard
from meshd.serve.page import add_page_routes
from meshd.serve.textstream import TokenBytes

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # never behind the API key: load balancers and systemd probes need them
PROTECTED_PREFIXES = ("/v1/", "/api/")
PROTECTED_PATHS = ("/mesh", "/metrics", "/events")  # the page itself (/, /static/) holds no data
IDLE_COMMENT_S = 2.0  # a stream silent this long gets a comment line (proxies' idle timeouts are far longer)
MESH_NAMESPACE = "/mesh/"  # the peers' websocket lives here: it authenticates itself and speaks no JSON errors


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    guard: RestGuard | None = None,
    card: ModelCard | None = None,
    idle_comment_s: float = IDLE_COMMENT_S,
) -> web.Application:
    """The API as an aiohttp application around ``engine``, behind ``guard`` (a default one if None);
    ``card`` names the model (default: the engine's model name and context, nothing else known);
    ``idle_comment_s``: how long a stream may go without text before a comment line says why."""
    guard = guard or RestGuard()
    app = web.Application(middlewares=[_errors_middleware, *guard.middlewares, _auth_middleware])
    app[GUARD] = guard
    app[ENGINE] = engine
    app[STATE] = ApiState(api_key, max_body_bytes, idle_comment_s)
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
    add_page_routes(app, engine, api_key=api_key)
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
            err = too_large(state.max_body_bytes)
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
    req = parse_chat(await read_json(request), request.app[ENGINE].max_context)
    return await _complete(request, req)


async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(await read_json(request), request.app[ENGINE].max_context)
    return await _complete(request, req)


async def _complete(request: web.Request, req: CompletionRequest) -> web.StreamResponse:
    _check_model(request.app[CARD], req.model)
    gen = await start_generation(request, req)
    if req.stream:
        return await _stream(request, req, gen)
    return await _whole(req, gen)


async def _whole(req: CompletionRequest, gen: Generation) -> web.Response:
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


async def _stream(request: web.Request, req: CompletionRequest, gen: Generation) -> web.StreamResponse:
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
        async with contextlib.aclosing(gen.deltas(state.idle_comment_s)) as deltas:
            async for delta in deltas:
                if isinstance(delta, Idle):
                    await resp.write(idle_comment(delta).encode())
                else:
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
        await gen.cancel_if_running()
    return resp


def idle_comment(idle: Idle) -> str:
    """The SSE comment a silent stream sends (a line starting with ``:``; OpenAI's clients, the SSE spec and
    ``meshd chat`` skip it): keeps proxies from closing the connection and tells a user reading it why."""
    if idle.paused is not None:
        what = (
            f"paused for {idle.paused:.0f} s: the mesh is re-planning (a stage went away or joined); "
            "the request resumes where it stopped when a new plan commits"
        )
    else:
        what = f"still computing: no new text for {idle.seconds:.0f} s"
    return f": {what}\n\n"


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
