"""Ollama's API, the subset chat front-ends and scripts use: ``/api/tags``, ``/api/ps``, ``/api/show``,
``/api/version``, ``/api/chat`` and ``/api/generate``.

Many tools speak only Ollama's dialect, so the daemon answers it too, on the same port and with
the same generation underneath as the OpenAI routes (``meshd.serve.generation``): the request is
turned into the same checked ``CompletionRequest`` and runs through the same ring, stop strings and
disconnect handling. Ollama's shapes: generation streams by default, as newline-delimited JSON
objects (``application/x-ndjson``) each carrying a text piece with ``"done": false``, then one
``"done": true`` object with the reason and the counts and durations (nanoseconds); errors are
``{"error": "..."}``; ``logprobs``/``top_logprobs`` add each piece's tokens' log-probabilities in
OpenAI chat's entry shape, as Ollama does. Where meshd differs, it says so rather than ignore a setting: options that
would change the output but are not implemented (mirostat, typical_p, a repeat_last_n window)
are refused by name; the defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9), except
that no repetition penalty applies unless asked for.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from meshd.serve.apischema import (
    DEFAULT_CHAT_MAX_TOKENS,
    ApiError,
    CompletionRequest,
    invalid,
    logprobs_switch,
    parse_chat,
    parse_completion,
)
from meshd.serve.generation import CARD, ENGINE, STATE, Generation, read_json, start_generation
from meshd.serve.modelcard import ModelCard, parameter_size
from models.text import has_chat_template

NDJSON = "application/x-ndjson"
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's, when neither options nor the model say

# Ollama option -> the OpenAI-style body field meshd checks it as
SAMPLING_OPTIONS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
}
# options about how a runner loads and computes, not what it answers: meshd's mesh decides those
RUNNER_OPTIONS = {
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "use_mmap",
    "use_mlock",
    "numa",
    "low_vram",
    "f16_kv",
    "vocab_only",
}
# options that change the answer, accepted only at the value that turns them off
NEUTRAL_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "mirostat": lambda v: v == 0,
    "mirostat_eta": lambda v: True,  # only read when mirostat is on
    "mirostat_tau": lambda v: True,
    "typical_p": lambda v: v == 1,
    "tfs_z": lambda v: v == 1,
    "repeat_last_n": lambda v: v == -1,  # meshd's penalties look at the whole context, Ollama's -1
    "penalize_newline": lambda v: isinstance(v, bool),  # newlines are penalised like any token
}


def add_routes(app: web.Application) -> None:
    """Mount the Ollama routes on the API's application."""
    app.router.add_get("/api/version", _ollama(version))
    app.router.add_get("/api/tags", _ollama(tags))
    app.router.add_get("/api/ps", _ollama(ps))
    app.router.add_post("/api/show", _ollama(show))
    app.router.add_post("/api/chat", _ollama(chat))
    app.router.add_post("/api/generate", _ollama(generate))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ollama(handler: Handler) -> Handler:
    """Errors in Ollama's shape, ``{"error": "..."}``, with the status the OpenAI side would use."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return web.json_response({"error": err.message}, status=err.status, headers=err.headers)

    wrapped.__name__ = handler.__name__
    return wrapped


# ---- model listing ------------------------------------------------------------------------
def _stamp(t: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes ``created_at`` and ``modified_at``."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, tz=timezone.utc)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _details(card: ModelCard) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": card.format or "",
        "family": card.architecture or "",
        "families": [card.architecture] if card.architecture else None,
        "parameter_size": parameter_size(card.parameters),
        "quantization_level": card.quantization or "",
    }


def _entry(request: web.Request) -> dict[str, Any]:
    card = request.app[CARD]
    return {
        "name": card.name,
        "model": card.name,
        "modified_at": _stamp(request.app[ENGINE].started),
        "size": card.size or 0,
        "digest": card.fingerprint or "",
        "details": _details(card),
    }


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": importlib.metadata.version("meshd")})


async def tags(request: web.Request) -> web.Response:
    return web.json_response({"models": [_entry(request)]})


async def ps(request: web.Request) -> web.Response:
    """The model is "running" while the mesh can serve it (a committed plan)."""
    if not request.app[ENGINE].ready()[0]:
        return web.json_response({"models": []})
    card = request.app[CARD]
    running = {
        **_entry(request),
        "expires_at": "9999-12-31T23:59:59Z",  # kept loaded for as long as the daemon runs
        "size_vram": 0,
        "context_length": card.context_length,
    }
    return web.json_response({"models": [running]})


async def show(request: web.Request) -> web.Response:
    body = _object(await read_json(request))
    name = body.get("model", body.get("name"))  # "name" is the older spelling
    card = request.app[CARD]
    _check_model(card, name)
    engine = request.app[ENGINE]
    arch = card.architecture or "unknown"
    info = {
        "general.architecture": arch,
        "general.parameter_count": card.parameters,
        "general.quantization": card.quantization,
        f"{arch}.context_length": card.context_length,
        f"{arch}.block_count": card.n_layers,
    }
    template = getattr(engine.tokenizer, "chat_template", None)
    return web.json_response(
        {
            "license": "",
            "modelfile": f"# served by meshd over its mesh\nFROM {card.name}\n",
            "parameters": "\n".join(f"{k} {v}" for k, v in DEFAULTS.items()),
            "template": template if isinstance(template, str) else "",
            "details": _details(card),
            "model_info": info,
            "capabilities": ["completion"],
            "modified_at": _stamp(engine.started),
        }
    )


# ---- generation ---------------------------------------------------------------------------
def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    return body


def _check_model(card: ModelCard, name: Any) -> str:
    """The requested name; Ollama's default tag ``:latest`` is implied, so ``smol:latest`` is ``smol``."""
    if not isinstance(name, str) or not name:
        raise invalid("model", "model is required")
    if not (card.accepts(name) or (name.endswith(":latest") and card.accepts(name.removesuffix(":latest")))):
        raise ApiError(404, f"model '{name}' not found: this mesh serves {card.served()} (see /api/tags)")
    return name


