"""Agreeing on one layer split: propose, load, acknowledge, commit. Sans-IO.

The lowest node id among the members it sees is the proposer. It plans with the next epoch and
sends ``plan_propose``; every member loads its slice and answers ``plan_ack``; once all have
acknowledged (itself included) the proposer sends ``plan_commit``. Epochs only grow: a proposal at
or below the highest epoch a peer has seen is refused with a negative ack carrying that epoch, and
the proposer retries above it, so two would-be proposers (views not yet converged) cannot leave the
mesh split. The proposer also re-plans whenever the committed plan's members differ from the ones
it sees, which is what eventually settles every race.

``Negotiator`` takes events (members changed, a message, a load finished, the clock) and returns
actions; ``MeshNode`` carries them out. See PROTOCOL.md for the state diagram.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from models.ranges import LayerRange
from peers.codec import MAX_EPOCH, Message, SchemaError
from peers.planner import Assignment, ModelShape, PeerResources, PlanError, plan_layers

log = logging.getLogger(__name__)
RETRY_AFTER_FAILURE = 5.0  # seconds before re-proposing after a peer failed to load its slice
# The furthest a proposal or a refusal may move a node's epoch that has committed a plan: honest
# jumps are one, or a few when proposers raced. A node that never committed accepts any epoch the
# codec lets through (it may join a mesh that has re-planned many times).
MAX_EPOCH_STEP = 1024


@dataclass(frozen=True)
class Plan:
    epoch: int
    stages: tuple[Assignment, ...]
    members: tuple[str, ...]  # every peer in the mesh, stages or not (pure originators)
    n_layers: int
    fingerprint: str = ""  # the model the plan splits: a proposal for another model is refused

    def stage_of(self, node_id: str) -> Assignment | None:
        return next((s for s in self.stages if s.node_id == node_id), None)

    @property
    def layout(self) -> tuple[tuple[str, int, int], ...]:
        """Who holds which layers: two plans with the same layout serve requests the same way."""
        return tuple((s.node_id, s.layers.first, s.layers.stop) for s in self.stages)

    def to_body(self) -> dict[str, Any]:
        return {
            "stages": [list(stage) for stage in self.layout],
            "members": list(self.members),
            "n_layers": self.n_layers,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_message(cls, msg: Message) -> Plan:
        """Validate a proposal beyond the codec's types: each layer held exactly once, stages are members."""
        members, n_layers, stages, nxt = tuple(msg["members"]), msg["n_layers"], [], 0
        if not members or len(set(members)) != len(members):
            raise SchemaError(f"plan members {list(members)} are empty or repeat a node")
        for s in msg["stages"]:
            if not (
                isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and all(type(x) is int for x in s[1:])
            ):
                raise SchemaError(f"plan stage {s!r} is not [node_id, first_layer, stop_layer]")
            if s[1] != nxt or s[2] <= s[1] or s[0] not in members:
                raise SchemaError(f"plan stage {s!r} breaks contiguity at layer {nxt} or names a non-member")
            stages.append(Assignment(s[0], LayerRange(s[1], s[2])))
            nxt = s[2]
        if nxt != n_layers or not stages:
            raise SchemaError(f"plan covers layers 0:{nxt}, not all {n_layers}")
        if len({a.node_id for a in stages}) != len(stages):
            raise SchemaError("plan gives one node two stages")
        return cls(msg.epoch, tuple(stages), members, n_layers, msg["fingerprint"])


# --- actions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True)
class LoadSlice:
    plan: Plan


@dataclass(frozen=True)
class Committed:
    plan: Plan


@dataclass(frozen=True)
class PlanFailed:
    reason: str


@dataclass(frozen=True)
class Rejected:
    sender: str
    reason: str


PlanAction = Send | LoadSlice | Committed | PlanFailed | Rejected


