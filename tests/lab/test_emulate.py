"""The benchmark launcher's emulation hooks: a slower device and shaped links, outside the daemon's config."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from meshd.cli import build_parser as meshd_parser
from meshd.config import Config
from meshd.lab.emulate import SlowerStage, build_parser, link_emulation, slowdown
from meshd.ring.messages import Segment
from meshd.ring.worker import StageWorker
from meshd.serve.daemon import Daemon
from meshd.serve.runtime import Runtime
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from peers.negotiation import Plan
from peers.planner import Assignment


def test_device_slowdown_pads_compute_without_changing_results(tiny_dir, monkeypatch):
    """``--device-slowdown k``: a stage behaves like a device k times slower (benchmarks emulate weak boards):
    each forward waits (k - 1) times its own duration, and the worker counts the wait as busy."""
    full = Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")
    layers = full.slice(full.layer_range)
    seg = Segment("r", [0, 1, 2, 3], [-1, 0, 1, 2], [0, 1, 2, 3], tokens=[3, 4, 5, 6], commit=True)
    waits: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        real_sleep(seconds)

    slow_stage = slowdown(4.0)(layers)
    assert isinstance(slow_stage, SlowerStage) and slow_stage.layer_range == layers.layer_range
    plain, slow = StageWorker(layers, embed=full.embed), StageWorker(slow_stage, embed=full.embed)
    (want,) = plain.run([seg])
    monkeypatch.setattr(time, "sleep", sleep)
    t0 = time.perf_counter()
    (got,) = slow.run([seg])
    wall = time.perf_counter() - t0
    assert got.node_ids == want.node_ids and torch.equal(got.hidden, want.hidden)
    assert len(waits) == 1 and waits[0] > 0
    assert slow.busy_seconds >= waits[0] * 4 / 3  # the forward plus 3x its time waited, counted as busy
    assert wall >= slow.busy_seconds * 0.95  # it really waited


def test_only_a_layer_slice_can_be_slowed(tiny_dir):
    full = Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")
    with pytest.raises(ValueError, match="without the vocabulary ends"):
        SlowerStage(full, 2.0)


async def test_the_daemon_serves_its_loaded_slice_through_the_stage_wrapper(tiny_dir):
    """The hook's one place: the slice the daemon loads is wrapped before its worker serves it, after the
    published cost curve was measured on the slice as loaded."""
    src = ModelSource.resolve(str(tiny_dir))
    daemon = Daemon(Config(), stage_wrapper=slowdown(2.0))
    daemon.runtime = Runtime(src, Stage.load(src, LayerRange(0, 0), vocab=True, dtype="fp32"), None)
    curves: list[dict] = []
    daemon.node = SimpleNamespace(set_cost_curve=curves.append)
    mine = Assignment("me", LayerRange(0, 2))
    plan = Plan(1, (mine,), ("me",), src.config.n_layers)
    await daemon._load_slice(plan, mine)
    daemon._install_slice(plan)  # served from the plan's commit on
    stage = daemon.runtime.worker.stage
    assert isinstance(stage, SlowerStage) and stage.factor == 2.0 and stage.layer_range == mine.layers
    assert len(curves) == 1


def test_slowdown_of_one_pads_nothing_and_bad_factors_fail():
    assert slowdown(1.0) is None
    for bad in (0.5, 1001.0):
        with pytest.raises(ValueError, match="--device-slowdown"):
            slowdown(bad)


def test_link_text_becomes_the_links_shaping():
    emu = link_emulation("5ms/100mbit")
    assert (emu.latency_ms, emu.bandwidth_mbps) == pytest.approx((5.0, 100.0))
    emu = link_emulation("500us")  # latency only: unlimited bandwidth
    assert (emu.latency_ms, emu.bandwidth_mbps) == pytest.approx((0.5, 0.0))
    assert link_emulation(None) is None and link_emulation("0/inf") is None
    with pytest.raises(ValueError):
        link_emulation("fast")


def test_emulation_flags_belong_to_the_launcher_not_to_meshd_serve():
    args = build_parser().parse_args(["serve", "--device-slowdown", "3", "--link", "1ms/10mbit", "--port", "9001"])
    assert (args.device_slowdown, args.link, args.port) == (3.0, "1ms/10mbit", 9001)
    for flag in ("--device-slowdown", "--link", "--latency-ms", "--bandwidth-mbps"):
        with pytest.raises(SystemExit):
            meshd_parser().parse_args(["serve", flag, "1"])
