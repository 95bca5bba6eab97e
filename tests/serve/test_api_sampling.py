"""Sampling parameters and log-probabilities through the REST API: what reaches the engine, and
OpenAI's logprobs shapes for chat and completions, whole and streamed, against the fake runtime
(canned tokens, made-up numbers) and, slow, the real runtime (the model's own numbers)."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from support import fake_logprobs, serve, solo_runtime

from meshd.serve.api import create_app
from meshd.serve.textstream import TokenBytes
from models.drafters import drafter_factory
from models.engine import generate
from models.text import encode_messages, encode_prompt, stop_ids
from models.verify import History, Sampling, penalised_logits

pytestmark = pytest.mark.timeout(60)
MSG = [{"role": "user", "content": "hi"}]


def oai(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20)


async def test_sampling_parameters_reach_the_engine(rt, url):
    client = oai(url)
    extra = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}
    await client.chat.completions.create(
        model=rt.model_name,
        messages=MSG,
        max_tokens=2,
        temperature=0.8,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        extra_body=extra,
    )
    assert rt.submitted[-1][1].sampling == Sampling(0.8, 1.0, 40, 0.05, 1.1, 0.5, -0.25)
    await client.completions.create(model=rt.model_name, prompt="x", max_tokens=2, extra_body={"top_k": -1})
    assert rt.submitted[-1][1].sampling == Sampling(1.0)  # -1 is "off", as vLLM and llama.cpp take it
    assert rt.submitted[-1][1].logprobs is None


def _chat_entries_ok(content: list[dict], tb: TokenBytes, ids: list[int], top: int) -> None:
    assert [e["bytes"] for e in content] == [list(tb.bytes(t)) for t in ids]
    for i, (e, t) in enumerate(zip(content, ids)):
        want = fake_logprobs(t, i, top)
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["token"] == tb.text(t) and e["logprob"] == want.logprob
        assert [(a["bytes"], a["logprob"]) for a in e["top_logprobs"]] == [
            (list(tb.bytes(a)), lp) for a, lp in want.top
        ]


async def test_chat_logprobs_whole_and_streamed(rt, url, embedded_tokenizer):
    client = oai(url)
    tb = TokenBytes(embedded_tokenizer)
    resp = await client.chat.completions.create(
        model=rt.model_name, messages=MSG, logprobs=True, top_logprobs=3, max_tokens=200
    )
    assert rt.submitted[-1][1].logprobs == 3
    content = [e.model_dump() for e in resp.choices[0].logprobs.content]
    assert resp.choices[0].logprobs.refusal is None
    _chat_entries_ok(content, tb, rt.reply_ids, 3)
    # the bytes spell the answer exactly, emoji included (a lone token's text may be half a character)
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == resp.choices[0].message.content
    stream = await client.chat.completions.create(
        model=rt.model_name, messages=MSG, logprobs=True, max_tokens=200, stream=True
    )
    streamed = []
    async for c in stream:
        if c.choices and c.choices[0].logprobs is not None:
            streamed += [e.model_dump() for e in c.choices[0].logprobs.content]
    _chat_entries_ok(streamed, tb, rt.reply_ids, 0)
    plain = await client.chat.completions.create(model=rt.model_name, messages=MSG, max_tokens=4)
    assert plain.choices[0].logprobs is None and rt.submitted[-1][1].logprobs is None


async def test_logprobs_stop_where_a_stop_string_cuts(rt, url):
    resp = await oai(url).chat.completions.create(
        model=rt.model_name, messages=MSG, logprobs=True, stop=["STOP"], max_tokens=200
    )
    assert resp.choices[0].message.content.endswith("near. ")
    assert len(resp.choices[0].logprobs.content) == resp.usage.completion_tokens < len(rt.reply_ids)


async def test_completion_logprobs_whole_and_streamed(rt, url, embedded_tokenizer):
    client = oai(url)
    tb = TokenBytes(embedded_tokenizer)
    resp = await client.completions.create(model=rt.model_name, prompt="x", max_tokens=12, logprobs=2)
    lp = resp.choices[0].logprobs
    ids = rt.reply_ids[:12]
    assert lp.tokens == [tb.text(t) for t in ids]
    assert lp.token_logprobs == [fake_logprobs(t, i, 2).logprob for i, t in enumerate(ids)]
    for i, (top, t) in enumerate(zip(lp.top_logprobs, ids)):
        want = fake_logprobs(t, i, 2)
        assert top == {tb.text(a): v for a, v in want.top}  # the sampled token is the likeliest here
    text = resp.choices[0].text
    assert lp.text_offset == [len(embedded_tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert all(text[o:].startswith(tok) for o, tok in zip(lp.text_offset, lp.tokens) if "\ufffd" not in tok)
    stream = await client.completions.create(model=rt.model_name, prompt="x", max_tokens=12, logprobs=2, stream=True)
    parts = [c.choices[0].logprobs async for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset


async def test_completion_logprobs_always_include_the_sampled_token(rt, url):
    resp = await oai(url).completions.create(model=rt.model_name, prompt="x", max_tokens=3, logprobs=0)
    lp = resp.choices[0].logprobs
    assert [list(d.values()) for d in lp.top_logprobs] == [[v] for v in lp.token_logprobs]


# ---- the real runtime -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_real_logprobs_are_the_models_and_penalties_are_applied(embedded_source, embedded, embedded_tokenizer):
    """Over the real runtime (one-device ring, speculative flow mode): greedy with penalties equals plain
    penalised decoding, and every reported logprob is the model's log-softmax at that position."""
    eos = stop_ids(embedded_tokenizer, embedded.cfg)
    rt = solo_runtime(
        embedded_source, embedded, drafter_factory("ngram", embedded), embedded_tokenizer, max_context=1024
    )
    await rt.start()
    try:
        async with serve(create_app(rt)) as url:
            client = oai(url)
            msgs = [{"role": "user", "content": "Repeat after me: the cat, the cat, the cat."}]
            sampling = Sampling(0.0, repetition_penalty=1.3, frequency_penalty=0.4)
            prompt = encode_messages(embedded_tokenizer, msgs)
            want = generate(embedded, prompt, max_new_tokens=16, mode="ar", sampling=sampling, eos_ids=eos).token_ids
            resp = await client.chat.completions.create(
                model=rt.model_name,
                messages=msgs,
                max_tokens=16,
                temperature=0,
                frequency_penalty=0.4,
                logprobs=True,
                top_logprobs=2,
                extra_body={"repetition_penalty": 1.3, "mode": "flow"},
            )
            got = resp.model_extra["meshd"]["token_ids"]
            assert got == want
            cache = embedded.new_cache()
            h = embedded.forward_one(embedded.embed(prompt + got), cache, torch.arange(len(prompt) + len(got)))
            raw = embedded.logits(h[len(prompt) - 1 : -1])
            ref = torch.log_softmax(raw, -1)
            for i, e in enumerate(resp.choices[0].logprobs.content):
                # the mesh computed these rows in tree-shaped batches: same values up to fp32 rounding
                assert math.isclose(e.logprob, float(ref[i, got[i]]), abs_tol=1e-3)
                assert [a.logprob for a in e.top_logprobs] == sorted((a.logprob for a in e.top_logprobs), reverse=True)
                # greedy picks the penalised argmax, which need not be the model's own favourite
                pen = penalised_logits(raw[i], sampling, History(prompt, got[:i]))
                assert got[i] == int(pen.argmax())
            comp = await client.completions.create(
                model=rt.model_name, prompt="The cat", max_tokens=6, temperature=0, logprobs=1, stream=True
            )
            toks = []
            async for c in comp:
                if c.choices and c.choices[0].logprobs:
                    toks += c.choices[0].logprobs.tokens
            p2 = encode_prompt(embedded_tokenizer, "The cat", chat=False)
            greedy = generate(embedded, p2, max_new_tokens=6, mode="ar", eos_ids=eos).token_ids
            assert toks == [TokenBytes(embedded_tokenizer).text(t) for t in greedy]
    finally:
        await rt.stop()
