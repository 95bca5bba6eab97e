"""The mesh the real-client tests share: three ``meshd serve`` processes on loopback serving the
embedded model as ``smol`` (alias ``smol:135m``), started once for the openai, ollama and llm
tests, and plain greedy decoding of one question to hold their answers against."""

from __future__ import annotations

import pytest
from support import ALIAS, QUESTION, SERVED, TOKENS, ClientMesh, chat_ids, greedy_reference

from meshd.lab.testbed import LoopbackMesh


@pytest.fixture(scope="session")
def client_mesh(tmp_path_factory, embedded, embedded_tokenizer) -> ClientMesh:
    prompt = chat_ids(embedded_tokenizer, QUESTION)
    eos = set(embedded.cfg.eos_token_ids) | {embedded_tokenizer.eos_token_id}
    want, gaps = greedy_reference(embedded, prompt, TOKENS, eos)
    # clients that return text alone are compared with this text exactly: no near-tie may make another
    # batch shape's rounding pick a different token (see support.near_tie)
    assert min(gaps) >= 1.0, gaps
    mesh = LoopbackMesh(tmp_path_factory.mktemp("clients"), 3, extra=["--served-name", SERVED, "--alias", ALIAS])
    try:
        mesh.wait_plan([0, 1, 2], 3, timeout=180)
        yield ClientMesh(mesh, prompt, want, embedded_tokenizer.decode(want, skip_special_tokens=True))
    finally:
        mesh.close()
