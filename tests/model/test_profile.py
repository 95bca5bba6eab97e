"""Cost curves: the one forward measurement behind the tree budget's curve and the simulator's profiles."""

from __future__ import annotations

import pytest

from models.profile import compare_forward_times, forward_times, monotone, stage_cost_curve
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_forward_times_parts(tiny_dir, clock):
    full = Stage.load(ModelSource.resolve(tiny_dir), dtype="fp32")
    sizes = (1, 4, 16)
    for kw in ({}, {"lm_head": True}, {"layers": False, "lm_head": True}):
        curve = forward_times(full, sizes, context=16, repeats=2, clock=clock, **kw)
        assert list(curve) == list(sizes) and all(s > 0 for s in curve.values()), kw
    with pytest.raises(ValueError, match="vocabulary ends"):
        forward_times(full.slice(LayerRange(0, 2)), sizes, lm_head=True)


def test_stage_cost_curve_is_cached_and_monotone(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src = ModelSource.resolve(tiny_dir)
    stage = Stage.load(src, LayerRange(1, 3), vocab=False, dtype="fp32")
    curve = stage_cost_curve(src, stage, with_lm_head=False, sizes=(1, 2, 8), repeats=1)
    assert curve == monotone(curve) and list((tmp_path / "meshd" / "profiles").glob(f"{src.fingerprint}-1-3-0-*"))
    assert stage_cost_curve(src, stage, with_lm_head=False, sizes=(1, 2, 8), repeats=1) == curve  # from the file


def test_monotone_is_the_suffix_minimum():
    assert monotone({1: 1.0, 2: 3.0, 4: 2.0, 8: 5.0}) == {1: 1.0, 2: 2.0, 4: 2.0, 8: 5.0}


def test_compare_forward_times_measures_every_stage_and_size(tiny_dir):
    src = ModelSource.resolve(tiny_dir)
    stages = {w: Stage.load(src, dtype="fp32", weights=w) for w in ("fp32", "int8")}
    got = compare_forward_times(stages, (1, 4), context=8, repeats=2)
    assert set(got) == {"fp32", "int8"} and all(set(c) == {1, 4} and min(c.values()) > 0 for c in got.values())
