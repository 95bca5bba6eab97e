"""``meshd simulate``: questions (Spec-Bench, or the everyday set) through a simulated mesh, or calibration
against measured records."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from meshd.lab.bench import progress_printer, question_file, same_texts_line, spread_over_categories
from meshd.lab.bench import same_texts as bench_same_texts
from meshd.lab.emulate import DeviceEmulation
from meshd.lab.sim.calibration import calibrate, calibration_specs, calibration_table
from meshd.lab.sim.links import LinkModel, parse_link
from meshd.lab.sim.profiles import Profile, load_profile, measure_profile
from meshd.lab.sim.simulation import (
    FLOWSPEC_7B_FLOW_OVER_CHUNK,
    SimResult,
    Simulation,
    layer_split,
    parse_variant,
    ratios,
    run_modes,
    simulation_table,
    summarize_traces,
)
from meshd.serve.loading import load_layers
from models.drafters import drafter_factory
from models.eagle import default_drafter
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import parse_dtype
from models.text import encode_messages, stop_ids
from training.prompts import load_questions


def parse_origins(spec: str, n: int) -> list[int | None]:
    """``own``: originators on devices of their own; ``K``: on stages K, K+1, ... (meshd: any peer)."""
    if spec == "own":
        return [None] * n
    try:
        first = int(spec)
    except ValueError:
        raise ValueError(f"--originator {spec!r}: 'own' or a stage index") from None
    return list(range(first, first + n))


class _Env:
    """The loaded target, tokenizer and drafters: loaded once, shared by every simulated mesh."""

    def __init__(self, model: str, dtype: str, weights: str):
        self.source = ModelSource.resolve(model)
        n, what = self.source.config.n_layers, f"loading {self.source.path.name}"
        progress_printer(f"{what}: {n} layers and the vocabulary ends (dtype {dtype}, weights {weights}) ...")
        self.full = load_layers(
            self.source, LayerRange.whole(n), dtype, weights, what, vocab=True, say=progress_printer
        )
        progress_printer("loading the tokenizer ...")
        self.tokenizer = self.source.load_tokenizer()
        self.eos = stop_ids(self.tokenizer, self.full.cfg)
        self._factories: dict[str, Callable] = {}

    def factory(self, spec: str):
        if spec == "auto":
            spec = default_drafter(self.source)
        if spec not in self._factories:
            self._factories[spec] = drafter_factory(spec, self.full, source=self.source)
        return spec, self._factories[spec]

    def prompts(self, questions: list[dict]) -> list[list[int]]:
        return [encode_messages(self.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]


def _simulate(
    env: _Env,
    questions: list[dict],
    *,
    stages: int,
    profile: Profile,
    link: LinkModel,
    modes: list[str],
    drafter: str,
    max_tokens: int,
    origins: list[int | None],
    compute_scale: float,
    cores: int | None,
    rate: float,
    seed: int,
    temperature: float,
    coalesce: bool = False,
    idle_drafting: bool = True,
    wire_activations: str = "fp16",
    split: str | list[int] = "even",
    back_off: bool = True,
) -> tuple[dict[str, list[SimResult]], str]:
    spec, factory = env.factory(drafter)
    for m in modes:
        parse_variant(m)  # a bad label fails before the first simulation, not after some

    def make(label: str) -> Simulation:
        return Simulation(
            env.full,
            factory,
            stages=stages,
            profile=profile,
            link=link,
            origins=origins,
            compute_scale=compute_scale,
            cores=cores,
            flow_slots=parse_variant(label).slots,
            coalesce=coalesce,
            idle_drafting=idle_drafting,
            resumable_drafting=parse_variant(label).resumable,
            wire_activations=wire_activations,
            split=split,
            back_off=back_off,  # the originators' (Originator.back_off)
        )

    labels = [f"q{q['question_id']}-{q['category']}" for q in questions]
    res = run_modes(
        make,
        env.prompts(questions),
        modes,
        max_tokens=max_tokens,
        eos=env.eos,
        temperature=temperature,
        rate=rate,
        seed=seed,
        labels=labels,
        progress=progress_printer,
    )
    return res, spec


def wire_summary(
    setting: str,
    profile: Profile,
    link: LinkModel,
    dtype: torch.dtype,
    stages: int,
    compute_scale: float,
    layers: list[int] | None = None,
) -> str:
    """How the stages' links carry hidden states under ``setting``, said once for a run's header and record."""
    sim = Simulation.wire_plan(setting, profile, link, dtype, stages, compute_scale, layers=layers)
    names = {torch.int8: "int8", torch.float16: "fp16", torch.float32: "fp32"}
    kinds = list(dict.fromkeys(names[d] for d in sim))
    each = (
        f"{kinds[0]} on every link"
        if len(kinds) == 1
        else ", ".join(f"stage {i} {names[d]}" for i, d in enumerate(sim))
    )
    return f"--wire-activations {setting}: {each}"


def emulated_profile(spec: str, n_layers: int, hidden: int) -> Profile:
    """What daemons run with ``--emulate spec`` behave like, for a real model of ``n_layers`` and ``hidden``."""
    emu = DeviceEmulation.parse(spec)
    return emu.profile.as_emulated(emu.factor, n_layers, hidden)


def _load_env(args, one_thread: bool) -> _Env:
    torch.set_num_threads(1 if one_thread else (args.threads or 1))  # one: no oversubscription on a shared box
    return _Env(args.model, args.dtype, args.weights)


def _write_record(path: Path, record: dict) -> None:
    """``--out``: the JSON record, wherever the user asked (folders made), and where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    progress_printer(f"record: {path}")


