"""The API's seam: the daemon's ``Runtime`` and the tests' ``FakeRuntime`` both have every member the
``Engine`` and ``RequestHandle`` protocols name (and the same sync/async shape), so the API tests run
against what the daemon serves."""

from __future__ import annotations

import inspect

from support import FakeRuntime, solo_runtime

from meshd.serve.engine import Engine, GenerateParams, RequestHandle
from models.source import ModelSource
from models.stage import Stage


def members(proto: type) -> dict[str, object]:
    """Name -> the protocol's declaration: annotated attributes (None) and methods (the function)."""
    out: dict[str, object] = dict.fromkeys(inspect.get_annotations(proto))
    for name, value in vars(proto).items():
        # functions written in the protocol's body; the Protocol machinery adds its own (__init__, hooks)
        if inspect.isfunction(value) and value.__qualname__ == f"{proto.__name__}.{name}":
            out[name] = value
    return out


def missing(obj: object, proto: type) -> list[str]:
    """What ``obj`` lacks of ``proto``, or has with the wrong shape (a method, async or not)."""
    wrong = []
    for name, decl in members(proto).items():
        if not hasattr(obj, name):
            wrong.append(f"{name}: missing")
        elif decl is not None:
            have = getattr(obj, name)
            if not callable(have):
                wrong.append(f"{name}: not a method")
            elif inspect.iscoroutinefunction(have) != inspect.iscoroutinefunction(decl):
                wrong.append(f"{name}: {'async' if inspect.iscoroutinefunction(decl) else 'sync'} in the protocol")
    return wrong


def test_protocols_name_what_the_api_uses():
    attrs, methods = {"model_name", "tokenizer", "max_context", "started"}, {"ready", "submit", "status", "metrics"}
    assert set(members(Engine)) == attrs | methods
    attrs = {"request_id", "prompt_tokens", "finish_reason", "error", "stats", "logprobs", "paused_since"}
    methods = {"__aiter__", "cancel"}
    assert set(members(RequestHandle)) == attrs | methods


async def test_fake_runtime_is_an_engine(rt: FakeRuntime):
    assert missing(rt, Engine) == []
    handle = await rt.submit([1, 2, 3], GenerateParams(max_tokens=4))
    assert missing(handle, RequestHandle) == []
    assert [t async for chunk in handle for t in chunk] == rt.reply_ids[:4]


async def test_runtime_is_an_engine(tiny_dir):
    src = ModelSource.resolve(str(tiny_dir))
    rt = solo_runtime(src, Stage.load(src, dtype="fp32"), None)
    assert missing(rt, Engine) == []
    await rt.start()
    try:
        handle = await rt.submit([1, 2, 3], GenerateParams(max_tokens=4, mode="ar"))
        assert missing(handle, RequestHandle) == []
        tokens = [t async for chunk in handle for t in chunk]
        assert handle.finish_reason in ("stop", "length") and len(tokens) == handle.stats.new_tokens > 0
    finally:
        await rt.stop()
