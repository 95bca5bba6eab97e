"""Device profiles for the simulator: how long a stage forward, the LM head and drafting take.

A profile is either assumed (``jetson_orin_7b``: a projection, written down), measured here
(``measure_profile``: one torch thread, CPU time) or read from a JSON file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.budget import CostCurve
from models.cache import cache_dir
from models.profile import forward_times, kernels_key, monotone
from models.ranges import LayerRange
from models.stage import Stage

SIZES = (1, 2, 4, 8, 16, 32, 64)


def flat(seconds: float) -> CostCurve:
    """A constant curve (CostCurve scales a single point proportionally, so give it two)."""
    return CostCurve({1: seconds, 1 << 16: seconds})


@dataclass
class DraftCost:
    """What one draft call costs the originator: ``per_call + per_level * depth`` of the drafted tree,
    or, with ``measured_scale``, the drafter's measured CPU time here times that factor."""

    per_call: float = 0.0
    per_level: float = 0.0
    measured_scale: float | None = None


@dataclass
class Profile:
    """The devices being simulated: the target's shape and how long its pieces take.

    ``layer(T)``: seconds per decoder layer for a forward over T rows; ``fixed(T)``: per-forward
    overhead that does not grow with the layer count; ``head(T)``: final norm + LM head over T rows.
    ``originator_measured``: charge the originator's calls their measured CPU time instead of
    ``head`` + ``draft`` (the "this device" profile, where the real calls run on the real device).
    """

    name: str
    n_layers: int
    hidden: int
    layer: CostCurve
    head: CostCurve
    fixed: CostCurve = field(default_factory=lambda: flat(0.0))
    draft: DraftCost = field(default_factory=DraftCost)
    wire_bytes: int = 2
    originator_measured: bool = False
    note: str = ""

    def stage_cost(self, n_layers: int, scale: float = 1.0) -> CostCurve:
        ts = sorted({1, *self.layer.ts, *self.fixed.ts})
        return CostCurve({t: scale * (self.fixed(t) + n_layers * self.layer(t)) for t in ts})

    def as_emulated(self, factor: float, n_layers: int, hidden: int) -> Profile:
        """What ``meshd serve --emulate NAME:x<factor>`` daemons of a real model of ``n_layers`` layers and
        width ``hidden`` behave like (:class:`meshd.lab.emulate.DeviceEmulation`): every paced time (stage
        forwards, LM head, draft calls) ``factor`` times the profile's; each real layer stands for
        ``self.n_layers / n_layers`` of the profile's, so the simulator splits the real layers as the daemons
        do; links carry the real model's rows, not the profile's (the daemons send real hidden states)."""
        k, share = factor, self.n_layers / n_layers
        times = lambda c, f=k: CostCurve({t: f * s for t, s in zip(c.ts, c.secs)})  # noqa: E731
        d = self.draft  # a measured draft cost is left unpaced by the emulation: still its CPU time here
        draft = d if d.measured_scale is not None else DraftCost(k * d.per_call, k * d.per_level)
        return replace(
            self,
            name=f"{self.name}:x{factor:g}",
            n_layers=n_layers,
            hidden=hidden,
            layer=times(self.layer, k * share),
            head=times(self.head),
            fixed=times(self.fixed),
            draft=draft,
            originator_measured=False,  # the emulation paces the LM head and drafts by the profile
            note=f"{self.note} EMULATED on daemons, x{factor:g}, rows {hidden} wide on the links.",
        )

    def to_json(self) -> dict:
        ms = lambda c: {str(t): round(s * 1e3, 6) for t, s in zip(c.ts, c.secs)}  # noqa: E731
        d = self.draft
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "layer_ms": ms(self.layer),
            "fixed_ms": ms(self.fixed),
            "head_ms": ms(self.head),
            "wire_bytes": self.wire_bytes,
            "draft": {"measured_scale": d.measured_scale}
            if d.measured_scale is not None
            else {"per_call_ms": d.per_call * 1e3, "per_level_ms": d.per_level * 1e3},
            "originator": "measured" if self.originator_measured else "model",
            "note": self.note,
        }

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        """The JSON form of :meth:`to_json` (curves in ms, keyed by T); ``fixed_ms``/``draft`` optional."""
        curve = lambda key: CostCurve({int(t): float(v) / 1e3 for t, v in d[key].items()})  # noqa: E731
        dr = d.get("draft", {})
        draft = (
            DraftCost(measured_scale=dr["measured_scale"])
            if "measured_scale" in dr
            else DraftCost(dr.get("per_call_ms", 0.0) / 1e3, dr.get("per_level_ms", 0.0) / 1e3)
        )
        try:
            return cls(
                d.get("name", "custom"),
                int(d["n_layers"]),
                int(d["hidden"]),
                curve("layer_ms"),
                curve("head_ms"),
                curve("fixed_ms") if "fixed_ms" in d else flat(0.0),
                draft,
                int(d.get("wire_bytes", 2)),
                d.get("originator", "model") == "measured",
                d.get("note", ""),
            )
        except KeyError as e:
            raise ValueError(f"profile is missing {e}; needs n_layers, hidden, layer_ms and head_ms") from None


