"""Plan negotiation and membership as pure state machines, driven by a tiny in-memory network."""

from __future__ import annotations

import pytest

from peers.codec import Message, SchemaError
from peers.hello import Hello
from peers.membership import Membership, PeerJoined, PeerLost
from peers.negotiation import Committed, LoadSlice, Negotiator, Plan, PlanFailed, Rejected, Send
from peers.planner import ModelShape, PeerResources

SHAPE = ModelShape(n_layers=12, bytes_per_layer=100, replicated_bytes=1000)
RES = {n: PeerResources(n, 10_000) for n in ("a", "b", "c")}


class Net:
    """Delivers Send actions between negotiators and completes loads at once (or fails them)."""

    def __init__(self, names, debounce=1.0):
        self.nodes = {n: Negotiator(n, SHAPE, debounce=debounce, ack_timeout=30) for n in names}
        self.now = 0.0
        self.log: list[tuple[str, object]] = []
        self.fail_load: set[str] = set()
        self.cut: set[tuple[str, str]] = set()  # (from, to) pairs that drop messages

    def view(self, name, members):
        self.run(name, self.nodes[name].set_members({m: RES[m] for m in members}, self.now))

    def run(self, name, actions):
        queue = [(name, a) for a in actions]
        while queue:
            who, action = queue.pop(0)
            self.log.append((who, action))
            node = self.nodes[who]
            if isinstance(action, Send) and (who, action.to) not in self.cut and action.to in self.nodes:
                queue += [(action.to, a) for a in self.nodes[action.to].on_message(who, action.msg, self.now)]
            elif isinstance(action, LoadSlice):
                ok = who not in self.fail_load
                queue += [(who, a) for a in node.loaded(action.plan.epoch, ok, self.now, "" if ok else "disk full")]

    def advance(self, seconds, step=0.5):
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for name, node in self.nodes.items():
                self.run(name, node.tick(self.now))

    def committed(self):
        return {n: node.committed for n, node in self.nodes.items()}


def test_three_peers_commit_the_same_plan():
    net = Net("abc")
    for n in "abc":
        net.view(n, "abc")
    net.advance(0.5)
    assert all(p is None for p in net.committed().values()), "debounce: nothing before it has elapsed"
    net.advance(1.0)
    plans = net.committed()
    assert len({p for p in plans.values()}) == 1
    plan = plans["a"]
    assert plan.epoch == 1 and [s.node_id for s in plan.stages] == ["a", "b", "c"]
    assert [s.n_layers for s in plan.stages] == [4, 4, 4]
    proposers = {who for who, a in net.log if isinstance(a, Send) and a.msg.type == "plan_propose"}
    assert proposers == {"a"}  # lowest node id proposes


def test_membership_change_replans_after_debounce():
    net = Net("abc")
    for n in "abc":
        net.view(n, "abc")
    net.advance(2)
    del net.nodes["c"]
    for n in "ab":
        net.view(n, "ab")
    net.advance(2)
    plans = net.committed()
    assert plans["a"] == plans["b"] and plans["a"].epoch == 2 and plans["a"].members == ("a", "b")


def test_stale_epoch_messages_are_rejected():
    n = Negotiator("b", SHAPE)
    plan = Plan(5, (), ("a", "b"), 12)
    body = {"stages": [["a", 0, 6], ["b", 6, 12]], "members": ["a", "b"], "n_layers": 12, "fingerprint": ""}
    assert isinstance(n.on_message("a", Message("plan_propose", body, 5), 0)[0], LoadSlice)
    # an older proposal gets a negative ack that carries the epoch already seen
    actions = n.on_message("x", Message("plan_propose", body, 4), 0)
    nack = next(a for a in actions if isinstance(a, Send))
    assert nack.msg.type == "plan_ack" and nack.msg["ok"] is False and nack.msg.epoch == 5
    assert "stale epoch 4" in nack.msg["reason"]
    # so does a replay of the current one
    assert any(isinstance(a, Rejected) for a in n.on_message("a", Message("plan_propose", body, 5), 0))
    # a commit for another epoch, or from someone other than the proposer, changes nothing
    assert isinstance(n.on_message("a", Message("plan_commit", {}, 4), 0)[0], Rejected)
    assert isinstance(n.on_message("x", Message("plan_commit", {}, 5), 0)[0], Rejected)
    assert n.committed is None
    assert [type(a) for a in n.loaded(5, True, 0)] == [Send]
    assert isinstance(n.on_message("a", Message("plan_commit", {}, 5), 0)[0], Committed)
    assert n.committed.epoch == 5 and plan.epoch == n.committed.epoch


def test_stale_ack_is_rejected_by_proposer():
    net = Net("ab")
    net.cut.add(("b", "a"))  # a never hears b's ack
    for n in "ab":
        net.view(n, "ab")
    net.advance(2)
    a = net.nodes["a"]
    assert a.pending and a.pending.epoch == 1
    assert isinstance(a.on_message("b", Message("plan_ack", {"ok": True}, 0), net.now)[0], Rejected)
    assert a.pending and a.committed is None


