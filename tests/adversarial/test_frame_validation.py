"""Frames a hostile or broken peer can send a stage, each refused at the worker's door.

Every case puts a well-behaved request ("good", from alice) in the same forward as the attack
("evil", from mallory): before the gate, each attack either hung the torch thread (a parent cycle),
failed the whole batch (an unknown parent, a token outside the vocabulary, a hidden state of the
wrong width), or was computed as garbage (NaN, integer hidden states). Now the attacker's request
alone is refused, its session freed, and the good request's forward runs.
"""

from __future__ import annotations

import threading

import pytest
import torch

from meshd.ring.messages import PROMPT_PARENT, Close, Prune, Segment
from meshd.ring.validate import FrameRejected
from meshd.ring.worker import StageWorker
from models.source import ModelSource
from models.stage import Stage

STEP_BOUND_S = 30.0  # far above a tiny model's forward on a loaded 2-core machine; a hang never ends


@pytest.fixture(scope="module")
def full(tiny_dir) -> Stage:
    return Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")


def prompt(rid: str, origin: str, *, tokens: bool = True, width: int = 64) -> Segment:
    ids = [0, 1, 2]
    parents = [PROMPT_PARENT, 0, 1]
    if tokens:
        return Segment(rid, ids, parents, ids, tokens=[5, 6, 7], commit=True, origin=origin)
    return Segment(rid, ids, parents, ids, hidden=torch.randn(3, width), commit=True, origin=origin)


def tree(rid: str, origin: str) -> Segment:
    return Segment(rid, [3, 4, 5], [2, 2, 3], [3, 3, 4], tokens=[8, 9, 10], origin=origin)


