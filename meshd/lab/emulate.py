"""A daemon that behaves like a weaker device on a slower network, for benchmarks on one machine.

``python -m meshd.lab.emulate serve [--device-slowdown K] [--link 5ms/100mbit] <meshd serve flags>``
runs the same daemon as ``meshd serve`` with two hooks that ``meshd serve`` itself never sets:

- ``--device-slowdown K``: after every forward of this device's stage, wait (K - 1) times as long
  as the forward took, so the stage behaves like a device K times slower (the wait counts as busy);
- ``--link LATENCY/BANDWIDTH``: every frame this daemon sends waits for the wire at that bandwidth,
  then for that one-way latency (``tc netem`` is not available everywhere).

The testbed (and so ``meshd bench --backend daemons``) starts its daemons through here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

from meshd.config import add_arguments, load_config
from meshd.lab.sim.links import parse_link
from meshd.serve.daemon import serve
from peers.link import LinkEmulation

MAX_SLOWDOWN = 1000.0


def slowdown(factor: float) -> Callable[[float], None] | None:
    """The stage worker's pad for a device ``factor`` times slower (None: no padding)."""
    if not 1.0 <= factor <= MAX_SLOWDOWN:
        raise ValueError(f"--device-slowdown {factor:g}: expected a factor from 1 to {MAX_SLOWDOWN:g}")
    if factor == 1.0:
        return None

    def pad(seconds: float) -> None:
        time.sleep(seconds * (factor - 1.0))

    return pad


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
        pad = slowdown(args.device_slowdown)
        emulation = link_emulation(args.link)
        cfg = load_config(args)
    except ValueError as exc:
        print(f"meshd.lab.emulate: error: {exc}", file=sys.stderr)
        return 2
    return serve(cfg, compute_pad=pad, link_emulation=emulation)


if __name__ == "__main__":
    sys.exit(main())