class Negotiator:
    def __init__(
        self,
        node_id: str,
        shape: ModelShape,
        debounce: float = 1.0,
        ack_timeout: float = 300.0,
        fingerprint: str = "",
    ) -> None:
        self.node_id, self.shape, self.debounce, self.ack_timeout = node_id, shape, debounce, ack_timeout
        self.fingerprint = fingerprint
        self.resources: dict[str, PeerResources] = {}
        self.highest_epoch = 0
        self.committed: Plan | None = None
        self.pending: Plan | None = None
        self.proposer: str | None = None
        self.error: str | None = None
        self._acks: set[str] = set()
        self._self_loaded = False
        self._replan_at: float | None = None
        self._ack_deadline = float("inf")
        self._unplannable: frozenset[str] | None = None  # members for which planning already failed

    @property
    def is_proposer(self) -> bool:
        return bool(self.resources) and min(self.resources) == self.node_id

    # --- events ----------------------------------------------------------------------------------

    def set_members(self, resources: dict[str, PeerResources], now: float) -> list[PlanAction]:
        """The member set (this node included) changed: re-plan once it has been quiet for a moment."""
        self.resources = dict(resources)
        self._replan_at = now + self.debounce
        return []

    def tick(self, now: float) -> list[PlanAction]:
        if not self.is_proposer:
            return []
        mine = self.pending is not None and self.proposer == self.node_id
        stuck = self._unplannable == frozenset(self.resources)
        if self._replan_at is None and not mine and not stuck and self._out_of_date():
            self._replan_at = now + self.debounce
        if self._replan_at is not None and now >= self._replan_at:
            return self._propose(now)
        if mine and now >= self._ack_deadline and not self._self_loaded:
            self._ack_deadline = now + self.ack_timeout  # our own load is slow (a big slice, an SD card): wait
            return []
        if mine and now >= self._ack_deadline:
            missing = sorted(set(self.pending.members) - self._acks - {self.node_id}) if self.pending else []
            log.warning(
                "plan epoch %d: no ack from %s within %g s; proposing again",
                self.highest_epoch,
                missing,
                self.ack_timeout,
            )
            return self._propose(now)
        return []

    def on_message(self, sender: str, msg: Message, now: float) -> list[PlanAction]:
        if msg.type == "plan_propose":
            return self._on_propose(sender, msg)
        if msg.type == "plan_ack":
            return self._on_ack(sender, msg, now)
        if msg.type == "plan_commit":
            return self._on_commit(sender, msg)
        return []

    def loaded(self, epoch: int, ok: bool, now: float, reason: str = "") -> list[PlanAction]:
        """This node finished loading its slice for ``epoch`` (or failed to)."""
        if self.pending is None or self.pending.epoch != epoch:
            return []  # superseded while loading
        if self.proposer != self.node_id:
            body = {"ok": ok} if ok else {"ok": False, "reason": f"load failed: {reason}"}
            return [Send(self.proposer or "", Message("plan_ack", body, epoch))]
        if not ok:
            return self._abandon(f"this node failed to load its slice: {reason}", now)
        self._self_loaded = True
        return self._maybe_commit()

    # --- internals -------------------------------------------------------------------------------

    def _out_of_date(self) -> bool:
        return self.committed is None or set(self.committed.members) != set(self.resources)

    def _propose(self, now: float) -> list[PlanAction]:
        self._replan_at = None
        try:
            stages = plan_layers(self.resources.values(), self.shape)
        except PlanError as exc:
            self.error, self._unplannable = str(exc), frozenset(self.resources)
            self.pending, self._ack_deadline = None, float("inf")
            return [PlanFailed(str(exc))]
        if self.highest_epoch >= MAX_EPOCH:
            self.error = f"plan epochs are exhausted ({self.highest_epoch}); restart every peer of the mesh"
            return [PlanFailed(self.error)]
        self.error, self._unplannable = None, None
        self.highest_epoch += 1
        members = tuple(sorted(self.resources))
        plan = Plan(self.highest_epoch, stages, members, self.shape.n_layers, self.fingerprint)
        self.pending, self.proposer, self._acks, self._self_loaded = plan, self.node_id, set(), False
        self._ack_deadline = now + self.ack_timeout
        msg = Message("plan_propose", plan.to_body(), plan.epoch)
        return [*(Send(m, msg) for m in plan.members if m != self.node_id), LoadSlice(plan)]

    def _jump_too_far(self, epoch: int) -> bool:
        return self.committed is not None and epoch > self.highest_epoch + MAX_EPOCH_STEP

    def _check_proposal(self, sender: str, msg: Message) -> Plan:
        """The proposal as a plan, if this node may load it; SchemaError says why not."""
        plan = Plan.from_message(msg)
        if plan.n_layers != self.shape.n_layers:
            raise SchemaError(f"plan splits {plan.n_layers} layers; the model has {self.shape.n_layers}")
        if plan.fingerprint != self.fingerprint:
            raise SchemaError(f"plan is for model {plan.fingerprint!r}; this node serves {self.fingerprint!r}")
        if self.node_id not in plan.members:
            raise SchemaError("plan does not list this node as a member")
        if sender != min(plan.members):
            raise SchemaError(f"{sender} is not the proposer of these members (the lowest node id is)")
        return plan

    def _on_propose(self, sender: str, msg: Message) -> list[PlanAction]:
        if msg.epoch <= self.highest_epoch or self._jump_too_far(msg.epoch):
            if msg.epoch <= self.highest_epoch:
                reason = f"stale epoch {msg.epoch}: already at {self.highest_epoch}"
            else:
                reason = f"epoch {msg.epoch} jumps more than {MAX_EPOCH_STEP} past {self.highest_epoch}"
            nack = Message("plan_ack", {"ok": False, "reason": reason, "refused": msg.epoch}, self.highest_epoch)
            return [Send(sender, nack), Rejected(sender, reason)]
        try:
            plan = self._check_proposal(sender, msg)
        except SchemaError as exc:
            # The refusal carries this node's own epoch (it did not adopt the proposal's, so nobody
            # should outbid it: a forged proposal must not set off a re-plan) and names the one refused.
            body = {"ok": False, "reason": str(exc), "refused": msg.epoch}
            return [
                Send(sender, Message("plan_ack", body, self.highest_epoch)),
                Rejected(sender, str(exc)),
            ]
        self.highest_epoch = plan.epoch
        self.pending, self.proposer, self._ack_deadline = plan, sender, float("inf")
        return [LoadSlice(plan)]

    def _on_ack(self, sender: str, msg: Message, now: float) -> list[PlanAction]:
        mine = self.pending is not None and self.proposer == self.node_id
        if not msg["ok"] and self._jump_too_far(msg.epoch):
            return [Rejected(sender, f"refusal carries epoch {msg.epoch}, too far above {self.highest_epoch}")]
        if not msg["ok"] and msg.epoch > self.highest_epoch:
            # A peer has seen a higher epoch (another proposer's): outbid it right away.
            self.highest_epoch = msg.epoch
            return [Rejected(sender, msg.get("reason", "")), *(self._propose(now) if self.is_proposer else [])]
        if mine and self.pending is not None and not msg["ok"] and msg.get("refused") == self.pending.epoch:
            return self._abandon(f"{sender} refused epoch {self.pending.epoch}: {msg.get('reason', '')}", now)
        if not mine or self.pending is None or msg.epoch != self.pending.epoch:
            return [Rejected(sender, f"ack for epoch {msg.epoch}, which is not the open proposal")]
        if not msg["ok"]:
            return self._abandon(f"{sender} refused epoch {msg.epoch}: {msg.get('reason', '')}", now)
        self._acks.add(sender)
        return self._maybe_commit()

    def _on_commit(self, sender: str, msg: Message) -> list[PlanAction]:
        if self.pending is None or msg.epoch != self.pending.epoch or sender != self.proposer:
            return [Rejected(sender, f"commit for epoch {msg.epoch}, which is not the proposal this node loaded")]
        return self._commit()

    def _maybe_commit(self) -> list[PlanAction]:
        assert self.pending is not None
        if not self._self_loaded or not self._acks >= set(self.pending.members) - {self.node_id}:
            return []
        epoch, members = self.pending.epoch, self.pending.members
        return [*(Send(m, Message("plan_commit", {}, epoch)) for m in members if m != self.node_id), *self._commit()]

    def _commit(self) -> list[PlanAction]:
        assert self.pending is not None
        self.committed, self.pending, self.proposer = self.pending, None, None
        self._ack_deadline = float("inf")
        return [Committed(self.committed)]

    def _abandon(self, reason: str, now: float) -> list[PlanAction]:
        """Give up on the open proposal and try a fresh one a little later, not in a hot loop."""
        self.error = reason
        self.pending, self._ack_deadline = None, float("inf")
        self._replan_at = now + max(self.debounce, RETRY_AFTER_FAILURE)
        return [PlanFailed(reason)]