def step_within_bound(w: StageWorker) -> list[Segment]:
    """``w.step()`` in a thread, failing (not hanging the suite) if it does not return in time."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(w.step()), daemon=True)
    t.start()
    t.join(STEP_BOUND_S)
    assert not t.is_alive(), f"the stage's forward did not return within {STEP_BOUND_S} s: the torch thread is stuck"
    return out[0]


def evil(nodes, parents, positions, tokens=None, hidden=None) -> Segment:
    return Segment("evil", nodes, parents, positions, tokens=tokens, hidden=hidden, origin="mallory")


FIRST_STAGE_ATTACKS = {
    "parent cycle": (evil([3, 4], [4, 3], [3, 3], tokens=[1, 2]), "parent 4 is neither"),
    "own parent": (evil([3], [3], [3], tokens=[1]), "parent 3 is neither"),
    "unknown parent": (evil([3], [99], [3], tokens=[1]), "parent 99 is neither"),
    "lengths differ": (evil([3, 4], [2], [3, 3], tokens=[1, 2]), "2 nodes but 1 parents"),
    "tokens short": (evil([3, 4], [2, 3], [3, 4], tokens=[1]), "2 nodes but 1 tokens"),
    "position jump": (evil([3], [2], [900], tokens=[1]), "at position 900, but its parent 2 puts it at 3"),
    "second root": (evil([3], [PROMPT_PARENT], [3], tokens=[1]), "puts it at 0"),
    "token past vocabulary": (evil([3], [2], [3], tokens=[64]), "outside the vocabulary"),
    "negative token": (evil([3], [2], [3], tokens=[-1]), "outside the vocabulary"),
    "node sent twice": (evil([3, 3], [2, 2], [3, 3], tokens=[1, 1]), "node 3 is sent twice"),
    "node already cached": (evil([2], [1], [2], tokens=[1]), "node 2 is sent twice"),
    "hidden at the first stage": (evil([3], [2], [3], hidden=torch.zeros(1, 64)), "takes token ids"),
    "oversized segment": (
        evil(list(range(3, 303)), list(range(2, 302)), list(range(3, 303)), tokens=[1] * 300),
        "1 to 256 rows",
    ),
}


@pytest.mark.parametrize("attack", FIRST_STAGE_ATTACKS)
def test_a_bad_segment_is_refused_and_only_its_request_fails(full, attack):
    seg, why = FIRST_STAGE_ATTACKS[attack]
    w = StageWorker(full, embed=full.embed)
    w.handle(prompt("good", "alice"), "alice")
    w.handle(prompt("evil", "mallory"), "mallory")
    step_within_bound(w)
    w.handle(tree("good", "alice"), "alice")
    with pytest.raises(FrameRejected, match=why) as refused:
        w.handle(seg, "mallory")
    assert (refused.value.spoils, refused.value.tell) == (True, "mallory")  # its originator hears why
    assert "evil" not in w.sessions and "evil" not in w.gate.books  # the attacker's KV is freed
    outs = step_within_bound(w)
    assert [o.request_id for o in outs] == ["good"] and outs[0].hidden.shape == (3, full.cfg.hidden_size)
    w.handle(seg, "mallory")  # anything later for the refused request is dropped like a closed one's
    assert not w.queue


LATER_STAGE_ATTACKS = {
    "too wide": (torch.randn(3, 65), "shape \\(3, 65\\)"),
    "too few rows": (torch.randn(2, 64), "shape \\(2, 64\\)"),
    "three dims": (torch.randn(3, 1, 64), "shape \\(3, 1, 64\\)"),
    "integers": (torch.ones(3, 64, dtype=torch.int64), "dtype torch.int64"),
    "float64": (torch.randn(3, 64, dtype=torch.float64), "dtype torch.float64"),
    "NaN": (torch.full((3, 64), float("nan")), "NaN or infinity"),
    "infinity": (torch.full((3, 64), float("inf")), "NaN or infinity"),
}


@pytest.mark.parametrize("attack", LATER_STAGE_ATTACKS)
def test_bad_hidden_states_are_refused_at_a_later_stage(full, attack):
    hidden, why = LATER_STAGE_ATTACKS[attack]
    w = StageWorker(full)  # no embedding: a later stage
    w.handle(prompt("good", "alice", tokens=False), "stage-0")
    with pytest.raises(FrameRejected, match=why):
        w.handle(Segment("evil", [0, 1, 2], [PROMPT_PARENT, 0, 1], [0, 1, 2], hidden=hidden, origin="mallory"), "x")
    with pytest.raises(FrameRejected, match="takes hidden states, not token ids"):
        w.handle(prompt("evil2", "mallory"), "stage-0")
    outs = step_within_bound(w)
    assert [o.request_id for o in outs] == ["good"]


def test_a_prune_that_orphans_a_live_node_is_refused(full):
    """Killing node 3 while keeping its child 5 left a cached node with no ancestor: the next segment
    under 5 raised KeyError inside the batched forward, failing every request in it."""
    w = StageWorker(full, embed=full.embed)
    for rid, who in (("good", "alice"), ("evil", "mallory")):
        w.handle(prompt(rid, who), who)
    step_within_bound(w)
    for rid, who in (("good", "alice"), ("evil", "mallory")):
        w.handle(tree(rid, who), who)
    step_within_bound(w)
    with pytest.raises(FrameRejected, match="kills node 3 but keeps its child 5"):
        w.handle(Prune("evil", upto=4, keep=[4], commit=[]), "mallory")
    assert "evil" not in w.sessions
    w.handle(Segment("good", [6], [5], [5], tokens=[11], origin="alice"), "alice")
    assert [o.request_id for o in step_within_bound(w)] == ["good"]


def test_prunes_only_move_forward(full):
    w = StageWorker(full, embed=full.embed)
    w.handle(prompt("evil", "mallory"), "mallory")
    w.handle(Prune("evil", upto=10, keep=[], commit=[]), "mallory")
    with pytest.raises(FrameRejected, match="prunes only move forward"):
        w.handle(Prune("evil", upto=9, keep=[], commit=[]), "mallory")


def test_only_the_owner_can_prune_extend_or_close_a_session(full):
    """mallory knows alice's request id (it crossed the LAN): nothing it sends touches alice's session."""
    w = StageWorker(full, embed=full.embed)
    w.handle(prompt("r", "alice"), "alice")
    step_within_bound(w)
    attacks = [
        (Close("r"), "close from mallory for a session that belongs to alice"),
        (Prune("r", upto=100, keep=[], commit=[]), "prune from mallory"),
        (Segment("r", [3], [2], [3], tokens=[1], origin="alice"), "tokens from mallory on behalf of alice"),
        (Segment("r", [3], [2], [3], tokens=[1], origin="mallory"), "belongs to alice"),
        (Segment("r", [3], [2], [3], tokens=[1]), "must name its originator"),
    ]
    for msg, why in attacks:
        with pytest.raises(FrameRejected, match=why) as refused:
            w.handle(msg, "mallory")
        assert (refused.value.spoils, refused.value.tell) == (False, "mallory")  # mallory is told, alice untouched
    assert w.sessions["r"].cache.length == 3 and not w.queue
    w.handle(tree("r", "alice"), "alice")
    assert [o.node_ids for o in step_within_bound(w)] == [[3, 4, 5]]
    w.handle(Close("r"), "alice")  # the owner still can
    assert "r" not in w.sessions
