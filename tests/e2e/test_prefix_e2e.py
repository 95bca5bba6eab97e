"""Prefix caches on real loopback daemons: a chat through three daemons, each turn asked twice in the same
run (prefix caching on and off per request); fp32 at T=0 both copies answer token for token alike, and
as plain greedy decoding of the whole conversation does (the oracle's near-tie rule)."""

from __future__ import annotations

import pytest
from support import assert_matches_greedy, greedy_reference

from meshd.lab.multiturn import QUESTIONS, SYSTEM, conversation
from meshd.lab.testbed import LoopbackMesh
from models.text import encode_messages

pytestmark = pytest.mark.slow
TOKENS = 16


def test_chat_turns_reuse_prefixes_and_answer_as_without(tmp_path, embedded, embedded_tokenizer):
    with LoopbackMesh(tmp_path, 3) as m:
        m.wait_plan([0, 1, 2], 3, timeout=180)
        rows = conversation(m.url(1), 3, TOKENS, "flow")
    msgs = [{"role": "system", "content": f"Conversation 1. {SYSTEM}"}]
    eos = set(embedded.cfg.eos_token_ids) | {embedded_tokenizer.eos_token_id}
    for t, row in enumerate(rows):
        on, off = row["on"], row["off"]
        assert on["stats"]["token_ids"] == off["stats"]["token_ids"], f"turn {t + 1}"
        assert off["stats"]["prefix_hit"] == 0
        if t:
            assert 0 < on["stats"]["prefix_hit"] < on["prompt_tokens"]
        msgs.append({"role": "user", "content": QUESTIONS[t]})
        prompt = encode_messages(embedded_tokenizer, msgs)
        assert len(prompt) == on["prompt_tokens"]
        want, gaps = greedy_reference(embedded, prompt, TOKENS, eos)
        assert_matches_greedy(on["stats"]["token_ids"], want, gaps)
        msgs.append({"role": "assistant", "content": on["text"]})
