"""Request bodies of the OpenAI-compatible API, validated strictly into one typed object.

Why strict: a silently ignored parameter is a wrong answer the user cannot see (asking for
``n=3`` or ``logit_bias`` and getting something else). So every field is type- and
range-checked, fields meshd does not implement are accepted only at their neutral value, and
unknown fields are refused, each with an OpenAI-style error naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshd.modes import MESH_DEFAULT, MESH_MODES
from models.verify import Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4
MAX_STOP_BYTES = 1024
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI bounds it
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound on logprobs
DEFAULT_CHAT_MAX_TOKENS = 1024  # chat: "until the model stops", bounded so one request cannot hog the ring
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the legacy completions API's documented default
OPENAI_SAMPLING = Sampling(temperature=1.0, top_p=1.0)  # OpenAI's defaults when a body names neither


class ApiError(Exception):
    """An error the client caused or must know about, rendered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class CompletionRequest:
    """Everything meshd needs from a chat or completion body, already checked."""

    kind: str  # "chat" | "completion"
    model: str | None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: the endpoint's default, bounded by the context left
    sampling: Sampling = OPENAI_SAMPLING
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    mode: str = MESH_DEFAULT
    logprobs: int | None = None  # None: none; else each token's log-probability and this many alternatives
    prefix_cache: bool = True  # meshd's extension: false neither reuses nor keeps this request's prefix at the stages


# Parameters OpenAI defines that meshd does not implement: accepted only at their neutral value.
def _none_or(*values: Any):
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


_INERT = {
    "logit_bias": lambda v: v is None or v == {},
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v is None or v == [],
    "tool_choice": _none_or("none", "auto"),
    "functions": lambda v: v is None or v == [],
    "function_call": _none_or("none", "auto"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "store": lambda v: v is None or isinstance(v, bool),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "service_tier": _none_or("auto", "default"),
    "user": lambda v: v is None or isinstance(v, str),
    "modalities": lambda v: v is None or v == ["text"],
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None,
    "best_of": lambda v: v is None or (_is_int(v) and v == 1),
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "mode",
    "prefix_cache",
    # sampling parameters local-model servers (llama.cpp, vLLM, Ollama) take beside OpenAI's
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
}
_CHAT_INERT = set(_INERT) - {"echo", "suffix", "best_of"}
_COMPLETION_INERT = {
    "logit_bias",
    "user",
    "echo",
    "suffix",
    "best_of",
    "metadata",
    "store",
    "service_tier",
}


def parse_chat(body: Any, max_context: int) -> CompletionRequest:
    """A ``POST /v1/chat/completions`` body."""
    obj = _object(body)
    _check_keys(obj, _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}, _CHAT_INERT)
    req = _common(obj, "chat", max_context)
    req.messages = _messages(obj.get("messages"))
    req.logprobs = logprobs_switch(obj.get("logprobs"), obj.get("top_logprobs"))
    mct = obj.get("max_completion_tokens")
    if mct is not None:
        mct = _max_tokens("max_completion_tokens", mct, max_context)
        if req.max_tokens is not None and req.max_tokens != mct:
            raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send only one")
        req.max_tokens = mct
    return req


