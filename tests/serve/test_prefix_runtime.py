"""Prefix caches in the daemon's runtime, two stages joined through the real codec: a chat's next turn
reuses the kept prefix and answers exactly as without it; an evicted prefix costs a resend, not the request."""

from __future__ import annotations

import asyncio

import pytest
from support import two_stage_mesh

from meshd.serve import runtime as runtime_mod
from meshd.serve.apischema import ApiError, parse_chat
from meshd.serve.engine import GenerateParams
from models.source import ModelSource

MB = 1 << 20


async def ask(rt, prompt: list[int], cache: bool = True, max_tokens: int = 10) -> tuple[list[int], object]:
    h = await rt.submit(prompt, GenerateParams(max_tokens=max_tokens, mode="flow", prefix_cache=cache))
    tokens = [t async for chunk in h for t in chunk]
    assert h.finish_reason in ("length", "stop"), h.error
    return tokens, h.stats


async def test_next_turn_reuses_the_kept_prefix_and_a_miss_resends(tiny_dir):
    src = ModelSource.resolve(str(tiny_dir))
    mesh, a, b = two_stage_mesh(src, prefix_cache_bytes=64 * MB)
    await a.start()
    await b.start()
    try:
        turn1 = [(7 * i) % 60 + 1 for i in range(50)]
        out1, s1 = await asyncio.wait_for(ask(a, turn1), 120)
        assert s1.prefix_hit == 0
        turn2 = turn1 + out1 + [3, 4, 5]
        out2, s2 = await asyncio.wait_for(ask(a, turn2), 120)
        assert s2.prefix_hit == (len(turn1) + len(out1) - 1) // 16 * 16
        refs = [m for _, to, m in mesh.sent if m.type == "segment" and "prefix" in m.body]
        assert refs and refs[0].body["prefix"][1] == s2.prefix_hit  # B forked from its own cache
        assert b.worker.prefix_tokens_reused == s2.prefix_hit
        plain, s_off = await asyncio.wait_for(ask(a, turn2, cache=False), 120)
        assert plain == out2 and s_off.prefix_hit == 0  # the oracle: the same answer without the cache
        b.worker.prefixes.reclaim(1 << 30)  # B evicted everything: the next turn misses there
        turn3 = turn2 + out2 + [9, 9]
        out3, s3 = await asyncio.wait_for(ask(a, turn3), 120)
        plain3, _ = await asyncio.wait_for(ask(a, turn3, cache=False), 120)
        assert s3.prefix_misses == 1 and s3.prefix_hit == 0 and out3 == plain3
        m = a.metrics()
        assert m["prefix_hit_tokens_total"] == s2.prefix_hit and m["prefix_misses_total"] == 1
        assert m["stage_prefix_cache_entries"] >= 1
        for _ in range(200):  # the client hears the finish before the stages have applied the close
            if not a.worker.sessions and not b.worker.sessions:
                break
            await asyncio.sleep(0.01)
        assert not a.worker.sessions and not b.worker.sessions and not b.worker.missed
    finally:
        await a.stop()
        await b.stop()


def test_a_request_may_opt_out_of_prefix_caching():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat(chat, 4096).prefix_cache is True
    assert parse_chat({**chat, "prefix_cache": False}, 4096).prefix_cache is False
    with pytest.raises(ApiError, match="prefix_cache"):
        parse_chat({**chat, "prefix_cache": "no"}, 4096)


async def test_a_request_resumed_on_the_same_ring_starts_after_its_kept_prefix(tiny_dir, monkeypatch):
    """A's link to B breaks under a running second turn: it pauses, is replayed on the same ring once the
    link is back, and the replay starts after the first turn's kept prefix; both counters count it."""
    monkeypatch.setattr(runtime_mod, "RETRY_SAME_RING", 1.0)  # long enough to put the link back first
    src = ModelSource.resolve(str(tiny_dir))
    mesh, a, b = two_stage_mesh(src, prefix_cache_bytes=64 * MB, resume_timeout=60.0)
    await a.start()
    await b.start()
    try:
        turn1 = [(7 * i) % 60 + 1 for i in range(50)]
        out1, _ = await asyncio.wait_for(ask(a, turn1), 120)
        kept = (len(turn1) + len(out1) - 1) // 16 * 16
        turn2 = turn1 + out1 + [3, 4, 5]
        plain, _ = await asyncio.wait_for(ask(a, turn2, cache=False, max_tokens=24), 120)
        h = await a.submit(turn2, GenerateParams(max_tokens=24, mode="flow"))
        it = h.__aiter__()
        assert len(plain) > 6, "the answer ends too soon to be paused in the middle"
        while len(h.token_ids) < 3:
            await asyncio.wait_for(it.__anext__(), 60)
        del mesh.runtimes["B"]  # the link to B is down: A's next send to it fails
        for _ in range(2000):
            if a.originator.paused():
                break
            await asyncio.sleep(0.005)
        assert list(a.originator.paused()) == [h.request_id]
        mesh.join(b)  # back: the sweep replays the request on the same ring
        mesh.sent.clear()
        async for _ in it:
            pass
        assert h.finish_reason in ("length", "stop"), h.error
        assert h.token_ids == plain  # the oracle: the same answer, uninterrupted and without the cache
        refs = [m.body["prefix"] for _, to, m in mesh.sent if m.type == "segment" and "prefix" in m.body]
        assert [r[1] for r in refs] == [kept]  # the replay named the kept prefix, once
        s = h.stats
        assert s.resumed == 1 and s.prefix_misses == 0 and s.prefix_hit == 2 * kept  # prompt's and replay's
        m = a.metrics()
        assert m["requests_resumed_total"] == 1 and m["prefix_hit_requests_total"] == 1  # turn 2, once
        assert m["prefix_hit_tokens_total"] == 2 * kept
    finally:
        await a.stop()
        await b.stop()
