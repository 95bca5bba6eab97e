"""The layer split and the size strings users type."""

from __future__ import annotations

import itertools

import pytest

from peers.planner import InsufficientMemoryError, ModelShape, PeerResources, PlanError, plan_layers
from peers.sizes import format_size, parse_size

MiB, GiB = 1024**2, 1024**3
SHAPE = ModelShape(n_layers=30, bytes_per_layer=10 * MiB, replicated_bytes=100 * MiB)


def peer(node_id: str, budget: int, compute: float = 1.0) -> PeerResources:
    return PeerResources(node_id, budget, compute)


def layers(stages) -> dict[str, int]:
    return {s.node_id: s.n_layers for s in stages}


def assert_contiguous(stages, n_layers):
    assert stages[0].layers.first == 0 and stages[-1].layers.stop == n_layers
    for a, b in itertools.pairwise(stages):
        assert b.layers.first == a.layers.stop
    assert all(s.n_layers >= 1 for s in stages)


def test_equal_peers_split_evenly_in_node_id_order():
    stages = plan_layers([peer("c", GiB), peer("a", GiB), peer("b", GiB)], SHAPE)
    assert [s.node_id for s in stages] == ["a", "b", "c"]
    assert layers(stages) == {"a": 10, "b": 10, "c": 10}
    assert_contiguous(stages, 30)


def test_split_is_proportional_to_usable_memory():
    # usable: 100, 200, 300 MiB (budget minus the 100 MiB every peer replicates)
    stages = plan_layers([peer("a", 200 * MiB), peer("b", 300 * MiB), peer("c", 400 * MiB)], SHAPE)
    assert layers(stages) == {"a": 5, "b": 10, "c": 15}
    assert_contiguous(stages, 30)


def test_compute_is_a_secondary_weight():
    equal = layers(plan_layers([peer("a", GiB), peer("b", GiB)], SHAPE))
    skewed = layers(plan_layers([peer("a", GiB, compute=4.0), peer("b", GiB, compute=1.0)], SHAPE))
    assert equal == {"a": 15, "b": 15}
    assert skewed["a"] > skewed["b"]
    assert skewed["a"] < 22  # memory stays the first criterion: compute only tilts the split


def test_capacity_is_never_exceeded():
    # a's speed earns it a target of ~9 layers, but it has room for 3; the rest spills to b
    stages = plan_layers([peer("a", 130 * MiB, compute=1000.0), peer("b", 500 * MiB)], SHAPE)
    assert layers(stages) == {"a": 3, "b": 27}


def test_every_stage_gets_at_least_one_layer():
    stages = plan_layers([peer("a", 115 * MiB), peer("b", 8 * GiB)], SHAPE)
    assert layers(stages) == {"a": 1, "b": 29}


def test_too_small_peer_stays_pure_originator():
    stages = plan_layers([peer("a", 105 * MiB), peer("b", GiB), peer("c", GiB)], SHAPE)
    assert "a" not in layers(stages)
    assert layers(stages) == {"b": 15, "c": 15}


def test_kv_reserve_counts_against_memory():
    shape = ModelShape(4, 10 * MiB, 0, kv_bytes_per_token_per_layer=2560, context=4096)  # +10 MiB per layer
    stages = plan_layers([peer("a", 40 * MiB), peer("b", 40 * MiB)], shape)
    assert layers(stages) == {"a": 2, "b": 2}
    with pytest.raises(InsufficientMemoryError):
        plan_layers([peer("a", 70 * MiB)], shape)


def test_runtime_bytes_count_against_every_peers_memory():
    """--memory is the whole process: the runtime comes off every peer's budget before any layer."""
    shape = ModelShape(4, 10 * MiB, 5 * MiB, runtime_bytes=20 * MiB)
    stages = plan_layers([peer("a", 45 * MiB), peer("b", 45 * MiB)], shape)  # 20 left each: 2 layers
    assert layers(stages) == {"a": 2, "b": 2}
    with pytest.raises(InsufficientMemoryError) as err:
        plan_layers([peer("a", 44 * MiB), peer("b", 45 * MiB)], shape)
    assert "runtime 20.0 MiB" in str(err.value)


def test_more_peers_than_layers():
    shape = ModelShape(2, MiB, 0)
    stages = plan_layers([peer("a", 10 * MiB), peer("b", 30 * MiB), peer("c", 20 * MiB)], shape)
    assert layers(stages) == {"b": 1, "c": 1}


def test_insufficient_memory_says_how_much_is_missing():
    with pytest.raises(InsufficientMemoryError) as err:
        plan_layers([peer("a", 200 * MiB), peer("b", 150 * MiB)], SHAPE)  # room for 10 + 5 layers
    assert err.value.missing_bytes == 15 * 10 * MiB
    text = str(err.value)
    assert "Missing: 150.0 MiB" in text and "room for 15 layers" in text and "--memory" in text