def test_competing_proposers_converge_on_the_lowest():
    net = Net("abc")
    net.view("a", "a")  # a sees nobody yet
    for n in "bc":
        net.view(n, "bc")  # b thinks it is the lowest
    net.cut |= {("a", "b"), ("a", "c"), ("b", "a"), ("c", "a")}
    net.advance(2)
    assert net.nodes["b"].committed.members == ("b", "c")
    assert net.nodes["a"].committed.members == ("a",)
    net.cut.clear()  # the views converge: everyone now sees everyone
    for n in "abc":
        net.view(n, "abc")
    net.advance(3)
    plans = net.committed()
    assert len(set(plans.values())) == 1 and plans["a"].members == ("a", "b", "c")
    assert plans["a"].epoch > 1  # above every epoch seen before, whoever proposed it


def test_load_failure_abandons_and_retries_later():
    net = Net("ab")
    net.fail_load.add("b")
    for n in "ab":
        net.view(n, "ab")
    net.advance(2)
    failed = [a for who, a in net.log if isinstance(a, PlanFailed)]
    assert failed and "load failed: disk full" in failed[0].reason
    assert net.nodes["a"].committed is None and net.nodes["a"].error
    net.fail_load.clear()
    net.advance(6)
    assert net.nodes["a"].committed == net.nodes["b"].committed is not None


def test_unplannable_mesh_reports_missing_memory_once():
    n = Negotiator("a", ModelShape(100, 1000, 0))
    n.set_members({"a": PeerResources("a", 5000)}, 0)
    actions = n.tick(2)
    assert isinstance(actions[0], PlanFailed) and "Missing" in actions[0].reason
    assert n.tick(10) == []  # no retry loop until the members change


@pytest.mark.parametrize(
    "stages",
    [
        [["a", 0, 6], ["b", 7, 12]],  # a gap (layer 6 unassigned)
        [["a", 0, 6], ["b", 5, 12]],  # an overlap
        [["a", 0, 6], ["b", 6, 6]],  # an empty stage
        [["a", 0, 6]],  # not every layer
        [["a", 0, 6], ["z", 6, 12]],  # a stage for a non-member
        [["a", 0, "6"], ["b", 6, 12]],  # a layer that is not an int
        [7],
    ],
)
def test_malformed_plans_are_refused(stages):
    msg = Message("plan_propose", {"stages": stages, "members": ["a", "b"], "n_layers": 12, "fingerprint": ""}, 1)
    with pytest.raises(SchemaError):
        Plan.from_message(msg)


def hello(node_id: str, instance: str = "i1") -> Hello:
    return Hello(node_id, instance, 0.0, "m", "fp", 1)


def test_membership_join_silence_and_restart():
    m = Membership(timeout=3)
    assert m.heard(hello("b"), 0) == [PeerJoined(hello("b"))]
    assert m.heard(hello("b"), 1) == []
    m.touch("b", 2.5)
    assert m.expire(5) == []
    lost = m.expire(6)
    assert lost == [PeerLost("b", "silent for more than 3 s")] and "b" not in m.members
    m.heard(hello("b"), 7)
    events = m.heard(hello("b", "i2"), 8)  # same node id, new process
    assert [type(e) for e in events] == [PeerLost, PeerJoined]


def test_proposer_outbids_a_higher_epoch_it_had_not_seen():
    net = Net("ab")
    net.nodes["b"].highest_epoch = 5  # b took part in another proposer's round that a never saw
    for n in "ab":
        net.view(n, "ab")
    net.advance(2)
    proposals = [a.msg.epoch for who, a in net.log if isinstance(a, Send) and a.msg.type == "plan_propose"]
    assert proposals == [1, 6]
    assert net.nodes["a"].committed == net.nodes["b"].committed and net.nodes["a"].committed.epoch == 6


def test_a_refusal_naming_the_open_proposal_abandons_it_and_an_absurd_epoch_is_refused():
    net = Net("ab")
    net.cut.add(("b", "a"))  # a never hears b's ack: its proposal stays open
    for n in "ab":
        net.view(n, "ab")
    net.advance(2)
    a = net.nodes["a"]
    assert a.pending and a.pending.epoch == 1
    refusal = Message("plan_ack", {"ok": False, "reason": "no", "refused": 1}, 0)
    assert isinstance(a.on_message("b", refusal, net.now)[0], PlanFailed) and a.pending is None

    b = net.nodes["b"]
    b.committed, b.pending, b.highest_epoch = Plan(7, (), ("a", "b"), 12), None, 7  # a node with a plan, at 7
    body = {"stages": [["a", 0, 6], ["b", 6, 12]], "members": ["a", "b"], "n_layers": 12, "fingerprint": ""}
    for epoch in (7 + 1025, 2**32):
        actions = b.on_message("a", Message("plan_propose", body, epoch), 0)
        assert isinstance(actions[-1], Rejected) and b.highest_epoch == 7
        assert actions[0].msg["refused"] == epoch and actions[0].msg.epoch == 7
    assert isinstance(b.on_message("b", Message("plan_propose", body, 8), 0)[-1], Rejected)  # not the proposer
    assert isinstance(b.on_message("a", Message("plan_propose", body, 8), 0)[0], LoadSlice)
