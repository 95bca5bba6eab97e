"""Floods of sessions and stalled requests: every stage's memory and every client's wait stay bounded.

Before the limits, any prune or segment with a new request id allocated a KV cache (256 entries of
every local layer) with no cap, and a request whose stage hung or dropped it never ended for its
client.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from support import solo_runtime, two_stage_mesh

from meshd.ring.messages import PROMPT_PARENT, Close, Failure, Prune, Segment
from meshd.ring.validate import SESSION_FLOOR, FrameRejected, Limits
from meshd.ring.worker import StageWorker
from meshd.serve.engine import GenerateParams
from meshd.serve.runtime import INBOX_LIMIT
from models.source import ModelSource
from models.stage import Stage


@pytest.fixture(scope="module")
def full(tiny_dir) -> Stage:
    return Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")


def kv_bytes(w: StageWorker) -> int:
    return sum(s.cache.k.nbytes + s.cache.v.nbytes for s in w.sessions.values())


def entry_bytes(stage: Stage) -> int:
    """Bytes of one KV entry across the stage's layers (keys and values)."""
    c = stage.new_cache(capacity=1)
    return c.k.nbytes + c.v.nbytes


def test_a_prune_flood_from_one_peer_is_capped_and_others_still_get_in(full):
    w = StageWorker(full, embed=full.embed, limits=Limits(kv_tokens=64 * SESSION_FLOOR, sessions_per_peer=4))
    refused = 0
    for i in range(300):  # each prune with a fresh request id used to allocate a KV cache
        try:
            w.handle(Prune(f"flood{i}", upto=i, keep=[], commit=[]), "mallory")
        except FrameRejected as exc:
            assert exc.code == "too_many_sessions" and "mallory already holds 4 sessions" in exc.reason
            refused += 1
    assert refused == 296 and len(w.sessions) == 4
    assert kv_bytes(w) <= 4 * SESSION_FLOOR * entry_bytes(full)  # memory bounded by the cap, not the flood
    w.handle(Segment("r", [0, 1], [PROMPT_PARENT, 0], [0, 1], tokens=[1, 2], commit=True, origin="alice"), "alice")
    assert [o.request_id for o in w.step()] == ["r"]  # another peer is still served


def test_total_kv_is_capped_across_peers_and_within_one_request(full):
    cap = 8 * SESSION_FLOOR
    w = StageWorker(full, embed=full.embed, limits=Limits(kv_tokens=cap, sessions_per_peer=100))
    opened = 0
    for i in range(50):  # fifty peers, one session each: the total still stops at the cap
        try:
            w.handle(Prune(f"p{i}", upto=0, keep=[], commit=[]), f"peer{i}")
            opened += 1
        except FrameRejected as exc:
            assert exc.code == "kv_full"
    assert opened == cap // SESSION_FLOOR and w.gate.kv_tokens == cap
    for i in range(opened):
        w.handle(Segment(f"p{i}", [0], [PROMPT_PARENT], [0], tokens=[1], origin=f"peer{i}"), f"peer{i}")
    w.step()
    assert kv_bytes(w) <= 2 * cap * entry_bytes(full)  # caches double as they grow: at most twice the entries
    # one request cannot grow past the cap either: a long prompt in 100-row chunks is refused once it would
    w2 = StageWorker(full, embed=full.embed, limits=Limits(kv_tokens=300))
    node = 0
    with pytest.raises(FrameRejected, match="KV cache is full"):
        for _ in range(5):
            ids = list(range(node, node + 100))
            parents = [PROMPT_PARENT if n == 0 else n - 1 for n in ids]
            w2.handle(Segment("long", ids, parents, ids, tokens=[1] * 100, commit=True, origin="a"), "a")
            w2.step()
            node += 100
    assert node == 300 and "long" not in w2.sessions and w2.gate.kv_tokens == 0


