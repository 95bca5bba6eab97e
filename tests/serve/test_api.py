"""The REST API against a fake runtime with the real tokenizer: the official ``openai`` client,
SSE framing, stop strings, UTF-8 safety, validation, auth, disconnects, metrics."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import openai
import pytest
from support import REPLY, FakeRuntime, serve, solo_runtime

from meshd.modes import MESH_MODES
from meshd.serve.api import create_app
from models.drafters import drafter_factory
from models.engine import generate
from models.text import encode_messages, stop_ids

pytestmark = pytest.mark.timeout(60)


def oai(url: str, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


async def post(url: str, path: str, body, **kw) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body, **kw) as r:
        return r.status, await r.json(content_type=None)


async def sse_events(url: str, path: str, body) -> list[str]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    return [e[len("data: ") :] for e in events[:-1]]


# ---- the official client --------------------------------------------------------------------
async def test_openai_chat_non_streaming(rt, url, embedded_tokenizer):
    client = oai(url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    resp = await client.chat.completions.create(
        model=rt.model_name, messages=msgs, max_tokens=500, temperature=0, seed=7, extra_body={"mode": "chunk"}
    )
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    prompt_ids, params = rt.submitted[-1]
    assert prompt_ids == encode_messages(embedded_tokenizer, msgs)
    assert (params.max_tokens, params.sampling.temperature, params.seed, params.mode) == (500, 0.0, 7, "chunk")
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(rt.reply_ids)
    assert resp.usage.total_tokens == len(prompt_ids) + len(rt.reply_ids)
    stats = resp.model_extra["meshd"]
    assert stats["token_ids"] == rt.reply_ids
    assert stats["mode"] == "chunk" and stats["new_tokens"] == len(rt.reply_ids)
    assert stats["rounds"] == -(-len(rt.reply_ids) // 3) and stats["mean_accepted"] > 2.5
    assert {"seconds", "tokens_per_s", "target_forwards"} <= set(stats)
    assert stats["first_token_seconds"] > 0  # the server's time to first token


async def test_openai_chat_streaming_is_the_same_answer(rt, url):
    client = oai(url)
    msgs = [{"role": "user", "content": "Say hello."}]
    whole = await client.chat.completions.create(model=rt.model_name, messages=msgs)
    stream = await client.chat.completions.create(
        model=rt.model_name, messages=msgs, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert finals[0].model_extra["meshd"]["token_ids"] == rt.reply_ids
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(rt.reply_ids)
    assert len({c.id for c in chunks}) == 1


async def test_openai_completions_both_ways(rt, url):
    client = oai(url)
    resp = await client.completions.create(model=rt.model_name, prompt="Once upon a time", max_tokens=8)
    assert resp.object == "text_completion" and resp.choices[0].finish_reason == "length"
    assert resp.choices[0].text == rt.tokenizer.decode(rt.reply_ids[:8])
    assert rt.submitted[-1][1].max_tokens == 8
    stream = await client.completions.create(
        model=rt.model_name, prompt=["Once upon a time"], max_tokens=8, stream=True
    )
    parts = [c async for c in stream]
    assert "".join(c.choices[0].text for c in parts) == resp.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    default = await client.completions.create(model=rt.model_name, prompt="x")
    assert default.usage.completion_tokens == 16  # the legacy endpoint's documented default


async def test_models_endpoint(rt, url):
    client = oai(url)
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [rt.model_name]
    assert (await client.models.retrieve(rt.model_name)).id == rt.model_name
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4")


# ---- streaming details ----------------------------------------------------------------------
async def test_sse_framing_and_done(url):
    events = await sse_events(
        url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[-1]["choices"][0]["finish_reason"] == "stop" and objs[-1]["choices"][0]["delta"] == {}
    assert objs[-1]["usage"]["completion_tokens"] > 0 and "meshd" in objs[-1]
    assert all(o["choices"][0]["finish_reason"] is None for o in objs[:-1])


async def test_stream_never_emits_broken_utf8(rt, embedded_tokenizer):
    rt.chunk = 1  # one token per chunk: multi-byte characters arrive in pieces
    ids = rt.reply_ids
    assert any("\ufffd" in embedded_tokenizer.decode(ids[:n]) for n in range(1, len(ids)))  # the test bites
    async with serve(create_app(rt)) as url:
        events = await sse_events(url, "/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 200})
    deltas = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == REPLY


async def test_max_tokens_cutting_a_character_in_half_sends_no_replacement_char(rt, embedded_tokenizer):
    ids = rt.reply_ids
    n = next(n for n in range(1, len(ids)) if embedded_tokenizer.decode(ids[:n]).endswith("\ufffd"))
    async with serve(create_app(rt)) as url:
        status, whole = await post(url, "/v1/completions", {"prompt": "x", "max_tokens": n})
        events = await sse_events(url, "/v1/completions", {"prompt": "x", "max_tokens": n, "stream": True})
    text = whole["choices"][0]["text"]
    assert status == 200 and "\ufffd" not in text and REPLY.startswith(text)
    assert whole["choices"][0]["finish_reason"] == "length" and len(whole["meshd"]["token_ids"]) == n
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text


@pytest.mark.parametrize("stop", ["STOP", ["zzz", "STOP here"], [" end is"]])
async def test_stop_strings_cut_and_hold_back(rt, stop, embedded_tokenizer):
    rt.chunk, rt.delay = 1, 0.002  # still generating when the stop string shows up
    async with serve(create_app(rt)) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "stop": stop, "max_tokens": 200}
        status, whole = await post(url, "/v1/chat/completions", body)
        events = await sse_events(url, "/v1/chat/completions", {**body, "stream": True})
        await asyncio.sleep(0.05)
    first = min(REPLY.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in REPLY)
    assert status == 200
    assert whole["choices"][0]["message"]["content"] == REPLY[:first]
    assert whole["choices"][0]["finish_reason"] == "stop"
    ids = whole["meshd"]["token_ids"]
    assert whole["usage"]["completion_tokens"] == len(ids) < len(rt.reply_ids)
    assert REPLY[first : first + 4] in embedded_tokenizer.decode(ids)  # the token completing the stop is counted
    objs = [json.loads(e) for e in events[:-1]]
    streamed = [o["choices"][0]["delta"].get("content", "") for o in objs]
    assert "".join(streamed) == REPLY[:first]
    assert objs[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(rt.cancelled) == 2  # the ring stopped working on both requests at the stop string


async def test_generation_error_mid_stream_and_whole(rt, url):
    rt.fail_after = 6
    client = oai(url)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIError, match="lost the link to peer b3"):
        stream = await client.chat.completions.create(model=rt.model_name, messages=msgs, stream=True)
        async for _ in stream:
            pass
    status, body = await post(url, "/v1/chat/completions", {"messages": msgs})
    assert status == 503 and "lost the link" in body["error"]["message"]
    assert body["error"]["code"] == "generation_failed"


# ---- cancellation ---------------------------------------------------------------------------
async def test_client_disconnect_mid_stream_cancels(rt, url):
    rt.delay, rt.chunk = 0.05, 1
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        await resp.content.readline()
        await resp.content.readline()
        resp.close()  # drop the connection mid-stream
    for _ in range(50):
        if rt.cancelled:
            break
        await asyncio.sleep(0.05)
    assert rt.cancelled == ["1"] and rt.in_flight() == 0
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert "meshd_api_client_disconnects_total 1" in await r.text()


async def test_client_disconnect_while_waiting_for_whole_answer_cancels(rt, url):
    rt.delay = 0.2
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
                timeout=aiohttp.ClientTimeout(total=0.3),
            )
    for _ in range(40):
        if rt.cancelled:
            break
        await asyncio.sleep(0.05)
    assert rt.cancelled == ["1"]


# ---- validation -----------------------------------------------------------------------------
MSG = [{"role": "user", "content": "hi"}]
BAD_CHAT = [
    ({"messages": MSG, "max_tokens": "10"}, "max_tokens"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": MSG, "max_tokens": True}, "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"messages": MSG, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"messages": MSG, "temperature": 2.5}, "temperature"),
    ({"messages": MSG, "temperature": -0.1}, "temperature"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "top_p": 1.01}, "top_p"),
    ({"messages": MSG, "seed": 1.5}, "seed"),
    ({"messages": MSG, "n": 2}, "n"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "stop": 5}, "stop"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSG, "mode": "turbo"}, "mode"),
    ({"messages": MSG, "logprobs": "yes"}, "logprobs"),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MSG, "top_k": 1.5}, "top_k"),
    ({"messages": MSG, "top_k": -2}, "top_k"),
    ({"messages": MSG, "min_p": 1.5}, "min_p"),
    ({"messages": MSG, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": MSG, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": MSG, "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"messages": MSG, "logit_bias": {"5": 1}}, "logit_bias"),
    ({"messages": MSG, "frobnicate": 1}, "frobnicate"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [MSG[0], "oops"]}, "messages[1]"),
    ({"messages": MSG, "model": 3}, "model"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
async def test_bad_chat_bodies_are_400_naming_the_parameter(url, body, param):
    status, resp = await post(url, "/v1/chat/completions", body)
    assert status == 400, resp
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "messages": MSG}, "messages"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": "a", "logprobs": 6}, "logprobs"),
        ({"prompt": "a", "logprobs": True}, "logprobs"),
        ({"prompt": "a", "min_p": -0.1}, "min_p"),
    ],
)
async def test_bad_completion_bodies(url, body, param):
    status, resp = await post(url, "/v1/completions", body)
    assert status == 400 and resp["error"]["param"] == param


async def test_spec_mode_is_refused_with_its_mesh_name(url):
    status, resp = await post(url, "/v1/chat/completions", {"messages": MSG, "mode": "spec"})
    assert status == 400 and resp["error"]["param"] == "mode"
    assert "one of flow, chunk, ar (got 'spec')" in resp["error"]["message"] and "as `flow`" in resp["error"]["message"]


async def test_accepted_variants(rt, url):
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "hi", "name": "ann"},
        ],
        "max_completion_tokens": 4,
        "top_p": 0.5,
        "temperature": 2,
        "stop": None,
        "n": 1,
        "user": "u1",
        "presence_penalty": 0,
        "logprobs": False,
        "mode": "ar",
    }
    status, resp = await post(url, "/v1/chat/completions", body)
    assert status == 200 and resp["choices"][0]["finish_reason"] == "length"
    p = rt.submitted[-1][1]
    assert (p.max_tokens, p.sampling.top_p, p.sampling.temperature, p.mode) == (4, 0.5, 2.0, "ar")


async def test_malformed_json_and_non_objects(url):
    async with aiohttp.ClientSession() as s:
        for data in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"null"):
            async with s.post(
                url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
            ) as r:
                assert r.status == 400, data
                assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_big_body_is_413_and_daemon_keeps_serving(url):
    big = {"messages": [{"role": "user", "content": "x" * (10 << 20)}]}
    status, resp = await post(url, "/v1/chat/completions", big)
    assert status == 413 and resp["error"]["code"] == "request_too_large"
    async with aiohttp.ClientSession() as s:  # chunked upload, no Content-Length to check up front

        async def gen():
            for _ in range(20):
                yield b"x" * (1 << 20)

        async with s.post(url + "/v1/completions", data=gen()) as r:
            assert r.status == 413
    status, resp = await post(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 3})
    assert status == 200


async def test_unknown_model_route_and_method(rt, url):
    client = oai(url)
    with pytest.raises(openai.NotFoundError) as exc:
        await client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert exc.value.body["code"] == "model_not_found"
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"
        async with s.get(url + "/v1/chat/completions") as r:
            assert r.status == 405 and (await r.json())["error"]["type"] == "invalid_request_error"
    assert rt.submitted == []


async def test_context_length_exceeded(embedded_tokenizer):
    rt = FakeRuntime(embedded_tokenizer, max_context=64)
    async with serve(create_app(rt)) as url:
        status, resp = await post(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 60})
        assert status == 400 and resp["error"]["code"] == "context_length_exceeded"
        long_prompt = [{"role": "user", "content": "word " * 200}]
        status, resp = await post(url, "/v1/chat/completions", {"messages": long_prompt})
        assert status == 400 and resp["error"]["code"] == "context_length_exceeded"
        status, resp = await post(url, "/v1/chat/completions", {"messages": MSG})  # default fits what is left
        assert status == 200 and rt.submitted[-1][1].max_tokens == 64 - len(rt.submitted[-1][0])


# ---- readiness, auth ------------------------------------------------------------------------
async def test_not_ready_is_503_with_reason(rt, url):
    rt.not_ready = "no committed plan: waiting for peers"
    client = oai(url)
    with pytest.raises(openai.InternalServerError) as exc:
        await client.chat.completions.create(model=rt.model_name, messages=MSG)
    assert exc.value.status_code == 503 and "waiting for peers" in exc.value.message
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        assert r.status == 503 and (await r.json())["reason"] == rt.not_ready
    rt.not_ready = None
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        assert r.status == 200 and (await r.json()) == {"status": "ok"}


async def test_api_key(rt):
    async with serve(create_app(rt, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError):
            await oai(url, "wrong").chat.completions.create(model=rt.model_name, messages=MSG)
        resp = await oai(url, "s3cret").chat.completions.create(model=rt.model_name, messages=MSG, max_tokens=2)
        assert resp.choices[0].finish_reason == "length"
        async with aiohttp.ClientSession() as s:
            for path in ("/v1/models", "/mesh", "/metrics"):
                async with s.get(url + path) as r:
                    assert r.status == 401 and (await r.json())["error"]["code"] == "missing_api_key"
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                async with s.get(url + path, headers={"Authorization": "Bearer s3cret"}) as r:
                    assert r.status == 200
            async with s.get(url + "/health") as r:
                assert r.status == 200


# ---- status and metrics ---------------------------------------------------------------------
async def test_mesh_status_json(rt, url):
    async with aiohttp.ClientSession() as s, s.get(url + "/mesh") as r:
        body = await r.json()
    assert body["plan"]["committed"] is True and body["plan"]["stages"][1]["first_layer"] == 15


SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
    r"(-?[0-9.e+-]+|NaN|[+-]Inf)$"
)


async def test_metrics_prometheus_text(rt, url):
    await oai(url).chat.completions.create(model=rt.model_name, messages=MSG)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json={"messages": 1}) as r:
            assert r.status == 400
        async with s.get(url + "/metrics") as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await r.text()
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in typed and kind in ("counter", "gauge", "histogram")  # histograms: test_metrics.py
            typed[name] = kind
        elif not line.startswith("# HELP "):
            assert SAMPLE.match(line), line
            sample = line.split("{")[0].split(" ")[0]
            family = re.sub(r"_(bucket|count|sum)$", "", sample)
            assert sample in typed or typed.get(family) == "histogram", sample
    assert typed["meshd_requests_total"] == "counter" and typed["meshd_tokens_per_second"] == "gauge"
    assert "meshd_accepted_per_round 2.75" in text
    assert 'meshd_stage_utilisation{node="a1b2",stage="0"} 0.25' in text  # prometheus_client sorts label names
    assert 'meshd_api_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'meshd_api_requests_total{endpoint="/v1/chat/completions",status="400"} 1' in text
    assert "meshd_requests_in_flight 0" in text


# ---- the real runtime -----------------------------------------------------------------------
@pytest.mark.slow
async def test_real_solo_runtime_through_openai_client(embedded_source, embedded, embedded_tokenizer):
    """The API over the real runtime (one-device ring): greedy answers equal plain decoding, streamed
    or not, in every mode; a client that disconnects frees the stage's session."""
    rt = solo_runtime(
        embedded_source, embedded, drafter_factory("ngram", embedded), embedded_tokenizer, max_context=1024
    )
    await rt.start()
    try:
        async with serve(create_app(rt)) as url:
            client = oai(url)
            msgs = [{"role": "user", "content": "Name three primary colours."}]
            prompt = encode_messages(embedded_tokenizer, msgs)
            want = generate(
                embedded, prompt, max_new_tokens=12, mode="ar", eos_ids=stop_ids(embedded_tokenizer, embedded.cfg)
            ).token_ids
            for mode in MESH_MODES:
                resp = await client.chat.completions.create(
                    model=rt.model_name, messages=msgs, max_tokens=12, temperature=0, extra_body={"mode": mode}
                )
                assert resp.model_extra["meshd"]["token_ids"] == want, mode
                assert resp.choices[0].message.content == embedded_tokenizer.decode(want, skip_special_tokens=True)
            stream = await client.chat.completions.create(
                model=rt.model_name, messages=msgs, max_tokens=12, temperature=0, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == resp.choices[0].message.content
            async with aiohttp.ClientSession() as s:
                r = await s.post(
                    url + "/v1/chat/completions",
                    json={"messages": msgs, "stream": True, "max_tokens": 500, "temperature": 0},
                )
                while b'"content":"' not in await r.content.readline():
                    pass
                r.close()
            for _ in range(100):
                if not rt.handles and rt.metrics()["stage_sessions"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert rt.handles == {} and rt.metrics()["stage_sessions"] == 0
    finally:
        await rt.stop()


# ---- a silent stream's comment lines ----------------------------------------------------------
async def raw_stream(url: str, path: str, body: dict) -> list[str]:
    """Every SSE block of a stream as sent (data events and comment lines alike)."""
    async with aiohttp.ClientSession() as s, s.post(url + path, json={**body, "stream": True}) as r:
        assert r.status == 200
        return (await r.read()).decode().split("\n\n")[:-1]


async def test_a_paused_stream_says_so_and_the_openai_client_reads_all_its_text(rt):
    rt.pause_at = (6, 0.6)  # after two chunks the request pauses as on a lost ring, then goes on
    msgs = [{"role": "user", "content": "hi"}]
    async with serve(create_app(rt, idle_comment_s=0.15)) as url:
        blocks = await raw_stream(url, "/v1/chat/completions", {"messages": msgs})
        stream = await oai(url).chat.completions.create(model=rt.model_name, messages=msgs, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    comments = [i for i, b in enumerate(blocks) if b.startswith(":")]
    paused = [i for i in comments if blocks[i].startswith(": paused for") and "re-planning" in blocks[i]]
    assert len(paused) >= 2, blocks  # 0.6 s of pause, a comment every 0.15 s
    # a busy machine may also be slow to send the first chunk: then that wait is said as what it is
    assert all(i in paused or blocks[i].startswith(": still computing") for i in comments), blocks
    assert not any("\n" in blocks[i] for i in comments)
    assert all(b.startswith(("data: ", ": ")) for b in blocks) and blocks[-1] == "data: [DONE]"
    data = {i: json.loads(b[6:]) for i, b in enumerate(blocks[:-1]) if b.startswith("data: ")}
    texts = [i for i, d in data.items() if d["choices"][0]["delta"].get("content")]
    assert texts[0] < paused[0] and paused[-1] < texts[-1]  # the pause came between tokens
    data = list(data.values())
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data) == REPLY
    assert data[-1]["meshd"]["resumed"] == 1
    assert text == REPLY  # the official client skips the comment lines


async def test_a_slow_stream_says_it_is_still_computing(rt):
    rt.delay, rt.chunk = 0.35, 40  # a slow round, not a pause
    async with serve(create_app(rt, idle_comment_s=0.1)) as url:
        blocks = await raw_stream(url, "/v1/completions", {"prompt": "x", "max_tokens": 80})
    comments = [b for b in blocks if b.startswith(":")]
    assert comments and all("still computing: no new text for" in b for b in comments), blocks
    data = [json.loads(b[6:]) for b in blocks[:-1] if b.startswith("data: ")]
    assert "".join(d["choices"][0]["text"] for d in data) == rt.tokenizer.decode(rt.reply_ids[:80])