def _calibrate(args, path: Path) -> int:
    """Simulate each measured mesh of ``--calibrate-with`` and print simulated vs measured tokens/s
    (the fit: :func:`calibrate`). The profile is this device's, measured on one thread, except for
    records of emulated daemons (``--emulate``), which are simulated with the profile they were paced by."""
    specs = [s for p in args.calibrate_with for s in calibration_specs(json.loads(Path(p).read_text()))]
    qs = load_questions(path, None, per_category=1000)
    env = _load_env(args, one_thread=True)
    n_layers, hidden = env.full.cfg.n_layers, env.full.cfg.hidden_size
    emulated = {s["emulate"]: emulated_profile(s["emulate"], n_layers, hidden) for s in specs if s.get("emulate")}
    profile = measure_profile(env.full, env.source.fingerprint) if len(emulated) < len(specs) else None

    def run(spec: dict, modes: list[str], scale: float, hop: float) -> dict[str, list[float]]:
        ids = spec.get("question_ids")
        questions = (
            [q for q in qs if q["question_id"] in set(ids)]
            if ids
            else spread_over_categories(qs, spec.get("prompts", args.prompts))
        )
        progress_printer(
            f"calibrating: {spec['stages']} stages, link {spec.get('link', '0/inf')}, {len(questions)} "
            f"prompts, modes {','.join(modes)}, compute x{scale:.3f}"
        )
        want = spec.get("dtype")
        if want not in (None, "auto") and parse_dtype(want) != env.full.dtype:
            progress_printer(f"warning: the record ran {want}, this simulation {env.full.dtype}; pass --dtype {want}")
        held = spec.get("weights")
        if held not in (None, args.weights):
            progress_printer(f"warning: the record ran --weights {held}, this simulation {args.weights}; pass it")
        link = parse_link(spec.get("link") or "0/inf")
        prof = emulated.get(spec.get("emulate"))
        if prof is not None:  # paced daemons: the profile's times, each device its own (sleeping costs no CPU)
            cores = spec.get("cores")
        else:
            prof, cores = profile, spec.get("cores", os.cpu_count())
        temperature = spec.get("temperature", 0.0)
        n_seeds = max(1, getattr(args, "seeds", 1)) if temperature > 0 else 1  # greedy decoding has one path
        seeds = range(args.seed, args.seed + n_seeds)
        key = "decode_tokens_per_s" if spec.get("metric") == "decode" else "tokens_per_s"
        out: dict[str, list[float]] = {m: [] for m in modes}
        waits: dict[str, list[float]] = {m: [] for m in modes}
        for seed in seeds:
            res, _ = _simulate(
                env,
                questions,
                stages=spec["stages"],
                profile=prof,
                link=LinkModel(link.latency + hop, link.bandwidth),
                modes=modes,
                drafter=spec.get("drafter") or args.drafter,
                max_tokens=spec.get("max_tokens", 128),
                origins=parse_origins(str(spec.get("originator", 0)), 1),
                compute_scale=spec.get("compute_scale", 1.0) * scale,
                cores=cores,
                rate=0.0,
                seed=seed,
                temperature=temperature,
                wire_activations=spec.get("wire_activations", "auto"),  # the daemons' default
                split=spec.get("layers") or "even",
            )
            for m, r in res.items():
                summary = summarize_traces(r)
                out[m].append(summary[key])
                if not math.isnan(summary["first_tokens_ms"]):
                    waits[m].append(summary["first_tokens_ms"])
            if len(seeds) > 1:
                progress_printer(f"seed {seed}: " + ", ".join(f"{m} {v[-1]:.2f} tok/s" for m, v in out.items()))
        # beside the measured wait, where the record has it (calibration_rows; the last call is at the final scale)
        spec["first_tokens_ms_simulated"] = {m: sum(w) / len(w) for m, w in waits.items() if w}
        return out

    fit_mode = getattr(args, "fit_scale", None)
    fit_hop = getattr(args, "fit_hop", False)
    scale, hop, all_rows = calibrate(specs, run, fit_mode=fit_mode, fit_hop=fit_hop, progress=progress_printer)
    fitted = any(r["fitted"] for r in all_rows)
    used = ([profile] if profile is not None else []) + list(emulated.values())
    record = {"profile": used[0].to_json(), "profiles": [p.to_json() for p in used]}
    record |= {"compute_scale": scale, "hop_overhead_s": hop, "calibration": all_rows}
    if args.out:  # the calibration's own record, as a simulation writes its own
        _write_record(Path(args.out), record)
    if args.json:
        print(json.dumps(record))
    else:
        what = "compute scale and a per-message overhead" if fit_hop else "one factor"
        print(
            f"simulator calibration: profile {'; '.join(p.note for p in used)}; compute scale {scale:.3f}"
            + (f", per-message overhead {hop * 1e3:.2f} ms" if hop else "")
            + (
                f" ({what} fitted on {fit_mode} of every record, rows marked 'fit'; the others are predicted)"
                if fitted
                else ""
            )
        )
        print(calibration_table(all_rows))
    return 0


