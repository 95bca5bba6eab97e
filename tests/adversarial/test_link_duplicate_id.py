"""A peer that knows the secret presents the victim's node id and claims to have started first.

Once, that made the victim exit ("the older daemon keeps the id"). A claim is not evidence: the
link is refused at the handshake, the victim reports it and keeps serving.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch
from hostile_peers import Mesh, linked_pair, until

from peers.codec import Message
from peers.identity import Identity


async def test_duplicate_node_id_is_refused_and_the_victim_keeps_serving(tmp_path):
    mesh = Mesh(tmp_path)
    try:
        victim, other = await linked_pair(mesh)
        epoch = victim.plan.epoch
        impostor_id = Identity(victim.node_id, tmp_path / "impostor", start_time=0.0)  # "started in 1970"
        impostor = await mesh.start("impostor", peers=[victim.config.api_port], node_kw={"identity": impostor_id})
        await until(lambda: victim.stopping or victim.status().get("duplicate_node_id"), what="the impostor's dial")
        assert not victim.stopping, "the victim left the mesh on an impostor's word"
        await until(lambda: impostor.status()["duplicate_node_id"], what="the impostor being refused")
        await asyncio.sleep(1.0)  # the impostor keeps redialling meanwhile
        assert not victim.stopping
        assert victim.plan.committed and victim.plan.epoch == epoch and set(victim.peers) == {other.node_id}
        inbox: asyncio.Queue = asyncio.Queue()

        async def on_segment(sender: str, msg: Message) -> None:
            await inbox.put((sender, msg))

        other.on("segment", on_segment)
        seg = Message(
            "segment",
            {"origin": victim.node_id, "nodes": [0], "parents": [-1], "positions": [0], "hidden": torch.ones(1, 8)},
        )
        await victim.send(other.node_id, replace(seg, request_id=5))
        sender, got = await asyncio.wait_for(inbox.get(), 5)
        assert sender == victim.node_id and got.request_id == 5  # still serving
    finally:
        await mesh.stop()