async def test_a_session_flood_through_the_runtime_keeps_memory_bounded(tiny_dir):
    src = ModelSource.resolve(str(tiny_dir))
    full = Stage.load(src, dtype="fp32")
    rt = solo_runtime(src, full, None, contexts=1, sessions_per_peer=3, max_context=512)
    told: list = []

    async def transport(node, msg):
        told.append((node, msg))

    rt.transport = transport
    await rt.start()
    try:
        for i in range(2000):
            seg = Segment(f"{i}", [0, 1], [PROMPT_PARENT, 0], [0, 1], tokens=[3, 4], commit=True, origin="mallory")
            rt.deliver(seg, "mallory")
            if i % 200 == 0:
                await asyncio.sleep(0)
        for _ in range(3000):
            await asyncio.sleep(0.01)
            computed = [s for s in rt.worker.sessions.values() if s.cache.length == 2]
            if not rt._inbox and len(refusals(told)) == 1998 and len(computed) == 2:
                break
        assert len(rt.worker.gate.books) == 2  # 512 KV entries: two sessions' floor, under mallory's own cap of 3
        assert len(rt.worker.sessions) == 2
        assert kv_bytes(rt.worker) <= 512 * entry_bytes(full)
        assert len(refusals(told)) == 1998  # the accepted two computed and returned results to mallory
        assert {(n, m.code) for n, m in refusals(told)} == {("mallory", "kv_full")}
        h = await rt.submit([1, 2, 3], GenerateParams(max_tokens=4, mode="ar"))
        async for _ in h:
            pass
        assert h.finish_reason == "error" and "KV cache is full" in h.error  # refused with a reason, not hung
    finally:
        await rt.stop()


def refusals(told: list) -> list:
    return [(n, m) for n, m in told if isinstance(m, Failure)]


async def test_a_hung_stage_gives_the_client_an_error_within_the_stall_bound(tiny_dir):
    stall = 1.0
    mesh, a, b = two_stage_mesh(ModelSource.resolve(str(tiny_dir)), stall_timeout=stall)
    # B is alive (its links and heartbeats would be fine) but swallows everything after the prompt
    mesh.tamper = lambda sender, to, msg: None if (sender, to) == ("A", "B") and msg.type == "segment" else msg
    await a.start()
    await b.start()
    try:
        t0 = time.monotonic()
        h = await a.submit([1, 2, 3], GenerateParams(max_tokens=8, mode="ar"))
        chunks = await asyncio.wait_for(_drain(h), 10 * stall + 10)
        waited = time.monotonic() - t0
        assert chunks == [] and h.finish_reason == "error"
        assert "no answer from the ring for 1 s" in h.error
        # the bound: stall_timeout plus one sweep of the compute loop (a quarter of it), plus scheduling slack
        assert stall <= waited <= stall * 1.25 + 2.0
        assert a.handles == {} and a.originator.live == {}
    finally:
        await a.stop()
        await b.stop()


async def _drain(h) -> list:
    return [c async for c in h]


async def test_a_stage_far_behind_refuses_new_work_instead_of_queueing_it(tiny_dir):
    """Frames arriving faster than the torch thread drains them: the inbox stops at INBOX_LIMIT."""
    src = ModelSource.resolve(str(tiny_dir))
    rt = solo_runtime(src, Stage.load(src, dtype="fp32"), None)
    told: list = []

    async def transport(node, msg):
        told.append((node, msg))

    rt.transport = transport  # not started: nothing drains the inbox
    for i in range(INBOX_LIMIT + 100):
        rt.deliver(Segment(f"{i}", [0], [PROMPT_PARENT], [0], tokens=[3], origin="mallory"), "mallory")
    rt.deliver(Close("x"), "mallory")  # dropped too; a close or prune is small, but the queue is full
    assert len(rt._inbox) == INBOX_LIMIT
    await asyncio.sleep(0.05)
    assert len(told) == 100 and {(n, m.code) for n, m in refusals(told)} == {("mallory", "overloaded")}
    rt.deliver(Segment("own", [0], [PROMPT_PARENT], [0], tokens=[3], origin=rt.node_id), rt.node_id)
    assert len(rt._inbox) == INBOX_LIMIT + 1  # this device's own originator is never refused by its own stage
