"""The mesh the real-client tests share: three ``meshd serve`` processes on loopback serving the
embedded model as ``smol`` (alias ``smol:135m``), started once for the openai, ollama and llm
tests, and plain greedy decoding of one question to hold their answers against."""

from __future__ import annotations

import pytest
from support import ALIAS, QUESTION, SERVED, TOKENS, ClientMesh, chat_ids, greedy_reference

from meshd.lab.testbed import LoopbackMesh, ids_placing


@pytest.fixture(scope="session")
def client_mesh(tmp_path_factory, embedded, embedded_tokenizer) -> ClientMesh:
    prompt = chat_ids(embedded_tokenizer, QUESTION)
    eos = set(embedded.cfg.eos_token_ids) | {embedded_tokenizer.eos_token_id}
    want, gaps = greedy_reference(embedded, prompt, TOKENS, eos)
    # clients that return text alone are compared with this text exactly: no near-tie may make another
    # batch shape's rounding pick a different token (see support.near_tie)
    assert min(gaps) >= 1.0, gaps
    # daemon 0 (the clients' usual entry) on the middle stage: its stage both precedes and follows others
    mesh = LoopbackMesh(
        tmp_path_factory.mktemp("clients"),
        3,
        extra=["--served-name", SERVED, "--alias", ALIAS],
        node_ids=ids_placing(0, 1, 3),
    )
    try:
        plan = mesh.wait_plan([0, 1, 2], 3, timeout=180)
        assert mesh.stage_index(0, plan) == 1, plan
        yield ClientMesh(mesh, prompt, want, embedded_tokenizer.decode(want, skip_special_tokens=True))
    finally:
        mesh.close()