def test_empty_mesh_is_an_error():
    with pytest.raises(PlanError):
        plan_layers([], SHAPE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GiB),
        ("512MiB", 512 * MiB),
        ("1.5 GiB", int(1.5 * GiB)),
        ("100", 100),
        ("2GB", 2 * 10**9),
        ("4k", 4000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 parsecs", "-1GiB", "1e9"])
def test_parse_size_rejects_with_example(text):
    with pytest.raises(ValueError, match=r"e\.g\. 2GiB"):
        parse_size(text)


def test_format_size():
    assert format_size(150 * MiB) == "150.0 MiB"
    assert format_size(int(1.5 * GiB)) == "1.5 GiB"
    assert format_size(12) == "12 B"


def stage_peer(node_id: str, budget: int) -> PeerResources:
    return PeerResources(node_id, budget, role="stage")


def test_originator_work_takes_layers_off_the_originating_peer():
    # "a" originates, "b" and "c" only serve stages; a's head, verification and drafting cost 3 layers' time
    # a round: 30 + 3 layers' worth of work split evenly is 11 each, so "a" keeps 11 - 3 = 8 and the others 11
    a = PeerResources("a", GiB, origin_layers=3.0)
    stages = plan_layers([a, stage_peer("b", GiB), stage_peer("c", GiB)], SHAPE)
    assert layers(stages) == {"a": 8, "b": 11, "c": 11}
    assert_contiguous(stages, 30)
    # a stage peer's figure never counts: it does not originate
    b = PeerResources("b", GiB, role="stage", origin_layers=3.0)
    assert layers(plan_layers([peer("a", GiB), b, stage_peer("c", GiB)], SHAPE)) == {"a": 10, "b": 10, "c": 10}
    # where every peer may originate the work cancels out: measured noise must not skew an even split
    c = PeerResources("c", GiB, origin_layers=2.0)
    assert layers(plan_layers([a, peer("b", GiB), c], SHAPE)) == {"a": 10, "b": 10, "c": 10}


def test_originator_work_beyond_its_share_leaves_the_peer_without_layers():
    busy = PeerResources("a", GiB, origin_layers=20.0)
    stages = plan_layers([busy, stage_peer("b", GiB), stage_peer("c", GiB)], SHAPE)
    assert layers(stages) == {"b": 15, "c": 15}
    # unless the others cannot hold the model without it: then it still takes the layers they cannot
    small = 100 * MiB + 12 * 10 * MiB  # room for 12 layers each
    stages = plan_layers([busy, stage_peer("b", small), stage_peer("c", small)], SHAPE)
    assert layers(stages)["a"] >= 6 and sum(layers(stages).values()) == 30


def test_originator_role_holds_no_layers():
    head = PeerResources("a", 8 * GiB, compute_score=4.0, role="originator")
    stages = plan_layers([head, peer("b", GiB), peer("c", GiB)], SHAPE)
    assert [s.node_id for s in stages] == ["b", "c"]
    assert layers(stages) == {"b": 15, "c": 15}
    with pytest.raises(InsufficientMemoryError):
        plan_layers([head], SHAPE)


def test_bad_role_or_work_is_refused_with_the_peer_named():
    with pytest.raises(ValueError, match="peer x: role 'head'"):
        PeerResources("x", GiB, role="head")
    with pytest.raises(ValueError, match="peer x: originator work"):
        PeerResources("x", GiB, origin_layers=-1.0)


def test_role_and_originator_work_travel_in_the_hello_and_old_hellos_still_parse():
    from peers.codec import SchemaError
    from peers.hello import Hello

    h = Hello("a", "i", 0.0, "m", "fp", GiB, role="originator", origin_layers=4.5)
    back = Hello.from_wire(h.to_wire())
    assert (back.role, back.origin_layers) == ("originator", 4.5)
    old = {k: v for k, v in h.to_wire().items() if k not in ("role", "origin_layers")}  # a peer before roles
    assert (Hello.from_wire(old).role, Hello.from_wire(old).origin_layers) == ("both", 0.0)
    with pytest.raises(SchemaError, match=r"hello\.role"):
        Hello.from_wire({**h.to_wire(), "role": "boss"})
    with pytest.raises(SchemaError, match=r"hello\.origin_layers"):
        Hello.from_wire({**h.to_wire(), "origin_layers": -2.0})


def test_each_peer_is_planned_in_its_own_weight_format():
    """Formats are chosen per device: a peer holding bf16 layers (here 4x the int4 bytes) fits fewer of
    them in the same budget, and its replicated parts take more of it."""
    int4 = PeerResources("a", 400 * MiB, layer_bytes=10 * MiB, replicated_bytes=100 * MiB)
    bf16 = PeerResources("b", 400 * MiB, layer_bytes=40 * MiB, replicated_bytes=160 * MiB)
    stages = plan_layers([int4, bf16], SHAPE)
    # capacity: a (400 - 100) / 10 = 30 layers, b (400 - 160) / 40 = 6; shares 30 : 6 of 30 layers
    assert layers(stages) == {"a": 25, "b": 5}
    assert_contiguous(stages, 30)
    # a peer that does not say (an older one) is counted in the proposer's format, as before
    same = [PeerResources("a", 400 * MiB), PeerResources("b", 400 * MiB, layer_bytes=10 * MiB)]
    assert layers(plan_layers(same, SHAPE)) == {"a": 15, "b": 15}
    with pytest.raises(InsufficientMemoryError):  # 6 + 6 bf16 layers cannot hold 30
        plan_layers([bf16, PeerResources("c", 400 * MiB, layer_bytes=40 * MiB, replicated_bytes=160 * MiB)], SHAPE)
    with pytest.raises(ValueError, match="negative held bytes"):
        PeerResources("x", GiB, layer_bytes=-1)


def test_held_bytes_travel_in_the_hello_and_old_hellos_still_parse():
    from peers.codec import SchemaError
    from peers.hello import Hello

    h = Hello("a", "i", 0.0, "m", "fp", GiB, layer_bytes=3 * MiB, replicated_bytes=50 * MiB)
    back = Hello.from_wire(h.to_wire())
    assert (back.layer_bytes, back.replicated_bytes) == (3 * MiB, 50 * MiB)
    old = {k: v for k, v in h.to_wire().items() if k not in ("layer_bytes", "replicated_bytes")}
    assert (Hello.from_wire(old).layer_bytes, Hello.from_wire(old).replicated_bytes) == (0, 0)
    with pytest.raises(SchemaError, match=r"hello\.layer_bytes"):
        Hello.from_wire({**h.to_wire(), "layer_bytes": -5})
