"""The layer split: which contiguous range of decoder layers each peer holds. Pure, no IO.

Memory decides first (a layer that does not fit cannot run at all), compute second (a faster peer
should hold a few more layers so stages finish at similar times). A peer's budget (``--memory``)
is what its whole process may use: the runtime every process carries (interpreter, torch,
tokenizer), the parts an originator needs that every peer replicates (embeddings, final norm,
LM head, draft head), then per layer its weights as held (quantized or not) plus the KV cache
it reserves for the configured context. Only what is left after the first two counts towards layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from models.ranges import LayerRange
from peers.sizes import format_size


class PlanError(RuntimeError):
    """No valid plan exists for the current members."""


class InsufficientMemoryError(PlanError):
    def __init__(self, message: str, missing_bytes: int) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about the model; ``models`` fills it from the real config."""

    n_layers: int
    bytes_per_layer: int  # weights as held: quantized bytes and scales, or dense ones
    # Embeddings, final norm + LM head, draft: loaded by every peer, whatever its slice.
    replicated_bytes: int
    kv_bytes_per_token_per_layer: int = 0
    context: int = 0
    # What a serving process holds before any weight: interpreter, torch, tokenizer, buffers.
    runtime_bytes: int = 0

    @property
    def fixed_bytes(self) -> int:
        """What every peer spends before its first layer."""
        return self.runtime_bytes + self.replicated_bytes

    @property
    def bytes_per_stage_layer(self) -> int:
        """Weights plus the KV cache reserve one layer needs at the configured context."""
        return self.bytes_per_layer + self.kv_bytes_per_token_per_layer * self.context


ROLES = ("both", "stage", "originator")
# how a peer measures ``origin_layers`` (meshd.serve.daemon), and the simulator models it: one LM head over
# ORIGIN_ROWS rows (a typical segment) plus one ORIGIN_LEVELS-level draft (a typical first segment's)
ORIGIN_ROWS = 8
ORIGIN_LEVELS = 3
# how the simulator cuts a profile's layers (meshd simulate --split): evenly, or as plan_layers does when only
# the originators' peers originate (role both) and the rest serve stages (role stage)
SPLITS = ("even", "origin-aware")


@dataclass(frozen=True)
class PeerResources:
    """What the planner knows of one peer.

    ``role``: ``both`` (holds layers and originates requests), ``stage`` (holds layers, originates
    nothing, so carries no originator work) or ``originator`` (holds no layers at all, FlowSpec's
    head device). ``origin_layers``: the originator's own work per round (LM head, verification,
    drafting), measured on this peer and expressed in decoder layers of its own forward time; in a
    continuous ring that work sits on the same device as its stage, so the planner gives it that many
    fewer layers (a peer whose whole share it exceeds keeps no layers when the others can hold them).
    """

    node_id: str
    memory_budget: int
    compute_score: float = 1.0
    role: str = "both"
    origin_layers: float = 0.0
    # What this peer's own weight format holds (``--weights`` is chosen per device: a board may keep
    # int4 where a laptop keeps bf16): one layer's weights, and the replicated parts (embeddings, LM
    # head, draft head). 0: not said (an older peer), the proposer's own figures in ``ModelShape`` apply.
    layer_bytes: int = 0
    replicated_bytes: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"peer {self.node_id}: role {self.role!r}; choose one of {', '.join(ROLES)}")
        if not self.origin_layers >= 0.0:
            raise ValueError(f"peer {self.node_id}: originator work {self.origin_layers} layers; expected >= 0")
        if self.layer_bytes < 0 or self.replicated_bytes < 0:
            raise ValueError(f"peer {self.node_id}: negative held bytes ({self.layer_bytes}, {self.replicated_bytes})")

    @property
    def origin_load(self) -> float:
        """Layers' worth of originator work this peer's stage must make room for."""
        return self.origin_layers if self.role == "both" else 0.0


@dataclass(frozen=True)
class Assignment:
    """One stage of a plan: the peer ``node_id`` runs decoder layers ``layers``."""

    node_id: str
    layers: LayerRange

    @property
    def n_layers(self) -> int:
        return self.layers.n_layers


def fixed_bytes(peer: PeerResources, shape: ModelShape) -> int:
    """What ``peer`` spends before its first layer: the runtime, and the replicated parts as it holds them."""
    return shape.runtime_bytes + (peer.replicated_bytes or shape.replicated_bytes)


def stage_layer_bytes(peer: PeerResources, shape: ModelShape) -> int:
    """One layer on ``peer``: its weights in the peer's own format, plus the KV reserve at the context."""
    return (peer.layer_bytes or shape.bytes_per_layer) + shape.kv_bytes_per_token_per_layer * shape.context