def parse_completion(body: Any, max_context: int) -> CompletionRequest:
    """A ``POST /v1/completions`` body."""
    obj = _object(body)
    _check_keys(obj, _COMMON | {"prompt", "logprobs"}, _COMPLETION_INERT)
    req = _common(obj, "completion", max_context)
    req.prompt = _prompt(obj.get("prompt", _MISSING))
    lp = obj.get("logprobs")
    if lp is not None:
        req.logprobs = _int(lp, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return req


# ---- pieces --------------------------------------------------------------------------------
_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _type_name(v: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, not {_type_name(body)}", "invalid_type")
    return body


def _check_keys(obj: dict[str, Any], supported: set[str], inert: set[str]) -> None:
    for key, value in obj.items():
        if key in supported:
            continue
        if key in inert:
            if not _INERT[key](value):
                raise invalid(
                    key,
                    f"`{key}` is not supported by meshd (only its default value is accepted)",
                    "unsupported_parameter",
                )
            continue
        raise invalid(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")


def _common(obj: dict[str, Any], kind: str, max_context: int) -> CompletionRequest:
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"`model` must be a string, not {_type_name(model)}", "invalid_type")
    req = CompletionRequest(kind=kind, model=model)
    if obj.get("max_tokens") is not None:
        req.max_tokens = _max_tokens("max_tokens", obj["max_tokens"], max_context)
    top_k = obj.get("top_k")
    req.sampling = Sampling(
        temperature=_number(obj, "temperature", OPENAI_SAMPLING.temperature, lo=0.0, hi=2.0),
        top_p=_number(obj, "top_p", OPENAI_SAMPLING.top_p, lo=0.0, hi=1.0, lo_open=True),
        top_k=max(0, _int(top_k, "top_k", -1, 1 << 20)) if top_k is not None else 0,  # -1 and 0: off (vLLM, llama.cpp)
        min_p=_number(obj, "min_p", 0.0, lo=0.0, hi=1.0),
        repetition_penalty=_number(obj, "repetition_penalty", 1.0, lo=0.0, hi=2.0, lo_open=True),
        presence_penalty=_number(obj, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=_number(obj, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
    )
    seed = obj.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise invalid("seed", f"`seed` must be an integer, not {_type_name(seed)}", "invalid_type")
        if not -(2**63) <= seed < 2**64:
            raise invalid("seed", "`seed` must fit in 64 bits")
        req.seed = seed
    req.stop = _stop(obj.get("stop"))
    n = obj.get("n")
    if n is not None:
        if not _is_int(n):
            raise invalid("n", f"`n` must be an integer, not {_type_name(n)}", "invalid_type")
        if n != 1:
            raise invalid("n", f"n={n} is not supported: meshd returns exactly one choice (n=1)", "unsupported_value")
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", f"`stream` must be a boolean, not {_type_name(stream)}", "invalid_type")
    req.stream = bool(stream)
    opts = obj.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise invalid("stream_options", "`stream_options` must be an object with `include_usage` (boolean)")
        if not req.stream:
            raise invalid("stream_options", "`stream_options` is only allowed when `stream` is true")
        usage = opts.get("include_usage", False)
        if not isinstance(usage, bool):
            raise invalid("stream_options.include_usage", "`include_usage` must be a boolean", "invalid_type")
        req.include_usage = usage
    mode = obj.get("mode")
    if mode is not None:
        if mode not in MESH_MODES:
            hint = ": a daemon runs `meshd generate`'s single-device `spec` through its ring as `flow`"
            raise invalid(
                "mode", f"`mode` must be one of {', '.join(MESH_MODES)} (got {mode!r}){hint if mode == 'spec' else ''}"
            )
        req.mode = mode
    cache = obj.get("prefix_cache")
    if cache is not None:
        if not isinstance(cache, bool):
            raise invalid("prefix_cache", "`prefix_cache` must be a boolean", "invalid_type")
        req.prefix_cache = cache
    return req


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if not _is_int(v):
        raise invalid(name, f"`{name}` must be an integer, not {_type_name(v)}", "invalid_type")
    if not lo <= v <= hi:
        raise invalid(name, f"`{name}` must be between {lo} and {hi} (got {v})")
    return v


def logprobs_switch(logprobs: Any, top: Any) -> int | None:
    """Chat's pair (Ollama's too): ``logprobs`` (boolean) switches them on, ``top_logprobs`` asks for
    alternatives; returns ``CompletionRequest.logprobs``."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid("logprobs", f"`logprobs` must be a boolean, not {_type_name(logprobs)}", "invalid_type")
    if top is None:
        return 0 if logprobs else None
    top = _int(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if not logprobs:
        if top == 0:  # the neutral value some clients always send
            return None
        raise invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true")
    return top


def _max_tokens(name: str, v: Any, max_context: int) -> int:
    if not _is_int(v):
        raise invalid(name, f"`{name}` must be an integer, not {_type_name(v)}", "invalid_type")
    if not 1 <= v <= max_context:
        raise invalid(name, f"`{name}` must be between 1 and the context length {max_context} (got {v})")
    return v


def _number(obj: dict[str, Any], name: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
    v = obj.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid(name, f"`{name}` must be a number, not {_type_name(v)}", "invalid_type")
    if (v <= lo if lo_open else v < lo) or v > hi:
        rng = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise invalid(name, f"`{name}` must be in {rng} (got {v})")
    return float(v)


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "`stop` must be a string or an array of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop sequences are allowed (got {len(stops)})")
    if any(s == "" for s in stops):
        raise invalid("stop", "stop sequences must not be empty")
    size = sum(len(s.encode()) for s in stops)
    if size > MAX_STOP_BYTES:  # every new token is matched against them on the event loop
        raise invalid("stop", f"stop sequences may total {MAX_STOP_BYTES} bytes of UTF-8 (got {size})")
    return list(stops)


def _messages(v: Any) -> list[dict[str, str]]:
    if v is None:
        raise invalid("messages", "`messages` is required", "missing_required_parameter")
    if not isinstance(v, list):
        raise invalid("messages", f"`messages` must be an array, not {_type_name(v)}", "invalid_type")
    if not v:
        raise invalid("messages", "`messages` must contain at least one message")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"{where} must be an object, not {_type_name(m)}", "invalid_type")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(
                f"{where}.{sorted(extra)[0]}",
                f"{where} has unsupported field(s) {sorted(extra)}: meshd takes role, content and name",
                "unsupported_parameter",
            )
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise invalid(f"{where}.name", f"{where}.name must be a string", "invalid_type")
        out.append({"role": ROLES[role], "content": _content(m.get("content", _MISSING), where)})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if c is _MISSING or c is None:
        raise invalid(f"{where}.content", f"{where}.content is required", "missing_required_parameter")
    if isinstance(c, list):  # content parts: only text
        texts = []
        for j, part in enumerate(c):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(
                    f"{where}.content[{j}]",
                    f"{where}.content[{j}] must be a text part "
                    '({"type": "text", "text": "..."}); this model reads text only',
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{where}.content", f"{where}.content must be a string, not {_type_name(c)}", "invalid_type")


def _prompt(v: Any) -> str:
    if v is _MISSING or v is None:
        raise invalid("prompt", "`prompt` is required", "missing_required_parameter")
    if isinstance(v, str):
        return v
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return v[0]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        raise invalid(
            "prompt",
            f"batched prompts are not supported: send one prompt per request (got {len(v)})",
            "unsupported_value",
        )
    raise invalid("prompt", "`prompt` must be a string or an array of one string", "invalid_type")
