"""LayerRange: the one layer-range convention (half-open), its split and its command-line form."""

from __future__ import annotations

import itertools

import pytest

from models.ranges import LayerRange


def test_half_open():
    r = LayerRange(2, 5)
    assert r.n_layers == 3 and list(r) == [2, 3, 4] and str(r) == "2:5"
    assert LayerRange(4, 4).n_layers == 0 and list(LayerRange(4, 4)) == []
    with pytest.raises(ValueError, match="not a range"):
        LayerRange(5, 2)
    with pytest.raises(ValueError, match="not a range"):
        LayerRange(-1, 2)


@pytest.mark.parametrize(("n", "k"), [(30, 1), (30, 4), (30, 7), (6, 6), (5, 2)])
def test_split_covers_every_layer_once_near_equally(n, k):
    parts = LayerRange.split(n, k)
    assert len(parts) == k and parts[0].first == 0 and parts[-1].stop == n
    assert all(a.stop == b.first for a, b in itertools.pairwise(parts))
    sizes = [p.n_layers for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_split_refuses_impossible():
    with pytest.raises(ValueError, match="cannot split"):
        LayerRange.split(3, 4)
    with pytest.raises(ValueError, match="cannot split"):
        LayerRange.split(3, 0)


def test_parse():
    assert LayerRange.parse(None, 30) == LayerRange(0, 30) == LayerRange.parse("", 30)
    assert LayerRange.parse("4:", 30) == LayerRange(4, 30)
    assert LayerRange.parse(":8", 30) == LayerRange(0, 8)
    assert LayerRange.parse("10:20", 30) == LayerRange(10, 20)
    with pytest.raises(ValueError, match="past the model's 30 layers"):
        LayerRange.parse("10:40", 30)
    with pytest.raises(ValueError, match="whole numbers"):
        LayerRange.parse("a:b", 30)