def _options(options: Any) -> dict[str, Any]:
    """Ollama's ``options`` as the OpenAI-style fields ``apischema`` checks."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise invalid("options", "options must be an object")
    out: dict[str, Any] = dict(DEFAULTS)
    for key, value in options.items():
        if key in SAMPLING_OPTIONS:
            out[SAMPLING_OPTIONS[key]] = value
        elif key in NEUTRAL_OPTIONS:
            if not NEUTRAL_OPTIONS[key](value):
                raise invalid(f"options.{key}", f"option {key}={value!r} is not supported by meshd")
        elif key not in RUNNER_OPTIONS:
            raise invalid(f"options.{key}", f"unknown option {key!r}")
    n = out.get("max_tokens")
    if isinstance(n, int) and not isinstance(n, bool) and n < 0:  # -1: until done, -2: fill the context
        del out["max_tokens"]
    return out


def _common(body: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """Fields both generation routes share, checked; returns the OpenAI-style sampling fields."""
    for key in body:
        if key not in allowed:
            raise invalid(key, f"unknown field {key!r}")
    if body.get("format") not in (None, ""):
        raise invalid("format", "structured output (format) is not supported by meshd")
    if body.get("think") not in (None, False):
        raise invalid("think", "this model does not think out loud (think)")
    if body.get("tools"):
        raise invalid("tools", "tool calling is not supported by meshd")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid("stream", "stream must be true or false")
    fields = _options(body.get("options"))
    fields["stream"] = stream
    return fields


def _renamed(err: ApiError) -> ApiError:
    """A check made under the OpenAI name, told with Ollama's."""
    back = {v: k for k, v in SAMPLING_OPTIONS.items()}
    if err.param in back:
        err.message = err.message.replace(f"`{err.param}`", f"`options.{back[err.param]}`")
    return err


LOGPROBS = {"logprobs", "top_logprobs"}


def _chat_request(body: dict[str, Any], context: int) -> CompletionRequest:
    fields = _common(
        body, {"model", "messages", "stream", "options", "format", "keep_alive", "tools", "think"} | LOGPROBS
    )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages", "messages must be an array")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("images"):
            raise invalid(f"messages[{i}].images", "this model reads text only (images)")
    clean = [{k: v for k, v in m.items() if k in ("role", "content")} if isinstance(m, dict) else m for m in messages]
    try:
        req = parse_chat({**fields, "messages": clean}, context)
        req.logprobs = logprobs_switch(body.get("logprobs"), body.get("top_logprobs"))
    except ApiError as err:
        raise _renamed(err) from None
    return req


GENERATE_FIELDS = {"model", "prompt", "suffix", "system", "template", "context", "raw", "stream", "options"}