def jetson_orin_7b() -> Profile:
    """A 7B Llama (32 layers, hidden 4096, fp16) on Jetson AGX Orin-class boards: an ASSUMPTION, not a measurement.

    Derivation: batch-1 decoding is memory-bound. One layer holds ~202 M parameters = 404 MB in fp16;
    at ~60 % of the AGX Orin's 204.8 GB/s (~123 GB/s) reading it takes ~3.3 ms, plus ~0.3 ms of kernel
    launches from the ARM cores: 3.6 ms per layer at T=1, i.e. ~115 ms for a whole 7B forward.
    A token adds ~0.4 GFLOP per layer; at ~20 TFLOP/s of usable fp16 tensor throughput that is 0.02 ms,
    mostly hidden under the memory time until T ~ 150, so the slope is small: 0.012 ms per extra row
    (T=64: 4.36 ms per layer, ~140 ms for the model, +21 %). LM head (32000 x 4096, 262 MB): 2.2 ms +
    0.01 ms/row. Draft (EAGLE-2 class: one decoder layer + the LM head's top-k per level): 1 ms per call
    + 5 ms per tree level, whatever drafter actually supplies the tokens here. Wire: fp16 activations.
    """
    per_layer = {t: 3.6e-3 + 0.012e-3 * (t - 1) for t in (1, 64, 256)}
    head = {t: 2.2e-3 + 0.01e-3 * (t - 1) for t in (1, 64, 256)}
    return Profile(
        "jetson-orin-7b",
        32,
        4096,
        CostCurve(per_layer),
        CostCurve(head),
        flat(0.0),
        DraftCost(1e-3, 5e-3),
        2,
        False,
        "ASSUMED projection profile (not measured): 7B Llama, fp16, Jetson AGX Orin-class memory-bound "
        "decoding, 3.6 ms/layer at T=1 + 0.012 ms/row, LM head 2.2 ms, draft 1 ms + 5 ms/level",
    )


BUILTIN = {"jetson-orin-7b": jetson_orin_7b}


@torch.inference_mode()
def measure_profile(
    full: Stage,
    fingerprint: str | None = None,
    *,
    sizes: Sequence[int] = SIZES,
    context: int = 128,
    repeats: int = 3,
    refresh: bool = False,
) -> Profile:
    """This device's profile for ``full``'s model, measured with ONE torch thread in CPU time.

    One thread because loopback daemons run one thread each; CPU time because this machine is
    shared. Per-layer and fixed costs come from two slices (all layers, two layers) so a stage of
    any size is ``fixed + layers * per_layer``; each curve is made non-decreasing by its suffix
    minimum (noise only ever adds time). Cached per (model, dtype, kernels) under ~/.cache/meshd.
    """
    dt = str(full.dtype).removeprefix("torch.")
    path = cache_dir("profiles", f"sim-{fingerprint}-{dt}-{kernels_key(full)}-t1.json") if fingerprint else None
    if path and path.is_file() and not refresh:
        return Profile.from_json(json.loads(path.read_text()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = full.cfg.n_layers
        small_n = min(2, n)
        whole = forward_times(full, sizes, context=context, repeats=repeats, clock="cpu")
        small = forward_times(full.slice(LayerRange(0, small_n)), sizes, context=context, repeats=repeats, clock="cpu")
        head = forward_times(full, sizes, repeats=repeats, clock="cpu", layers=False, lm_head=True)
    finally:
        torch.set_num_threads(threads)
    per_layer = monotone({t: max(whole[t] - small[t], 0.0) / max(n - small_n, 1) for t in sizes})
    fixed = monotone({t: max(small[t] - small_n * per_layer[t], 0.0) for t in sizes})
    head = monotone(head)
    prof = Profile(
        "this-device",
        n,
        full.cfg.hidden_size,
        CostCurve(per_layer),
        CostCurve(head),
        CostCurve(fixed),
        DraftCost(measured_scale=1.0),
        4 if full.dtype == torch.float32 else 2,
        True,
        f"measured on this machine: {dt}, 1 torch thread, CPU time (context {context})",
    )
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof.to_json()))
    return prof


def load_profile(spec: str, full: Stage | None = None, fingerprint: str | None = None) -> Profile:
    """A built-in name, ``this-device`` (measured here, needs ``full``) or a JSON file."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec == "this-device":
        if full is None:
            raise ValueError("the this-device profile is measured on the loaded model")
        return measure_profile(full, fingerprint)
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"profile {spec!r}: not one of {[*BUILTIN, 'this-device']} and no such file")
    return Profile.from_json(json.loads(p.read_text()))
