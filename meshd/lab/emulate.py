"""A daemon that behaves like a weaker device on a slower network, for benchmarks on one machine.

``python -m meshd.lab.emulate serve [--device-slowdown K] [--link 5ms/100mbit] <meshd serve flags>``
runs the same daemon as ``meshd serve`` with two hooks that ``meshd serve`` itself never sets:

- ``--device-slowdown K``: this device's layer slice serves as a :class:`SlowerStage`: after every
  forward it waits (K - 1) times as long as the forward took, so it behaves like a device K times
  slower (the stage worker times the whole call, so the wait counts as busy);
- ``--link LATENCY/BANDWIDTH``: every frame this daemon sends waits for the wire at that bandwidth,
  then for that one-way latency (``tc netem`` is not available everywhere).

The testbed (and so ``meshd bench --backend daemons``) starts its daemons through here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch

from meshd.config import add_arguments, load_config
from meshd.lab.sim.links import parse_link
from meshd.serve.daemon import serve
from models.stage import Attend, Stage
from peers.link import LinkEmulation

MAX_SLOWDOWN = 1000.0


class SlowerStage(Stage):
    """``stage``'s decoder layers (weights shared, no vocabulary ends: a daemon's layer slice) on a
    device ``factor`` times slower: each forward, once computed, waits (factor - 1) times as long."""

    def __init__(self, stage: Stage, factor: float):
        if stage.has_vocab:
            raise ValueError("a slower stage is a layer slice: load it without the vocabulary ends")
        super().__init__(
            stage.cfg, stage.layer_range, stage.layers, dtype=stage.dtype, rope=stage.rope, weights=stage.weights
        )
        self.factor = factor

    def forward(self, x: torch.Tensor, items: Sequence[Attend]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().forward(x, items)
        time.sleep((time.perf_counter() - t0) * (self.factor - 1.0))
        return out


def slowdown(factor: float) -> Callable[[Stage], Stage] | None:
    """The daemon's stage wrapper for a device ``factor`` times slower (None: serve stages as loaded)."""
    if not 1.0 <= factor <= MAX_SLOWDOWN:
        raise ValueError(f"--device-slowdown {factor:g}: expected a factor from 1 to {MAX_SLOWDOWN:g}")
    if factor == 1.0:
        return None
    return lambda stage: SlowerStage(stage, factor)


def link_emulation(text: str | None) -> LinkEmulation | None:
    """``5ms/100mbit`` as the links' shaping (the simulator's syntax, see ``meshd.lab.sim.links.parse_link``);
    None or an unshaped link: None."""
    if not text:
        return None
    link = parse_link(text)
    emu = LinkEmulation(link.latency * 1e3, link.bandwidth / 1e6 if math.isfinite(link.bandwidth) else 0.0)
    return emu if emu.active else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.emulate", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="meshd serve, emulating a slower device and network")
    s.add_argument("--device-slowdown", type=float, default=1.0, help="behave like a device this many times slower")
    s.add_argument("--link", default=None, help="shape outgoing links as LATENCY/BANDWIDTH, e.g. 5ms/100mbit")
    add_arguments(s)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        wrapper = slowdown(args.device_slowdown)
        emulation = link_emulation(args.link)
        cfg = load_config(args)
    except ValueError as exc:
        print(f"meshd.lab.emulate: error: {exc}", file=sys.stderr)
        return 2
    return serve(cfg, stage_wrapper=wrapper, link_emulation=emulation)


if __name__ == "__main__":
    sys.exit(main())