def _generate_request(body: dict[str, Any], context: int, chat_template: bool) -> tuple[CompletionRequest, list[int]]:
    """The request, and the token ids of an earlier exchange it continues (Ollama's ``context``)."""
    fields = _common(body, GENERATE_FIELDS | {"format", "keep_alive", "images", "think", "tools"} | LOGPROBS)
    if body.get("images"):
        raise invalid("images", "this model reads text only (images)")
    if body.get("suffix") not in (None, ""):
        raise invalid("suffix", "fill-in-the-middle (suffix) is not supported by meshd")
    if body.get("template") not in (None, ""):
        raise invalid("template", "a custom template is not supported: meshd uses the model's chat template")
    before = body.get("context") or []
    if not isinstance(before, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in before):
        raise invalid("context", "context must be the token ids a previous response returned")
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise invalid("prompt", "prompt and system must be strings")
    raw = body.get("raw", False)
    try:
        if raw or not chat_template:
            req = parse_completion({**fields, "prompt": prompt}, context)
        else:  # Ollama applies the model's template to the prompt (and the system message)
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            req = parse_chat({**fields, "messages": msgs}, context)
        req.logprobs = logprobs_switch(body.get("logprobs"), body.get("top_logprobs"))
    except ApiError as err:
        raise _renamed(err) from None
    return req, before


async def chat(request: web.Request) -> web.StreamResponse:
    body = _object(await read_json(request))
    name = _check_model(request.app[CARD], body.get("model"))
    req = _chat_request(body, request.app[ENGINE].max_context)
    return await _run(request, req, name, [], chat=True)


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = _object(await read_json(request))
    name = _check_model(request.app[CARD], body.get("model"))
    req, before = _generate_request(body, engine.max_context, has_chat_template(engine.tokenizer))
    if not body.get("prompt") and not before:  # Ollama's way to ask that a model be loaded: it is
        return web.json_response(
            {"model": name, "created_at": _stamp(), "response": "", "done": True, "done_reason": "load"}
        )
    return await _run(request, req, name, before, chat=False)


async def _run(
    request: web.Request, req: CompletionRequest, name: str, before: list[int], *, chat: bool
) -> web.StreamResponse:
    started = time.perf_counter()
    # Ollama generates until the model stops; meshd bounds it as its chat API does
    gen = await start_generation(request, req, before=before, default_max_tokens=DEFAULT_CHAT_MAX_TOKENS)
    handle, prompt_ids = gen.handle, gen.prompt_ids
    timing = _Timing(started)

    def piece(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": name, "created_at": _stamp()}
        out.update({"message": {"role": "assistant", "content": text}} if chat else {"response": text})
        lp = gen.logprobs("chat")  # Ollama's entries are chat's: token, logprob, bytes, top_logprobs
        if lp is not None:
            out["logprobs"] = lp["content"]
        return out

    def final(text: str) -> dict[str, Any]:
        out = piece(text)
        out.update(done=True, done_reason=gen.finish_reason, **timing.counts(handle.prompt_tokens, gen))
        if not chat:
            out["context"] = prompt_ids + list(gen.text.token_ids)
        return out

    if not req.stream:
        async with contextlib.aclosing(gen.deltas()) as deltas:
            async for _ in deltas:
                timing.token()
        if gen.disconnected:
            return web.Response(status=499)
        if gen.error is not None:
            raise ApiError(503, f"generation failed: {gen.error}", headers={"Retry-After": "2"})
        return web.json_response(final(gen.text.text), dumps=_dumps)

    resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    state = request.app[STATE]
    state.streams_active += 1
    try:
        await resp.prepare(request)
        async with contextlib.aclosing(gen.deltas()) as deltas:
            async for delta in deltas:
                timing.token()
                await resp.write((_dumps({**piece(delta), "done": False}) + "\n").encode())
        if gen.disconnected:
            return resp
        last = {"error": f"generation failed: {gen.error}"} if gen.error is not None else final("")
        await resp.write((_dumps(last) + "\n").encode())
        await resp.write_eof()
    except ConnectionError:
        state.disconnects += 1
    finally:
        state.streams_active -= 1
        await gen.cancel_if_running()
    return resp


class _Timing:
    """Ollama's durations, in nanoseconds: the prompt's up to the first token, the answer's after it."""

    def __init__(self, started: float):
        self.started, self.first = started, None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def counts(self, prompt_tokens: int, gen: Generation) -> dict[str, int]:
        now = time.perf_counter()
        first = self.first or now
        return {
            "total_duration": int((now - self.started) * 1e9),
            "load_duration": 0,  # the mesh keeps the model loaded
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": int((first - self.started) * 1e9),
            "eval_count": len(gen.text.token_ids),
            "eval_duration": int((now - first) * 1e9),
        }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
