"""Ollama's API (``meshd.serve.ollama``) against the fake runtime: the official ``ollama`` client for
every route, NDJSON framing, option mapping, errors in Ollama's shape, and the API key."""

from __future__ import annotations

import json

import aiohttp
import ollama
import pytest
from support import REPLY, fake_logprobs, serve

from meshd.serve.api import create_app
from meshd.serve.modelcard import ModelCard, build_card
from models.text import encode_messages
from models.verify import Sampling

pytestmark = pytest.mark.timeout(60)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def card(embedded_source) -> ModelCard:
    return build_card(embedded_source, dtype="fp32", context_length=2048, served_name="smol")


@pytest.fixture
async def ourl(rt, card):
    async with serve(create_app(rt, card=card)) as u:
        yield u


async def test_listing_routes(rt, ourl, card):
    client = ollama.AsyncClient(host=ourl)
    (m,) = (await client.list()).models
    assert (m.model, m.size, m.digest) == ("smol", card.size, card.fingerprint)
    d = m.details
    assert (d.format, d.family, d.parameter_size, d.quantization_level) == ("gguf", "llama", "135M", "Q4_1")
    (running,) = (await client.ps()).models
    assert running.model == "smol" and running.context_length == 2048
    rt.not_ready = "waiting for peers"
    assert (await client.ps()).models == []  # nothing runs without a committed plan
    shown = await client.show("default")  # an alias works everywhere
    assert shown.modelinfo["llama.block_count"] == 30 and shown.modelinfo["llama.context_length"] == 2048
    assert shown.template == rt.tokenizer.chat_template and shown.capabilities == ["completion"]
    async with aiohttp.ClientSession() as s, s.get(ourl + "/api/version") as r:
        assert (await r.json())["version"]


async def test_chat_whole_and_streamed(rt, ourl, embedded_tokenizer):
    client = ollama.AsyncClient(host=ourl)
    resp = await client.chat(model="smol:latest", messages=HI, stream=False)
    assert resp.message.role == "assistant" and resp.message.content == REPLY
    assert resp.done and resp.done_reason == "stop" and resp.model == "smol:latest"
    prompt_ids, params = rt.submitted[-1]
    assert prompt_ids == encode_messages(embedded_tokenizer, HI)
    assert (resp.prompt_eval_count, resp.eval_count) == (len(prompt_ids), len(rt.reply_ids))
    assert resp.total_duration >= resp.prompt_eval_duration + resp.eval_duration > 0
    assert params.sampling == Sampling(0.8, 0.9, top_k=40)  # Ollama's defaults
    parts = [p async for p in await client.chat(model="smol", messages=HI, stream=True)]
    assert "".join(p.message.content for p in parts) == REPLY
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].message.content == "" and parts[-1].eval_count == len(rt.reply_ids)


async def test_options_map_to_sampling(rt, ourl):
    client = ollama.AsyncClient(host=ourl)
    opts = {
        "temperature": 0.5,
        "top_k": 7,
        "top_p": 0.8,
        "min_p": 0.05,
        "repeat_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.1,
        "seed": 11,
        "num_predict": 5,
        "num_ctx": 4096,
        "stop": ["STOP"],
    }
    resp = await client.chat(model="smol", messages=HI, options=opts)
    params = rt.submitted[-1][1]
    assert params.sampling == Sampling(0.5, 0.8, 7, 0.05, 1.2, 0.3, 0.1)
    assert (params.seed, params.max_tokens, resp.eval_count, resp.done_reason) == (11, 5, 5, "length")
    resp = await client.chat(model="smol", messages=HI, options={"stop": ["STOP"], "num_predict": -1})
    assert resp.message.content == REPLY[: REPLY.index("STOP")] and resp.done_reason == "stop"


