"""The benchmark launcher's emulation hooks: a slower device and shaped links, outside the daemon's config."""

from __future__ import annotations

import time

import pytest
import torch

from meshd.cli import build_parser as meshd_parser
from meshd.lab.emulate import build_parser, link_emulation, slowdown
from meshd.ring.messages import Segment
from meshd.ring.worker import StageWorker
from models.source import ModelSource
from models.stage import Stage


def test_device_slowdown_pads_compute_without_changing_results(tiny_dir):
    """``--device-slowdown k``: a stage behaves like a device k times slower (benchmarks emulate weak boards)."""
    full = Stage.load(ModelSource.resolve(str(tiny_dir)), dtype="fp32")
    seg = Segment("r", [0, 1, 2, 3], [-1, 0, 1, 2], [0, 1, 2, 3], tokens=[3, 4, 5, 6], commit=True)
    forwards: list[float] = []
    pad4 = slowdown(4.0)

    def pad(seconds: float) -> None:
        forwards.append(seconds)
        pad4(seconds)

    plain, slow = StageWorker(full, embed=full.embed), StageWorker(full, embed=full.embed, pad=pad)
    (want,) = plain.run([seg])
    t0 = time.perf_counter()
    (got,) = slow.run([seg])
    wall = time.perf_counter() - t0
    assert got.node_ids == want.node_ids and torch.equal(got.hidden, want.hidden)
    assert len(forwards) == 1 and forwards[0] > 0
    assert slow.busy_seconds >= 4 * forwards[0]  # the forward plus 3x its time waited, counted as busy
    assert wall >= slow.busy_seconds * 0.95  # it really waited


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