def layer_capacity(peer: PeerResources, shape: ModelShape) -> int:
    if peer.role == "originator":
        return 0
    usable = peer.memory_budget - fixed_bytes(peer, shape)
    return max(0, usable // max(1, stage_layer_bytes(peer, shape)))


def plan_layers(
    peers: Iterable[PeerResources], shape: ModelShape, compute_weight: float = 0.25
) -> tuple[Assignment, ...]:
    """Split ``shape.n_layers`` into stages in ring order (ascending node id).

    Each peer's target share is proportional to the layers its usable memory holds (in its own weight
    format, :func:`stage_layer_bytes`), scaled by
    ``(compute / mean compute) ** compute_weight``; layers are then dealt one at a time to the
    peer furthest below its target that still has room, after every capable peer got one.
    Peers without room for a single layer, and peers of role ``originator``, get no stage and stay
    pure originators.

    A peer that originates (``origin_load``, in layers of its own forward) should finish a round at the
    same time as the others, so its layers plus that work are what its share counts: the shares are
    cut from ``n_layers`` plus every peer's originator work, and each peer's own work is taken off its
    share. A peer left with less than half a layer holds none, if the others have room for the model.
    This counts only in a ring where some peers serve stages alone (role ``stage``): when every peer may
    originate, each carries the work in turn, it cancels out, and a measured figure would only add noise.
    """
    ring = sorted(peers, key=lambda p: p.node_id)
    if not ring:
        raise PlanError("no peers to plan for")
    if shape.n_layers < 1:
        raise PlanError(f"model has {shape.n_layers} layers")
    cap = {p.node_id: layer_capacity(p, shape) for p in ring}
    total_cap = sum(cap.values())
    if total_cap < shape.n_layers:
        raise _insufficient(ring, shape, total_cap)

    capable = [p for p in ring if cap[p.node_id] > 0]
    scores = [max(p.compute_score, 1e-9) for p in capable]
    mean_score = sum(scores) / len(scores)
    # a peer's share follows how many layers its memory holds (in its own format), not raw bytes
    weight = {
        p.node_id: (p.memory_budget - fixed_bytes(p, shape))
        / stage_layer_bytes(p, shape)
        * (s / mean_score) ** compute_weight
        for p, s in zip(capable, scores)
    }
    if len(capable) > shape.n_layers:  # more peers than layers: the strongest ones get the layers
        keep = sorted(capable, key=lambda p: (-weight[p.node_id], p.node_id))[: shape.n_layers]
        capable = [p for p in capable if p in keep]
    mixed = any(p.role == "stage" for p in capable)
    load = {p.node_id: p.origin_load if mixed else 0.0 for p in capable}
    target = _targets(capable, weight, shape.n_layers, load)
    while len(capable) > 1:  # a peer busy enough originating that its share is under half a layer holds none
        busy = [p for p in capable if load[p.node_id] > 0 and target[p.node_id] < 0.5]
        if not busy:
            break
        idle = min(busy, key=lambda p: (target[p.node_id], p.node_id))
        rest = [p for p in capable if p is not idle]
        if sum(cap[p.node_id] for p in rest) < shape.n_layers:
            break
        capable = rest
        target = _targets(capable, weight, shape.n_layers, load)
    alloc = dict.fromkeys(target, 1)
    for _ in range(shape.n_layers - len(alloc)):
        room = [n for n in alloc if alloc[n] < cap[n]]
        # max() keeps the first of equals, and alloc is in ring order: ties go to the lower node id.
        best = max(room, key=lambda n: target[n] - alloc[n])
        alloc[best] += 1

    stages, first = [], 0
    for p in capable:
        n = alloc[p.node_id]
        stages.append(Assignment(p.node_id, LayerRange(first, first + n)))
        first += n
    return tuple(stages)


def _targets(
    capable: list[PeerResources], weight: dict[str, float], n_layers: int, load: dict[str, float]
) -> dict[str, float]:
    """Each peer's layer share: ``n_layers`` plus all originator work (``load``), split by weight, less its own."""
    total_w = sum(weight[p.node_id] for p in capable)
    work = n_layers + sum(load[p.node_id] for p in capable)
    return {p.node_id: work * weight[p.node_id] / total_w - load[p.node_id] for p in capable}


def _insufficient(ring: list[PeerResources], shape: ModelShape, total_cap: int) -> InsufficientMemoryError:
    per_layer = shape.bytes_per_stage_layer
    missing = (shape.n_layers - total_cap) * per_layer
    return InsufficientMemoryError(
        f"the mesh cannot hold the model: {shape.n_layers} layers need {format_size(per_layer)} each "
        f"(weights + KV cache for {shape.context} tokens) on top of {format_size(shape.fixed_bytes)} "
        f"that every peer needs first (runtime {format_size(shape.runtime_bytes)}, replicated weights "
        f"{format_size(shape.replicated_bytes)}), and the {len(ring)} peer(s) have room for {total_cap} layers. "
        f"Missing: {format_size(missing)} of layer memory. Add a peer with at least "
        f"{format_size(missing + shape.fixed_bytes)} of budget, raise --memory on the existing "
        f"peers, hold the weights in fewer bits (--weights int4), or lower the context or the number of contexts.",
        missing,
    )
