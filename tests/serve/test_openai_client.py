"""The official ``openai`` client against three loopback daemons: chat and completions, streamed and
not, served name and aliases, log-probabilities that are the model's own, and penalties, top-k
and min-p that give exactly the distribution plain decoding would use."""

from __future__ import annotations

import math

import pytest
import torch
from openai import NotFoundError, OpenAI
from support import ALIAS, QUESTION, SERVED, TOKENS

from models.engine import generate
from models.text import encode_prompt, stop_ids
from models.verify import Sampling

pytestmark = pytest.mark.slow
MSGS = [{"role": "user", "content": QUESTION}]


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_names_and_plan(client_mesh):
    c = client(client_mesh.url(0))
    (m,) = list(c.models.list())
    assert m.id == SERVED and m.model_extra["aliases"] == [ALIAS, "default"]
    extra = m.model_extra
    assert (extra["n_layers"], extra["quantization"], extra["dtype"]) == (30, "Q4_1", "float32")
    stages = extra["plan"]["stages"]
    assert [(s["first_layer"], s["stop_layer"]) for s in stages] == [(0, 10), (10, 20), (20, 30)]
    assert {s["node_id"] for s in stages} == {client_mesh.mesh.node_id(i) for i in range(3)}
    with pytest.raises(NotFoundError) as exc:
        c.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert f"serves `{SERVED}` (also accepted: `{ALIAS}`, `default`)" in exc.value.body["message"]


def test_chat_whole_and_streamed_with_logprobs(client_mesh, embedded):
    c = client(client_mesh.url(1))
    whole = c.chat.completions.create(
        model="default", messages=MSGS, max_tokens=TOKENS, temperature=0, logprobs=True, top_logprobs=3
    )
    assert whole.model == SERVED and whole.model_extra["meshd"]["token_ids"] == client_mesh.want
    assert whole.choices[0].message.content == client_mesh.text
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == len(client_mesh.want)
    ids = client_mesh.prompt + client_mesh.want
    h = embedded.forward_one(embedded.embed(ids), embedded.new_cache(), torch.arange(len(ids)))
    ref = torch.log_softmax(embedded.logits(h[len(client_mesh.prompt) - 1 : -1]), -1)
    for i, e in enumerate(content):
        # the mesh computed these rows in slices and tree-shaped batches: equal up to fp32 rounding
        assert math.isclose(e.logprob, float(ref[i, client_mesh.want[i]]), abs_tol=1e-3)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
    stream = c.chat.completions.create(
        model=ALIAS,
        messages=MSGS,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        logprobs=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == client_mesh.text
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert chunks[-1].usage.completion_tokens == len(client_mesh.want)


def test_completions_whole_and_streamed(client_mesh, embedded, embedded_tokenizer):
    c = client(client_mesh.url(2))
    prompt = "The capital of France is"
    ids = encode_prompt(embedded_tokenizer, prompt, chat=False)
    want = generate(embedded, ids, max_new_tokens=8, mode="ar", eos_ids=stop_ids(embedded_tokenizer, embedded.cfg))
    whole = c.completions.create(model=SERVED, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    assert whole.choices[0].text == embedded_tokenizer.decode(want.token_ids, skip_special_tokens=True)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(want.token_ids)
    parts = list(c.completions.create(model=SERVED, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text


def test_penalties_through_the_mesh_equal_plain_penalised_decoding(client_mesh, embedded, embedded_tokenizer):
    """Greedy under penalties is a deterministic oracle: every draft node must be judged with the
    tokens on its own path, or the mesh's answer drifts from plain decoding's."""
    sampling = Sampling(0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5)
    eos = stop_ids(embedded_tokenizer, embedded.cfg)
    want = generate(embedded, client_mesh.prompt, max_new_tokens=TOKENS, mode="ar", sampling=sampling, eos_ids=eos)
    assert want.token_ids != client_mesh.want  # the penalties change this answer
    resp = client(client_mesh.url(0)).chat.completions.create(
        model=SERVED,
        messages=MSGS,
        max_tokens=TOKENS,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3, "mode": "flow"},
    )
    assert resp.model_extra["meshd"]["token_ids"] == want.token_ids


def test_top_k_and_min_p_shape_what_is_sampled(client_mesh):
    c = client(client_mesh.url(1))
    # top_k=1 leaves one token at each step, so sampling at any temperature is greedy decoding
    one = c.chat.completions.create(
        model=SERVED, messages=MSGS, max_tokens=TOKENS, temperature=1.5, seed=1, extra_body={"top_k": 1}
    )
    assert one.model_extra["meshd"]["token_ids"] == client_mesh.want
    # min_p=1 keeps only the likeliest token as well
    top = c.chat.completions.create(
        model=SERVED, messages=MSGS, max_tokens=TOKENS, temperature=1.5, seed=2, extra_body={"min_p": 1.0}
    )
    assert top.model_extra["meshd"]["token_ids"] == client_mesh.want
    # a seed reproduces the text where no tree depends on timing (ar); flow's slots and idle drafting
    # shape its trees by the ring's timing, so a seeded flow request reproduces the distribution, not
    # the text (docs/design.md, "Seeds")
    seeded = [
        c.chat.completions.create(
            model=SERVED,
            messages=MSGS,
            max_tokens=TOKENS,
            temperature=1.0,
            seed=5,
            extra_body={"top_k": 20, "mode": "ar"},
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
