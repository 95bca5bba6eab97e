"""A daemon that behaves like a weaker device on a slower network, for benchmarks on one machine.

``python -m meshd.lab.emulate serve [--device-slowdown K] [--link 5ms/100mbit] <meshd serve flags>``
runs the same daemon as ``meshd serve`` with two hooks that ``meshd serve`` itself never sets:

- ``--device-slowdown K``: this device's layer slice serves as a :class:`SlowerStage`: after every
  forward it waits (K - 1) times as long as the forward took, so it behaves like a device K times
  slower (the stage worker times the whole call, so the wait counts as busy);
- ``--link LATENCY/BANDWIDTH``: every frame this daemon sends waits for the wire at that bandwidth,
  then for that one-way latency (``tc netem`` is not available everywhere);
- ``--insecure-plaintext-links``: links keep their sequence numbers but drop the AEAD, to measure what
  sealing costs a running ring (``python -m meshd.lab.linkcost flow``); INSECURE, every daemon of the
  mesh must have it (the handshake refuses a mismatch), and the daemon logs a warning at start;
- ``--partitionable``: the daemon's links can be cut while its process lives on (a network partition):
  SIGUSR1 cuts it off the mesh, SIGUSR2 heals it (:class:`Partition`);
- ``--emulate PROFILE[:xK]``: this device behaves like the simulator's device profile (a built-in name
  such as ``jetson-orin-7b`` or a profile file), slowed K times: each stage forward, LM head and draft
  call, once really computed, sleeps until the profile's time for its layers and rows has passed
  (:class:`DeviceEmulation`). Sleeping costs no CPU, so five daemons on two cores behave like five
  boards as long as the real computation stays under the profile's time; every call where it did not
  is counted as an overrun and reported in ``/mesh``.

``meshd serve --emulate`` and ``meshd serve --link`` build the same hooks (``meshd/cli.py`` injects them).

The testbed (and so ``meshd bench --backend daemons``) starts its daemons through here.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

import peers.link
import peers.mesh
import peers.neighbours
from meshd.config import add_arguments, load_config
from meshd.lab.sim.links import parse_link
from meshd.lab.sim.profiles import BUILTIN, Profile, load_profile
from meshd.ring.ringtime import MAX_ROWS
from meshd.serve.daemon import serve
from models.drafters import Drafter
from models.stage import Attend, Stage
from models.tree import Tree
from peers.link import HandshakeError, LinkEmulation

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


class _Pacer:
    """Sleeps a call up to its emulated time and counts the calls whose real work overran it."""

    def __init__(self) -> None:
        self.calls, self.overruns, self.real_seconds, self.emulated_seconds = 0, 0, 0.0, 0.0

    def pace(self, started: float, target: float) -> None:
        real = time.perf_counter() - started
        self.calls += 1
        self.real_seconds += real
        self.emulated_seconds += max(real, target)
        if real > target:
            self.overruns += 1
        else:
            time.sleep(target - real)

    def report(self) -> dict:
        return {
            "calls": self.calls,
            "overruns": self.overruns,
            "real_seconds": round(self.real_seconds, 3),
            "emulated_seconds": round(self.emulated_seconds, 3),
        }


class _ProfiledStage(Stage):
    """A layer slice whose forwards take the profile's time for its layers (see :class:`DeviceEmulation`)."""

    def __init__(self, stage: Stage, cost: Callable[[int], float], pacer: _Pacer):
        if stage.has_vocab:
            raise ValueError("an emulated stage is a layer slice: load it without the vocabulary ends")
        super().__init__(
            stage.cfg, stage.layer_range, stage.layers, dtype=stage.dtype, rope=stage.rope, weights=stage.weights
        )
        self.cost, self.pacer = cost, pacer

    def forward(self, x: torch.Tensor, items: Sequence[Attend]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().forward(x, items)
        self.pacer.pace(t0, self.cost(x.shape[0]))
        return out


class _ProfiledHead(Stage):
    """The originator's vocabulary ends, its LM head taking the profile's head time."""

    def __init__(self, vocab: Stage, cost: Callable[[int], float], pacer: _Pacer):
        self.__dict__.update(vocab.__dict__)  # the same tensors and settings, one method paced
        self.cost, self.pacer = cost, pacer

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().logits(hidden, normed)
        self.pacer.pace(t0, self.cost(hidden.shape[0] if hidden.dim() > 1 else 1))
        return out


class _ProfiledDrafter:
    """A drafter whose draft calls take the profile's draft time for the depth they drafted, and whose pool
    growth (``extend``, one level per call: resumable drafting) takes a one-level draft's, as the simulator
    charges it; unpaced, an emulated originator grew its pools for free while its stages were paced."""

    def __init__(self, inner: Drafter, cost: Callable[[int], float], pacer: _Pacer):
        self.inner, self.cost, self.pacer = inner, cost, pacer

    def reset(self, prompt: list[int]) -> None:
        self.inner.reset(prompt)

    def draft(self, context: list[int], **kw) -> Tree:
        t0 = time.perf_counter()
        tree = self.inner.draft(context, **kw)
        self.pacer.pace(t0, self.cost(max(tree.depth)))
        return tree

    def accept(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self.inner.accept(context, hidden)

    def __getattr__(self, name: str):
        if name == "extend":  # only where the inner drafter grows pools (models.drafters.can_extend)
            extend = self.inner.extend

            def paced(*args, **kw):
                t0 = time.perf_counter()
                added = extend(*args, **kw)
                self.pacer.pace(t0, self.cost(1))
                return added

            return paced
        return getattr(self.inner, name)


CALL_KINDS = ("stage_forwards", "lm_head", "drafts")  # the paced kinds of call a report counts, each its own


class DeviceEmulation:
    """This daemon as a device of ``profile`` slowed ``factor`` times: the hooks ``serve`` takes.

    A real slice of k of the real model's N layers stands for k / N of the profile's layers, so a ring
    of any split emulates the profile's whole model. The LM head and each draft call are paced the
    same way (a profile whose draft cost is measured, not modelled, leaves drafting unpaced).
    """

    def __init__(self, profile: Profile, factor: float = 1.0, spec: str | None = None):
        if not 1.0 <= factor <= MAX_SLOWDOWN:
            raise ValueError(f"--emulate {spec or profile.name}: factor x{factor:g} must be from 1 to {MAX_SLOWDOWN:g}")
        self.profile, self.factor, self.spec = profile, factor, spec or profile.name
        self.stages, self.head, self.drafts = _Pacer(), _Pacer(), _Pacer()

    @classmethod
    def parse(cls, spec: str) -> DeviceEmulation:
        """``NAME`` or ``NAME:xK`` (a built-in profile or a profile file)."""
        name, _, k = spec.rpartition(":x") if ":x" in spec else (spec, "", "")
        try:
            factor = float(k) if k else 1.0
        except ValueError:
            raise ValueError(f"--emulate {spec!r}: expected PROFILE or PROFILE:xK, e.g. jetson-orin-7b:x4") from None
        if name not in BUILTIN and not Path(name).is_file():
            raise ValueError(
                f"--emulate {spec!r}: {name!r} is neither a built-in profile ({', '.join(BUILTIN)}) nor a file"
            )
        return cls(load_profile(name), factor, spec)

    def _stage_cost(self, stage: Stage) -> Callable[[int], float]:
        share = stage.n_layers * self.profile.n_layers / stage.cfg.n_layers
        p, k = self.profile, self.factor
        return lambda t: k * (p.fixed(t) + share * p.layer(t))

    def stage(self, stage: Stage) -> Stage:
        return _ProfiledStage(stage, self._stage_cost(stage), self.stages)

    def curve(self, stage: Stage, measured: dict[int, float]) -> dict[int, float]:
        """The cost curve the emulated slice publishes: per size the profile's time, or the measured one
        where the real computation is slower (an overrun). Publishing the machine's own curve instead made
        originators size segments for a steep CPU ring whose whole emulated time looked like link latency."""
        cost = self._stage_cost(stage)
        curve = {t: max(s, cost(t)) for t, s in measured.items()}
        # and the profile's own sizes past the measured ones (originators trust a curve only as far as it
        # goes: RingTimer.prefill_chunks); a real forward slower there counts as an overrun
        widest = max(measured, default=0)
        curve.update({t: cost(t) for t in self.profile.layer.ts if widest < t <= MAX_ROWS})
        return curve

    def vocab(self, vocab: Stage) -> Stage:
        return _ProfiledHead(vocab, lambda t: self.factor * self.profile.head(t), self.head)

    def drafters(self, factory: Callable[[], Drafter] | None) -> Callable[[], Drafter] | None:
        d = self.profile.draft
        if factory is None or d.measured_scale is not None:
            return factory
        cost = lambda levels: self.factor * (d.per_call + d.per_level * levels)  # noqa: E731
        return lambda: _ProfiledDrafter(factory(), cost, self.drafts)

    def report(self) -> dict:
        """What ``/mesh`` shows: the profile, and per kind of call how many overran it (a run with many
        overruns was CPU-bound here, not emulated)."""
        return {
            "emulated": True,
            "profile": self.profile.name,
            "spec": self.spec,
            "factor": self.factor,
            "stage_forwards": self.stages.report(),
            "lm_head": self.head.report(),
            "drafts": self.drafts.report(),
        }


class Partition:
    """A network partition around this daemon, emulated in its transport: while cut, nothing it sends on
    a link reaches the wire, nothing it receives is acted on, and no new link gets through its handshake,
    while the process, its sockets and its state live on. Its peers stop hearing its heartbeats and drop
    it after their peer timeout, as they would a board whose Wi-Fi went; it drops them in turn.

    The cut is applied at the three places every link passes (peers.link and peers.neighbours take no
    such hook, and a benchmark knob does not belong in them), so :meth:`install` must run before the
    daemon builds its mesh node. SIGUSR1 cuts, SIGUSR2 heals.
    """

    def __init__(self) -> None:
        self.cut = False
        self.log = logging.getLogger("meshd.lab.partition")

    def install(self) -> None:
        part = self
        write, on_message = peers.link.Link._write, peers.mesh.MeshNode._on_message
        dial, accept = peers.neighbours.dial, peers.neighbours.accept_handshake

        async def _write(link: peers.link.Link, message: bytes) -> None:
            if not part.cut:
                await write(link, message)

        async def _on_message(node: peers.mesh.MeshNode, link: peers.link.Link, msg) -> None:
            if not part.cut:
                await on_message(node, link, msg)

        async def _dial(*args, **kw):
            if part.cut:
                raise HandshakeError("partitioned (emulated): no route to the peer", "closed")
            return await dial(*args, **kw)

        async def _accept(*args, **kw):
            if part.cut:
                raise HandshakeError("partitioned (emulated): the peer is unreachable", "closed")
            return await accept(*args, **kw)

        peers.link.Link._write = _write
        peers.mesh.MeshNode._on_message = _on_message
        peers.neighbours.dial, peers.neighbours.accept_handshake = _dial, _accept
        signal.signal(signal.SIGUSR1, lambda *_: self.set(True))
        signal.signal(signal.SIGUSR2, lambda *_: self.set(False))

    def set(self, cut: bool) -> None:
        self.cut = cut
        self.log.warning("emulated partition: this daemon's links are %s", "CUT" if cut else "healed")


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
    s.add_argument(
        "--emulate", default=None, metavar="PROFILE[:xK]", help="behave like a device profile, K times slower"
    )
    s.add_argument(
        "--insecure-plaintext-links",
        action="store_true",
        help="BENCHMARKS ONLY, INSECURE: links without encryption or authentication (sequence numbers kept), "
        "to measure what sealing costs; every daemon of the mesh needs it (a mismatch is refused)",
    )
    s.add_argument(
        "--partitionable", action="store_true", help="SIGUSR1 cuts this daemon's links (a partition), SIGUSR2 heals"
    )
    add_arguments(s)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        wrapper = slowdown(args.device_slowdown)
        emulation = link_emulation(args.link)
        if args.insecure_plaintext_links:
            emulation = replace(emulation or LinkEmulation(), insecure_plaintext=True)
        device = DeviceEmulation.parse(args.emulate) if args.emulate else None
        if device is not None and wrapper is not None:
            raise ValueError("--emulate and --device-slowdown both pace the stage: use one")
        cfg = load_config(args)
    except ValueError as exc:
        print(f"meshd.lab.emulate: error: {exc}", file=sys.stderr)
        return 2
    if args.partitionable:
        Partition().install()
    return serve(cfg, stage_wrapper=wrapper, link_emulation=emulation, device=device)


if __name__ == "__main__":
    sys.exit(main())
