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


@dataclass(frozen=True)
class PeerResources:
    node_id: str
    memory_budget: int
    compute_score: float = 1.0


@dataclass(frozen=True)
class Assignment:
    """One stage of a plan: the peer ``node_id`` runs decoder layers ``layers``."""

    node_id: str
    layers: LayerRange

    @property
    def n_layers(self) -> int:
        return self.layers.n_layers


def layer_capacity(peer: PeerResources, shape: ModelShape) -> int:
    usable = peer.memory_budget - shape.fixed_bytes
    return max(0, usable // max(1, shape.bytes_per_stage_layer))


def plan_layers(
    peers: Iterable[PeerResources], shape: ModelShape, compute_weight: float = 0.25
) -> tuple[Assignment, ...]:
    """Split ``shape.n_layers`` into stages in ring order (ascending node id).

    Each peer's target share is proportional to its usable memory, scaled by
    ``(compute / mean compute) ** compute_weight``; layers are then dealt one at a time to the
    peer furthest below its target that still has room, after every capable peer got one.
    Peers without room for a single layer get no stage and stay pure originators.
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
    weight = {
        p.node_id: (p.memory_budget - shape.fixed_bytes) * (s / mean_score) ** compute_weight
        for p, s in zip(capable, scores)
    }
    if len(capable) > shape.n_layers:  # more peers than layers: the strongest ones get the layers
        keep = sorted(capable, key=lambda p: (-weight[p.node_id], p.node_id))[: shape.n_layers]
        capable = [p for p in capable if p in keep]
    total_w = sum(weight[p.node_id] for p in capable)
    target = {p.node_id: shape.n_layers * weight[p.node_id] / total_w for p in capable}
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
