"""A proposal is not a plan: slices swap at commit, and an epoch change that keeps the layout fails nothing.

Against a member that floods proposals it never commits (or a proposer that dies mid-round), a
daemon that swapped its slice at proposal time would serve layers the committed plan does not say it
holds; one that failed every request at each epoch change would let anyone who can make the mesh
re-plan (a pure originator joining or leaving) cancel every request in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import torch
from hostile_peers import Mesh, agreed, linked_pair, until

from meshd.config import Config
from meshd.ring.messages import Segment
from meshd.serve.daemon import Daemon
from meshd.serve.engine import GenerateParams
from meshd.serve.runtime import Ring, Runtime
from models.budget import CostCurve
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from peers.codec import Message
from peers.negotiation import Plan
from peers.planner import Assignment


async def test_a_slice_is_served_only_once_its_plan_commits(tiny_dir):
    src = ModelSource.resolve(str(tiny_dir))
    n = src.config.n_layers
    daemon = Daemon(Config())
    daemon.runtime = Runtime(src, Stage.load(src, LayerRange(0, 0), vocab=True, dtype="fp32"), None)
    daemon.runtime.install_worker(Stage.load(src, LayerRange(0, 1), vocab=False, dtype="fp32"))
    daemon.node = SimpleNamespace(
        set_cost_curve=lambda curve: None, node_id="me", peers={}, hello=SimpleNamespace(cost_curve={})
    )
    mine = Assignment("me", LayerRange(0, n))
    never_committed = Plan(7, (mine,), ("me",), n)
    await daemon._load_slice(never_committed, mine)
    assert daemon.runtime.worker.stage.layer_range == LayerRange(0, 1), "a proposal swapped the served slice"

    committed = Plan(8, (mine,), ("me",), n)
    await daemon._load_slice(committed, mine)
    daemon._on_plan(committed)
    assert daemon.runtime.worker.stage.layer_range == mine.layers
    assert daemon.runtime.ring.epoch == 8


class SilentPeer:
    """The ring's second stage: takes segments and never answers, so requests stay in flight."""

    def __init__(self) -> None:
        self.sent: list = []

    async def __call__(self, node: str, msg) -> None:
        self.sent.append((node, msg))


async def test_an_epoch_change_that_keeps_the_layout_fails_no_request(tiny_dir):
    src = ModelSource.resolve(str(tiny_dir))
    n = src.config.n_layers
    rt = Runtime(src, Stage.load(src, dtype="fp32"), None, node_id="me")
    rt.install_worker(Stage.load(src, LayerRange(0, 1), vocab=False, dtype="fp32"))
    peer = SilentPeer()
    rt.transport = peer
    cc = CostCurve({1: 1.0, 64: 2.0})
    layout = (("me", 0, 1), ("peer-b", 1, n))
    rt.set_ring(Ring(1, [None, "peer-b"], [cc, cc], 0, layout))
    await rt.start()
    try:
        h = await rt.submit([1, 2, 3], GenerateParams(max_tokens=4, mode="ar"))
        await until(lambda: any(isinstance(m, Segment) for _, m in peer.sent), what="the prompt leaving")
        rt.set_ring(Ring(2, [None, "peer-b"], [cc, cc], 0, layout))  # e.g. a pure originator joined
        await asyncio.sleep(0.2)
        assert h.finish_reason is None, f"the request failed at a layout-keeping re-plan: {h.error}"
        moved = (("me", 0, 2), ("peer-b", 2, n))
        rt.set_ring(Ring(3, [None, "peer-b"], [cc, cc], 0, moved))  # layers moved: this one cannot finish
        await until(lambda: h.finish_reason is not None, what="the request failing at a real re-plan")
        assert h.finish_reason == "error" and "re-planned" in h.error
    finally:
        await rt.stop()


async def test_data_of_an_older_epoch_with_the_same_layout_is_still_delivered(tmp_path):
    mesh = Mesh(tmp_path)
    try:
        a, b = await linked_pair(mesh)
        before = a.committed_plan
        # a pure originator joins: too little memory for one layer, so every stage stays where it was
        c = await mesh.start("c", peers=[a.config.api_port, b.config.api_port], memory_budget=8 << 20)
        await until(lambda: agreed(a, b, c) and len(a.plan.members) == 3, what="the re-plan with c")
        assert a.committed_plan.epoch > before.epoch and a.committed_plan.layout == before.layout

        inbox: asyncio.Queue = asyncio.Queue()

        async def on_segment(sender: str, msg: Message) -> None:
            await inbox.put(msg)

        b.on("segment", on_segment)
        seg = Message(
            "segment",
            {"origin": a.node_id, "nodes": [0], "parents": [-1], "positions": [0], "hidden": torch.ones(1, 8)},
            epoch=before.epoch,  # sent just before the re-plan committed
            request_id=3,
        )
        await a.neighbours.link(b.node_id).send(seg)  # straight onto the link: MeshNode.send would restamp it
        got = await asyncio.wait_for(inbox.get(), 5)
        assert got.request_id == 3 and got.epoch == before.epoch
        await a.neighbours.link(b.node_id).send(replace(seg, epoch=before.epoch - 1, request_id=4))
        await asyncio.sleep(0.3)  # an epoch from before the layout was set is still refused
        assert inbox.empty()
    finally:
        await mesh.stop()
