"""The official ``ollama`` client against three loopback daemons: listing, show, chat and generate,
streamed and not, with the plain greedy answer through the whole ring."""

from __future__ import annotations

import ollama
import pytest
from support import ALIAS, QUESTION, SERVED, TOKENS

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "num_predict": TOKENS}


def test_list_ps_show(client_mesh):
    c = ollama.Client(host=client_mesh.url(2))
    assert [m.model for m in c.list().models] == [SERVED]
    (running,) = c.ps().models
    assert running.model == SERVED and running.details.quantization_level == "Q4_1"
    shown = c.show(ALIAS)
    assert shown.modelinfo["llama.block_count"] == 30 and shown.details.parameter_size == "135M"


def test_chat_whole_and_streamed(client_mesh):
    c = ollama.Client(host=client_mesh.url(0))
    msgs = [{"role": "user", "content": QUESTION}]
    whole = c.chat(model=f"{SERVED}:latest", messages=msgs, options=GREEDY)
    assert whole.message.content == client_mesh.text
    assert whole.eval_count == len(client_mesh.want) and whole.prompt_eval_count == len(client_mesh.prompt)
    parts = list(c.chat(model=SERVED, messages=msgs, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == client_mesh.text
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length") and len(parts) > 2


def test_generate_and_continue(client_mesh):
    c = ollama.Client(host=client_mesh.url(1))
    first = c.generate(model="default", prompt=QUESTION, options=GREEDY)
    assert first.response == client_mesh.text and first.context == client_mesh.prompt + client_mesh.want
    parts = list(c.generate(model=SERVED, prompt="And of Italy?", context=first.context, stream=True, options=GREEDY))
    assert parts[-1].done and "".join(p.response for p in parts).strip()
    assert parts[-1].context[: len(first.context)] == first.context
