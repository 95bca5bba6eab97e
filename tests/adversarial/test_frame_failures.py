"""A bad frame at a remote stage fails only its own request, and that request's client hears why.

Two runtimes, "A" (originator and first stage) and "B" (second stage), joined by a loopback mesh
that runs every message through the real codec. Before the gate and the ``error`` handler, each
case hung: a parent cycle spun B's only torch thread forever (every request stalled), a hidden
state of the wrong width failed B's forward, which closed the sessions and told nobody, and a third
peer's close silently killed a request it did not own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from support import two_stage_mesh

from meshd.ring.messages import Close, Failure, Prune
from meshd.serve.engine import GenerateParams
from models.source import ModelSource
from peers.codec import Message

CLIENT_BOUND_S = 20.0  # a refusal reaches the client in one round trip; generous for a loaded 2-core machine


async def outcome(handle) -> tuple[str, str | None, int]:
    tokens = [t async for chunk in handle for t in chunk]
    return handle.finish_reason, handle.error, len(tokens)


def corrupt_once(victim: dict, change) -> callable:
    """A tamper that rewrites the first A->B segment of the request in ``victim['rid']`` that is not a prompt chunk."""

    def tamper(sender: str, to: str, msg: Message) -> Message:
        if (sender, to) != ("A", "B") or str(msg.request_id) != victim.get("rid") or victim.get("done"):
            return msg
        if msg.type == "segment" and (victim.get("prompt_too") or not msg.body.get("commit")):
            victim["done"] = time.monotonic()
            return dataclasses.replace(msg, body={**msg.body, **change(msg.body)})
        return msg

    return tamper


async def run_pair(tiny_dir, change, *, prompt_too: bool = False):
    mesh, a, b = two_stage_mesh(ModelSource.resolve(str(tiny_dir)))
    victim: dict = {"prompt_too": prompt_too}
    mesh.tamper = corrupt_once(victim, change)
    await a.start()
    await b.start()
    try:
        params = GenerateParams(max_tokens=8, mode="ar")
        bad = await a.submit([1, 2, 3, 4], params)
        victim["rid"] = bad.request_id
        good = await a.submit([5, 6, 7], params)
        bad_out, good_out = await asyncio.wait_for(asyncio.gather(outcome(bad), outcome(good)), CLIENT_BOUND_S)
        heard = time.monotonic() - victim["done"]
        for _ in range(200):  # the originator's closes are still on their way to B when the clients hear
            if not b.worker.sessions:
                break
            await asyncio.sleep(0.025)
        return bad_out, good_out, heard, a, b
    finally:
        await a.stop()
        await b.stop()


async def test_a_parent_cycle_at_a_remote_stage_fails_only_its_request(tiny_dir):
    bad, good, heard, _, b = await run_pair(tiny_dir, lambda body: {"parents": list(body["nodes"])})
    reason, error, _ = bad
    assert reason == "error" and "peer B failed the request (bad_segment)" in error and "parent" in error
    assert good[:2] in {("length", None), ("stop", None)}  # the other request never stalled
    assert heard < CLIENT_BOUND_S
    assert not b.worker.sessions  # B freed the refused request's KV (and the finished one's)


async def test_a_hidden_state_of_the_wrong_width_fails_its_request_with_the_reason(tiny_dir):
    def wider(body):
        h = body["hidden"]
        return {"hidden": h.new_zeros(h.shape[0], h.shape[1] + 1)}

    bad, good, heard, _, _ = await run_pair(tiny_dir, wider, prompt_too=True)
    reason, error, tokens = bad
    assert reason == "error" and tokens == 0
    assert "hidden states of shape" in error and "this model needs" in error
    assert good[:2] in {("length", None), ("stop", None)}
    assert heard < CLIENT_BOUND_S


async def test_a_third_peer_cannot_close_prune_or_fail_anothers_request(tiny_dir):
    _, a, b = two_stage_mesh(ModelSource.resolve(str(tiny_dir)))
    await a.start()
    await b.start()
    try:
        h = await a.submit([1, 2, 3], GenerateParams(max_tokens=12, mode="ar"))
        rid = h.request_id
        for _ in range(500):  # until B holds the request's session
            if rid in b.worker.sessions:
                break
            await asyncio.sleep(0.005)
        assert rid in b.worker.sessions
        b.deliver(Close(rid), "mallory")
        b.deliver(Prune(rid, upto=1 << 20, keep=[], commit=[]), "mallory")
        a.deliver(Failure(rid, "bad_segment", "trust me"), "mallory")  # not a stage of this ring: ignored
        reason, error, n = await asyncio.wait_for(outcome(h), CLIENT_BOUND_S)
        assert (reason, error) in {("length", None), ("stop", None)} and n > 0
    finally:
        await a.stop()
        await b.stop()
