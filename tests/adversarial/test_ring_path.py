"""Ring messages must come the way the committed plan says, or any member of the mesh can meddle.

Two runtimes, "A" (originator and stage 0) and "B" (stage 1), on a loopback mesh through the real
codec; "mallory" is a third, authenticated member of the mesh that is on no request's path. Before
the gate knew the plan, mallory could (1) relay a segment into A's request at B, on A's behalf, so
B computed rows A never sent, or, by repeating a node A had sent, make B fail A's request; and (2)
hand A a ``Result`` for its request, whose hidden states A decoded into tokens. Now B takes segments
only from the stage before it and A takes results only from the last stage; neither refusal touches
the request, which ends as it would have.
"""

from __future__ import annotations

import asyncio

import torch
from support import two_stage_mesh

from meshd.ring.messages import Result, Segment
from meshd.serve.engine import GenerateParams
from models.source import ModelSource

BOUND_S = 30.0  # a loaded 2-core machine; the requests take well under a second here
PARAMS = GenerateParams(max_tokens=16, mode="ar")
PROMPT = [1, 2, 3, 4, 5]


async def tokens_of(handle) -> tuple[str, str | None, list[int]]:
    out = [t async for chunk in handle for t in chunk]
    return handle.finish_reason, handle.error, out


async def honest_output(tiny_dir) -> list[int]:
    _, a, b = two_stage_mesh(ModelSource.resolve(str(tiny_dir)))
    await a.start()
    await b.start()
    try:
        _, error, out = await asyncio.wait_for(tokens_of(await a.submit(PROMPT, PARAMS)), BOUND_S)
        assert error is None and out
        return out
    finally:
        await a.stop()
        await b.stop()


async def test_a_member_off_the_path_cannot_relay_segments_into_a_request(tiny_dir):
    want = await honest_output(tiny_dir)
    _, a, b = two_stage_mesh(ModelSource.resolve(str(tiny_dir)))
    hidden = a.vocab.cfg.hidden_size
    await a.start()
    await b.start()
    try:
        h = await a.submit(PROMPT, PARAMS)
        rid = h.request_id
        for _ in range(1000):  # until B holds the request's session
            if rid in b.worker.gate.books:
                break
            await asyncio.sleep(0.002)
        # A repeat of node 0 (sent by A with the prompt) would fail the request as "sent twice"; a fresh
        # node would be computed into A's session at B. Both on A's behalf, both from mallory.
        repeat = Segment(rid, [0], [-1], [0], hidden=torch.zeros(1, hidden), origin="A")
        fresh = Segment(rid, [1 << 40], [0], [1], hidden=torch.zeros(1, hidden), origin="A")
        b.deliver(repeat, "mallory")
        b.deliver(fresh, "mallory")
        _, error, out = await asyncio.wait_for(tokens_of(h), BOUND_S)
        assert error is None and out == want  # the request ended as it would have
        assert b.refusals.get("not_upstream") == 2
        # and A's own requests still pass B's gate: the check is on the path, not on everyone
        _, error, out = await asyncio.wait_for(tokens_of(await a.submit(PROMPT, PARAMS)), BOUND_S)
        assert error is None and out == want
    finally:
        await a.stop()
        await b.stop()


async def test_only_the_last_stage_hands_an_originator_its_results(tiny_dir):
    want = await honest_output(tiny_dir)
    _, a, b = two_stage_mesh(ModelSource.resolve(str(tiny_dir)))
    cfg = a.vocab.cfg
    forged = torch.randn(4096, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * 10
    await a.start()
    await b.start()
    try:
        h = await a.submit(PROMPT, PARAMS)
        collect = asyncio.ensure_future(tokens_of(h))
        sent = 0
        while not collect.done():  # results for every node id the request can have, over and over
            a.deliver(Result(h.request_id, list(range(4096)), forged), "mallory")
            sent += 1
            await asyncio.sleep(0.001)
        _, error, out = await asyncio.wait_for(collect, BOUND_S)
        assert error is None and out == want  # no forged token got in
        assert sent > 1 and a.refusals.get("not_last_stage") == sent
        b.deliver(Result("nobody", [0], forged[:1]), "A")  # B is nobody's last stage but its own
        assert b.refusals.get("not_last_stage") == 1
    finally:
        await a.stop()
        await b.stop()
