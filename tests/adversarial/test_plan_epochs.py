"""A member gone bad (it knows the secret) poisons epochs or proposes plans that do not fit the model.

The frames are built by hand and sent sealed on a real link, as a modified daemon would: the sender's
own codec checks are not what protects the receiver.
"""

from __future__ import annotations

import logging

import cbor2
import pytest
from hostile_peers import Mesh, agreed, free_socket, linked_pair, until

from peers.codec import PROTO_VERSION
from peers.mesh import MeshNode


def raw(mtype: str, epoch: int, **body) -> bytes:
    return cbor2.dumps({"v": PROTO_VERSION, "t": mtype, "e": epoch, "r": 0, **body})


def roles(a: MeshNode, b: MeshNode) -> tuple[MeshNode, MeshNode]:
    """(proposer, member): the lowest node id proposes."""
    return (a, b) if a.node_id < b.node_id else (b, a)


def refusals(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many messages the mesh layer logged as rejected with ``text`` in the reason."""
    return sum(
        1 for r in caplog.records if r.name == "peers.mesh" and "rejected" in r.getMessage() and text in r.getMessage()
    )


def unchanged(node: MeshNode, epoch: int) -> bool:
    plan = node.plan
    return plan is not None and plan.committed and plan.epoch == epoch and node.negotiator.pending is None


async def test_epoch_poisoning_is_refused_and_the_mesh_still_replans(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="peers.mesh")
    mesh = Mesh(tmp_path)
    try:
        sa, sb = free_socket(), free_socket()
        a = await mesh.start("a", sa, peers=[sb.getsockname()[1]])
        b = await mesh.start("b", sb, peers=[sa.getsockname()[1]])
        await until(lambda: agreed(a, b) and len(a.plan.stages) == 2)
        proposer, member = roles(a, b)
        epoch = member.plan.epoch
        body = proposer.committed_plan.to_body()  # a layout that is otherwise fine
        to_member = proposer.neighbours.link(member.node_id)
        for poisoned in (2**64 - 1, 2**40, epoch + 1_000_000):
            assert to_member.offer(raw("plan_propose", poisoned, **body))
        # and a refusal that claims a huge epoch, which would make the proposer outbid it
        to_proposer = member.neighbours.link(proposer.node_id)
        to_proposer.offer(raw("plan_ack", 2**40, ok=False, reason="outbid this"))
        to_proposer.offer(raw("plan_ack", epoch + 1_000_000, ok=False, reason="outbid this"))
        # wait until every poisoned frame was handled: refused by the codec (bad frames) or the negotiator
        from_proposer = member.neighbours.link(proposer.node_id)
        await until(lambda: from_proposer.bad_frames == 2 and refusals(caplog, "jumps more than"), what="refusals")
        await until(lambda: refusals(caplog, "too far above"), what="the proposer refusing the huge refusal")
        assert member.negotiator.highest_epoch == epoch and unchanged(member, epoch)
        assert proposer.negotiator.highest_epoch == epoch and unchanged(proposer, epoch)
        assert not to_member.closed  # two bad frames are answered, not fatal

        sc = free_socket()  # a third node joins: the mesh must still be able to re-plan
        c = await mesh.start("c", sc, peers=[sa.getsockname()[1], sb.getsockname()[1]])
        await until(lambda: agreed(a, b, c) and len(a.plan.members) == 3, what="a re-plan after the poisoning")
        assert epoch < a.plan.epoch <= epoch + 3
    finally:
        await mesh.stop()


@pytest.mark.parametrize(
    "attack",
    [
        "too_many_layers",  # a plan for a 24-layer model: contiguous and complete by its own account
        "other_model",  # the fingerprint of another model
        "one_node_twice",  # the same node holds two stages
        "not_the_proposer",  # proposed by a member that is not the lowest node id
        "stage_for_a_stranger",  # a stage for a node id that is not a member
    ],
)
async def test_bad_proposals_are_refused_and_nothing_is_loaded(tmp_path, caplog, attack):
    caplog.set_level(logging.INFO, logger="peers.mesh")
    loads: list[int] = []
    mesh = Mesh(tmp_path)
    try:

        async def load(plan, stage) -> None:
            loads.append(plan.epoch)

        a, b = await linked_pair(mesh, node_kw={"load_slice": load})
        proposer, member = roles(a, b)
        epoch = member.plan.epoch
        body = proposer.committed_plan.to_body()
        (lo, _, split), (hi, _, n) = body["stages"]
        sender, target = proposer, member
        if attack == "too_many_layers":
            body.update(n_layers=2 * n, stages=[[lo, 0, split], [hi, split, 2 * n]])
        elif attack == "other_model":
            body["fingerprint"] = "another-model"
        elif attack == "one_node_twice":
            body["stages"] = [[lo, 0, 2], [hi, 2, split], [lo, split, n]]
        elif attack == "not_the_proposer":
            sender, target = member, proposer
        else:
            body.update(stages=[[lo, 0, split], ["0000000000000000", split, n]], members=[*body["members"], "0"])
        loads.clear()
        before = refusals(caplog, "")
        assert sender.neighbours.link(target.node_id).offer(raw("plan_propose", epoch + 1, **body))
        await until(lambda: refusals(caplog, "") > before, what=f"{attack}: the proposal being refused")
        assert unchanged(target, epoch), f"{attack}: the target took the proposal up"
        assert loads == [], f"{attack}: the target loaded a slice for it"
        assert target.negotiator.highest_epoch == epoch
    finally:
        await mesh.stop()
