"""The benchmark launcher's emulation hooks: a slower device and shaped links, outside the daemon's config."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from meshd.cli import build_parser as meshd_parser
from meshd.config import Config
from meshd.lab.emulate import DeviceEmulation, SlowerStage, build_parser, link_emulation, slowdown
from meshd.lab.sim.profiles import Profile
from meshd.ring.messages import Segment
from meshd.ring.worker import StageWorker
from meshd.serve.daemon import Daemon
from meshd.serve.runtime import Runtime
from models.drafters import NGramDrafter, can_extend
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.tree import frontier
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


def test_emulation_flags_belong_to_the_launcher_and_to_serve_never_to_the_config():
    args = build_parser().parse_args(["serve", "--device-slowdown", "3", "--link", "1ms/10mbit", "--port", "9001"])
    assert (args.device_slowdown, args.link, args.port) == (3.0, "1ms/10mbit", 9001)
    for flag in ("--device-slowdown", "--latency-ms", "--bandwidth-mbps"):
        with pytest.raises(SystemExit):
            meshd_parser().parse_args(["serve", flag, "1"])
    # a device profile and a link shape: benchmark hooks meshd serve builds (from the lab) and injects
    args = meshd_parser().parse_args(["serve", "--emulate", "jetson-orin-7b:x4", "--link", "1ms/150mbit"])
    assert (args.emulate, args.link) == ("jetson-orin-7b:x4", "1ms/150mbit")
    assert not hasattr(Config(), "emulate") and not hasattr(Config(), "link")


def _profile(layer_ms: float, head_ms: float, per_level_ms: float) -> Profile:
    return Profile.from_json(
        {
            "name": "test-board",
            "n_layers": 4,
            "hidden": 64,
            "layer_ms": {"1": layer_ms, "64": layer_ms},
            "head_ms": {"1": head_ms, "64": head_ms},
            "draft": {"per_call_ms": 0.0, "per_level_ms": per_level_ms},
        }
    )


def test_an_emulated_device_takes_the_profiles_time_and_counts_overruns(tiny_dir):
    """``--emulate``: a slice of k of the model's N layers takes the profile's time for k/N of its layers;
    the LM head and each draft call likewise; a call whose real work took longer counts as an overrun."""
    full = Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")
    half = LayerRange(0, full.cfg.n_layers // 2)
    seg = Segment("r", [0, 1, 2], [-1, 0, 1], [0, 1, 2], tokens=[3, 4, 5], commit=True)
    emu = DeviceEmulation(_profile(60.0, 40.0, 10.0), factor=2.0)  # a slow board: 60 ms per layer, x2
    (want,) = StageWorker(full.slice(half), embed=full.embed).run([seg])
    t0 = time.perf_counter()
    (got,) = StageWorker(emu.stage(full.slice(half)), embed=full.embed).run([seg])
    assert time.perf_counter() - t0 >= 2 * 2 * 0.060  # half of the profile's 4 layers, 60 ms each, x2
    assert torch.equal(got.hidden, want.hidden)
    t0 = time.perf_counter()
    head = emu.vocab(full)
    assert torch.equal(head.logits(want.hidden), full.logits(want.hidden))
    assert time.perf_counter() - t0 >= 2 * 0.040
    drafter = emu.drafters(lambda: NGramDrafter())()
    drafter.reset([1, 2, 1, 2])
    t0 = time.perf_counter()
    tree = drafter.draft([1, 2, 1, 2, 1], top_k=2, depth=3, max_nodes=16)
    assert time.perf_counter() - t0 >= 2 * 0.010 * max(tree.depth)
    assert can_extend(drafter)  # resumable drafting still sees a drafter that grows pools ...
    t0 = time.perf_counter()
    drafter.extend([1, 2, 1, 2, 1], tree, frontier(tree, 2), top_k=2, max_nodes=32)
    assert time.perf_counter() - t0 >= 2 * 0.010  # ... and each level it grows takes a one-level draft's time
    assert not can_extend(emu.drafters(lambda: SimpleNamespace(draft=None))())
    rep = emu.report()
    assert rep["emulated"] and rep["profile"] == "test-board" and rep["factor"] == 2.0
    assert [rep[k]["calls"] for k in ("stage_forwards", "lm_head", "drafts")] == [1, 1, 2]
    assert sum(rep[k]["overruns"] for k in ("stage_forwards", "lm_head", "drafts")) == 0
    fast = DeviceEmulation(_profile(1e-6, 1e-6, 0.0))  # a board faster than this machine: every call overruns
    StageWorker(fast.stage(full.slice(half)), embed=full.embed).run([seg])
    assert fast.report()["stage_forwards"] == {**fast.report()["stage_forwards"], "calls": 1, "overruns": 1}


@pytest.mark.parametrize("wrap", ["emulate", "slowdown"])
def test_a_wrapped_int4a8_slice_keeps_its_own_kernels_and_their_bits(embedded_source, wrap):
    """Both wrappers compute with the slice's own kernels: an int4a8 slice keeps its fused C layers (where
    this CPU runs them), which give a row the same bits in any batch, so the emulated daemons' modes write
    `ar`'s text, sampled answers too. The emulated slice once lost them (it passed no ``weights``): its
    layers ran torch's ops, slower, and not batch-invariant, so on 5 emulated daemons 25 of 26 sampled
    answers of `flow` parted from `ar`'s."""
    layers = Stage.load(embedded_source, LayerRange(0, 2), vocab=False, weights="int4a8")
    ends = Stage.load(embedded_source, LayerRange(0, 0), vocab=True, weights="int4a8")
    wrapped = DeviceEmulation(_profile(1e-6, 1e-6, 0.0)).stage(layers) if wrap == "emulate" else slowdown(1.5)(layers)
    assert wrapped.weights == "int4a8" and (wrapped.fused is None) == (layers.fused is None)
    seg = Segment("r", [0, 1, 2, 3], [-1, 0, 1, 2], [0, 1, 2, 3], tokens=[3, 4, 5, 6], commit=True)
    (want,) = StageWorker(layers, embed=ends.embed).run([seg])
    (got,) = StageWorker(wrapped, embed=ends.embed).run([seg])
    assert torch.equal(got.hidden, want.hidden)


