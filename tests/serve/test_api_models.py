"""Model names and the model card: a served name, aliases, ``default`` for the embedded model,
``/v1/models`` with what local-model clients show, and a 404 that says which names work."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from support import serve

from meshd.serve.api import create_app
from meshd.serve.modelcard import ModelCard, build_card, parameter_size

pytestmark = pytest.mark.timeout(60)
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def card(embedded_source) -> ModelCard:
    return build_card(embedded_source, dtype="fp32", context_length=2048, served_name="smol", aliases=["tiny:135m"])


@pytest.fixture
async def named_url(rt, card):
    async with serve(create_app(rt, card=card)) as u:
        yield u


def test_card_reads_the_model(embedded_source, card):
    assert card.names == ("smol", "tiny:135m", "default")  # the embedded model also answers to `default`
    assert (card.n_layers, card.architecture, card.quantization) == (30, "llama", "Q4_1")
    assert 130e6 < card.parameters < 140e6 and parameter_size(card.parameters) == "135M"
    plain = build_card(embedded_source, dtype="fp32", context_length=2048)
    assert plain.name == embedded_source.name and plain.aliases == ("default",)


def test_card_of_a_safetensors_model(tiny_dir):
    from models.source import ModelSource

    c = build_card(ModelSource.resolve(str(tiny_dir)), dtype="fp32", context_length=64, aliases=["t"])
    assert c.names == (tiny_dir.name, "t")  # not the embedded model: no `default`
    assert c.quantization == "F32" and c.n_layers == 4 and c.parameters > 0


async def test_every_accepted_name_serves_and_responses_carry_the_served_name(rt, named_url):
    client = openai.AsyncOpenAI(base_url=named_url + "/v1", api_key="x", max_retries=0, timeout=20)
    for name in ("smol", "tiny:135m", "default"):
        resp = await client.chat.completions.create(model=name, messages=MSG, max_tokens=2)
        assert resp.model == "smol"
        assert (await client.models.retrieve(name)).id == "smol"
    with pytest.raises(openai.NotFoundError) as exc:
        await client.chat.completions.create(model=rt.model_name, messages=MSG)  # the file stem is not a name now
    err = exc.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["message"] == (
        f"The model `{rt.model_name}` does not exist: this mesh serves `smol` "
        "(also accepted: `tiny:135m`, `default`); see GET /v1/models."
    )


async def test_models_list_has_the_card_and_the_committed_plan(rt, named_url, card):
    async with aiohttp.ClientSession() as s, s.get(named_url + "/v1/models") as r:
        body = await r.json()
    (m,) = body["data"]
    assert body["object"] == "list" and (m["id"], m["object"], m["owned_by"]) == ("smol", "model", "meshd")
    assert m["aliases"] == ["tiny:135m", "default"]
    assert (m["context_length"], m["n_layers"], m["quantization"], m["dtype"]) == (2048, 30, "Q4_1", "fp32")
    assert m["parameters"] == card.parameters and m["fingerprint"] == card.fingerprint
    stages = rt.status()["plan"]["stages"]
    assert m["plan"] == {
        "epoch": 3,
        "committed": True,
        "stages": [{**s, "n_layers": s["stop_layer"] - s["first_layer"]} for s in stages],
    }
    rt.status = lambda: {"plan": None}  # no plan yet: the card still answers
    async with aiohttp.ClientSession() as s, s.get(named_url + "/v1/models/default") as r:
        assert r.status == 200 and (await r.json())["plan"] is None