def main(args) -> int:
    """``meshd simulate``: questions through a simulated mesh; every figure is simulated."""
    path = question_file(args.questions)  # inputs before the model: a bad argument should not wait for it
    args.questions = str(path)  # the record names the file read
    if args.calibrate_with:
        return _calibrate(args, path)
    questions = spread_over_categories(load_questions(path, None, per_category=max(1, args.prompts)), args.prompts)
    link = parse_link(args.link)
    origins = parse_origins(args.originator, args.originators)
    modes = args.modes.split(",")
    env = _load_env(args, one_thread=args.profile == "this-device")
    profile = load_profile(args.profile, env.full, env.source.fingerprint)
    where = "own device" if origins[0] is None else f"stage {origins[0]}'s device"
    progress_printer(
        f"simulate: {args.stages} stages x {profile.name}, link {link}, originator on {where}, "
        f"{len(questions)} prompts x {args.max_tokens} tokens, modes {','.join(modes)}"
    )
    progress_printer(f"profile: {profile.note}")
    layers = layer_split(profile, args.stages, args.split, origins)
    progress_printer(f"layers per stage ({args.split} split): {'/'.join(map(str, layers))}")
    wires = wire_summary(args.wire_activations, profile, link, env.full.dtype, args.stages, args.compute_scale, layers)
    progress_printer(f"wire: {wires}")
    res, drafter = _simulate(
        env,
        questions,
        stages=args.stages,
        profile=profile,
        link=link,
        modes=modes,
        drafter=args.drafter,
        max_tokens=args.max_tokens,
        origins=origins,
        compute_scale=args.compute_scale,
        cores=args.cores,
        rate=args.rate,
        seed=args.seed,
        temperature=args.temperature,
        coalesce=args.coalesce,
        idle_drafting=not args.no_idle_drafting,
        wire_activations=args.wire_activations,
        split=args.split,
        back_off=not args.no_flow_backoff,
    )
    summary = {m: summarize_traces(r) for m, r in res.items()}
    same = same_texts(res)
    for m, got in same.items():
        summary[m]["same_text"] = got
    flow = res.get("flow") or next(iter(res.values()))
    record = {
        "label": "simulated",
        "config": {k: v for k, v in vars(args).items() if k != "func"} | {"drafter": drafter},
        "profile": profile.to_json(),
        "wire": wires,
        "layers": layers,
        "summary": summary,
        "ratios": ratios(summary, "throughput" if args.rate > 0 else "decode_tokens_per_s"),
        "flowspec_reference": {"flow/chunk": FLOWSPEC_7B_FLOW_OVER_CHUNK, "label": "measured, published"},
        "timeline": [
            {
                "device": b.device,
                "kind": b.kind,
                "start": b.start,
                "end": b.end,
                "requests": list(b.requests),
                "rows": b.rows,
            }
            for b in flow[0].busy
        ]
        if flow
        else [],
        "requests": [
            {
                "request_id": t.request_id,
                "mode": t.mode,
                "new_tokens": t.new_tokens,
                "ttft": t.ttft,
                "decode_seconds": t.decode_seconds,
                "seconds": t.seconds,
                "reason": t.reason,
                "mean_accepted": t.stats.mean_accepted if t.stats else 0.0,
            }
            for rs in res.values()
            for r in rs
            for t in r.requests.values()
        ],
    }
    if args.out:
        _write_record(Path(args.out), record)
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"SIMULATED (not measured): {args.stages} stages ({args.split} split, layers {'/'.join(map(str, layers))}), "
        f"profile {profile.name}, link {link}, originator on {where}, drafter {drafter}, {len(questions)} prompts "
        f"of {path.name} x {args.max_tokens} tokens, T={args.temperature}, acceptance from the real "
        f"{env.source.name} ({str(env.full.dtype)[6:]}, weights {env.full.weights})"
    )
    print(f"profile: {profile.note}")
    print(f"wire: {wires}")
    if same:
        kind = "greedy texts" if args.temperature == 0 else f"sampled texts (seed {args.seed})"
        print(f"{kind} (the oracle): {same_texts_line(same, modes[0])}")
    print(simulation_table(summary, args.rate))
    return 0


def same_texts(res: dict) -> dict[str, list[int]]:
    """Each mode's tokens for each prompt against the first mode's (``bench.same_texts``); request ids
    are MODE-PROMPT."""
    return bench_same_texts(
        {
            m: {t.request_id.removeprefix(f"{m}-"): t.tokens for r in rs for t in r.requests.values()}
            for m, rs in res.items()
        }
    )