async def test_generate_with_context_and_load(rt, ourl, embedded_tokenizer):
    client = ollama.AsyncClient(host=ourl)
    first = await client.generate(model="smol", prompt="hi", options={"num_predict": 4})
    sent = rt.submitted[-1][0]
    assert first.response == embedded_tokenizer.decode(rt.reply_ids[:4])
    assert first.context == sent + rt.reply_ids[:4]  # what a follow-up sends back to continue
    await client.generate(model="smol", prompt="more", context=first.context, options={"num_predict": 2})
    assert rt.submitted[-1][0][: len(first.context)] == first.context
    raw = await client.generate(model="smol", prompt="Once", raw=True, options={"num_predict": 2})
    assert rt.submitted[-1][0] == embedded_tokenizer("Once")["input_ids"] and raw.eval_count == 2
    n = len(rt.submitted)
    loaded = await client.generate(model="smol", prompt="")
    assert loaded.done and loaded.done_reason == "load" and len(rt.submitted) == n


async def test_stream_is_ndjson(ourl):
    async with aiohttp.ClientSession() as s:
        body = {"model": "smol", "prompt": "hi", "options": {"num_predict": 6}}
        async with s.post(ourl + "/api/generate", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/x-ndjson"
            raw = (await r.read()).decode()
    lines = raw.split("\n")
    assert lines[-1] == "" and all(lines[:-1])
    objs = [json.loads(x) for x in lines[:-1]]
    assert all(not o["done"] for o in objs[:-1]) and objs[-1]["done"] and objs[-1]["eval_count"] == 6


async def test_logprobs_whole_and_streamed(rt, ourl):
    client = ollama.AsyncClient(host=ourl)
    whole = await client.chat(model="smol", messages=HI, logprobs=True, top_logprobs=2)
    assert rt.submitted[-1][1].logprobs == 2
    assert [(e.logprob, len(e.top_logprobs)) for e in whole.logprobs] == [
        (fake_logprobs(t, i, 2).logprob, 2) for i, t in enumerate(rt.reply_ids)
    ]
    parts = [p async for p in await client.generate(model="smol", prompt="hi", logprobs=True, stream=True)]
    streamed = [e for p in parts for e in (p.logprobs or [])]
    assert [e.logprob for e in streamed] == [fake_logprobs(t, i, 0).logprob for i, t in enumerate(rt.reply_ids)]
    plain = await client.chat(model="smol", messages=HI)
    assert plain.logprobs is None


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/api/chat", {"model": "gpt-4", "messages": HI}, 404, "model 'gpt-4' not found: this mesh serves `smol`"),
        ("/api/chat", {"messages": HI}, 400, "model is required"),
        ("/api/chat", {"model": "smol", "messages": HI, "options": {"mirostat": 2}}, 400, "mirostat=2"),
        ("/api/chat", {"model": "smol", "messages": HI, "options": {"repeat_last_n": 64}}, 400, "repeat_last_n"),
        ("/api/chat", {"model": "smol", "messages": HI, "options": {"bogus": 1}}, 400, "unknown option 'bogus'"),
        ("/api/chat", {"model": "smol", "messages": HI, "options": {"top_p": 2}}, 400, "`options.top_p` must be"),
        ("/api/chat", {"model": "smol", "messages": HI, "format": "json"}, 400, "format"),
        (
            "/api/chat",
            {"model": "smol", "messages": [{"role": "user", "content": "x", "images": ["AA"]}]},
            400,
            "images",
        ),
        ("/api/generate", {"model": "smol", "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ("/api/generate", {"model": "smol", "prompt": "x", "context": ["a"]}, 400, "context"),
        ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
    ],
)
async def test_errors_in_ollamas_shape(rt, ourl, path, body, status, needle):
    async with aiohttp.ClientSession() as s, s.post(ourl + path, json=body) as r:
        got = await r.json()
    assert r.status == status and set(got) == {"error"} and needle in got["error"], got
    assert rt.submitted == []


async def test_api_key_guards_the_ollama_routes(rt, card):
    async with serve(create_app(rt, api_key="s3cret", card=card)) as u:
        with pytest.raises(ollama.ResponseError) as exc:
            await ollama.AsyncClient(host=u).list()
        assert exc.value.status_code == 401
        client = ollama.AsyncClient(host=u, headers={"Authorization": "Bearer s3cret"})
        assert (await client.list()).models[0].model == "smol"