def test_an_emulated_slice_publishes_the_profiles_curve_unless_the_real_one_is_slower(tiny_dir):
    """Originators size segments by the published curve: an emulated slice must publish what its forwards
    take (the profile's time), not this machine's, except where the real computation overruns it."""
    full = Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")
    half = full.slice(LayerRange(0, full.cfg.n_layers // 2))
    emu = DeviceEmulation(_profile(60.0, 40.0, 10.0), factor=2.0)
    curve = emu.curve(half, {1: 0.001, 8: 0.002, 64: 0.5})
    assert curve[1] == pytest.approx(2 * 2 * 0.060) and curve[8] == pytest.approx(2 * 2 * 0.060)
    assert curve[64] == 0.5  # the real forward over 64 rows is slower than the profile: that is what it takes
    # past the sizes measured here the profile's own points follow (prefill chunks are sized only as far as
    # a curve goes): the built-in Jetson profile's 256 rows, 4 times slower
    jetson = DeviceEmulation.parse("jetson-orin-7b:x4")
    curve = jetson.curve(half, {1: 0.001, 64: 0.002})
    assert sorted(curve) == [1, 64, 256]
    share = half.n_layers * 32 / full.cfg.n_layers
    assert curve[256] == pytest.approx(4 * share * (3.6e-3 + 0.012e-3 * 255))


def test_emulate_names_a_builtin_profile_or_a_file_and_a_factor(tmp_path):
    emu = DeviceEmulation.parse("jetson-orin-7b:x4")
    assert (emu.profile.name, emu.factor, emu.spec) == ("jetson-orin-7b", 4.0, "jetson-orin-7b:x4")
    path = tmp_path / "board.json"
    path.write_text(json.dumps(_profile(1.0, 1.0, 1.0).to_json()))
    assert DeviceEmulation.parse(str(path)).profile.name == "test-board"
    for bad, why in (
        ("pi-5", "neither a built-in"),
        ("jetson-orin-7b:xfast", "PROFILE:xK"),
        ("jetson-orin-7b:x0", "from 1"),
    ):
        with pytest.raises(ValueError, match=why):
            DeviceEmulation.parse(bad)


async def test_the_daemon_paces_its_slice_and_reports_the_emulation_in_mesh(tiny_dir):
    src = ModelSource.resolve(str(tiny_dir))
    emu = DeviceEmulation(_profile(1.0, 1.0, 1.0))
    daemon = Daemon(Config(), device=emu)
    daemon.runtime = Runtime(src, Stage.load(src, LayerRange(0, 0), vocab=True, dtype="fp32"), None)
    daemon.node = SimpleNamespace(
        set_cost_curve=lambda c: None,
        status=lambda: {"peers": []},
        peers={},
        hello=SimpleNamespace(memory_budget=None),
    )
    mine = Assignment("me", LayerRange(0, 2))
    plan = Plan(1, (mine,), ("me",), src.config.n_layers)
    await daemon._load_slice(plan, mine)
    daemon._install_slice(plan)  # served from the plan's commit on
    assert daemon.runtime.worker.stage.pacer is emu.stages  # the slice serves paced by the profile
    assert daemon._mesh_status()["emulation"] == emu.report()
