"""``meshd simulate``: Spec-Bench prompts through a simulated mesh, or calibration against measured records."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from meshd.lab.sim.calibration import calibrate, calibration_specs, calibration_table
from meshd.lab.sim.engine import FLOWSPEC_7B_FLOW_OVER_CHUNK, SimResult, Simulation, ratios, run_modes, summarize, table
from meshd.lab.sim.links import Link, parse_link
from meshd.lab.sim.profiles import Profile, load_profile, measure_profile
from models.stage import Stage, parse_dtype


def pick_questions(path: Path, n: int) -> list[dict]:
    """``n`` Spec-Bench questions spread over the categories (round robin, file order within each)."""
    from meshd.lab.bench import load_questions

    rows = load_questions(path, None, per_category=max(1, n))
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    out = [q for group in itertools.zip_longest(*by_cat.values()) for q in group if q is not None]
    return out[:n]


def parse_origins(spec: str, n: int) -> list[int | None]:
    """``own``: originators on devices of their own; ``K``: on stages K, K+1, ... (meshd: any peer)."""
    if spec == "own":
        return [None] * n
    try:
        first = int(spec)
    except ValueError:
        raise ValueError(f"--originator {spec!r}: 'own' or a stage index") from None
    return list(range(first, first + n))


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Env:
    """The loaded target, tokenizer and drafters: loaded once, shared by every simulated mesh."""

    def __init__(self, model: str, dtype: str):
        from models.source import ModelSource
        from models.text import stop_ids

        self.source = ModelSource.resolve(model)
        self.full = Stage.load(self.source, dtype=dtype)
        self.tokenizer = self.source.load_tokenizer()
        self.eos = stop_ids(self.tokenizer, self.full.cfg)
        self._factories: dict[str, Callable] = {}

    def factory(self, spec: str):
        from models.drafters import drafter_factory

        if spec == "auto":
            from models.eagle import default_drafter

            spec = default_drafter(self.source)
        if spec not in self._factories:
            self._factories[spec] = drafter_factory(spec, self.full, source=self.source)
        return spec, self._factories[spec]

    def prompts(self, questions: list[dict]) -> list[list[int]]:
        from models.text import encode_messages

        return [encode_messages(self.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]


def _simulate(
    env: _Env,
    questions: list[dict],
    *,
    stages: int,
    profile: Profile,
    link: Link,
    modes: list[str],
    drafter: str,
    max_tokens: int,
    origins: list[int | None],
    compute_scale: float,
    cores: int | None,
    rate: float,
    seed: int,
    temperature: float,
) -> tuple[dict[str, list[SimResult]], str]:
    spec, factory = env.factory(drafter)

    def make() -> Simulation:
        return Simulation(
            env.full,
            factory,
            stages=stages,
            profile=profile,
            link=link,
            origins=origins,
            compute_scale=compute_scale,
            cores=cores,
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
        progress=_progress,
    )
    return res, spec


def _calibrate(env: _Env, args, paths: Sequence[Path]) -> int:
    """Simulate each measured mesh and print simulated vs measured tokens/s (the fit: :func:`calibrate`)."""
    from meshd.lab.bench import load_questions

    profile = measure_profile(env.full, env.source.fingerprint)
    specs = [s for p in paths for s in calibration_specs(json.loads(Path(p).read_text()))]
    qs = load_questions(Path(args.questions), None, per_category=1000)

    def run(spec: dict, modes: list[str], scale: float, hop: float) -> dict[str, float]:
        ids = spec.get("question_ids")
        questions = (
            [q for q in qs if q["question_id"] in set(ids)]
            if ids
            else pick_questions(Path(args.questions), spec.get("prompts", args.prompts))
        )
        _progress(
            f"calibrating: {spec['stages']} stages, link {spec.get('link', '0/inf')}, {len(questions)} "
            f"prompts, modes {','.join(modes)}, compute x{scale:.3f}"
        )
        want = spec.get("dtype")
        if want not in (None, "auto") and parse_dtype(want) != env.full.dtype:
            _progress(f"warning: the record ran {want}, this simulation {env.full.dtype}; pass --dtype {want}")
        link = parse_link(spec.get("link") or "0/inf")
        res, _ = _simulate(
            env,
            questions,
            stages=spec["stages"],
            profile=profile,
            link=Link(link.latency + hop, link.bandwidth),
            modes=modes,
            drafter=spec.get("drafter") or args.drafter,
            max_tokens=spec.get("max_tokens", 128),
            origins=parse_origins(str(spec.get("originator", 0)), 1),
            compute_scale=spec.get("compute_scale", 1.0) * scale,
            cores=spec.get("cores", os.cpu_count()),
            rate=0.0,
            seed=args.seed,
            temperature=0.0,
        )
        key = "decode_tokens_per_s" if spec.get("metric") == "decode" else "tokens_per_s"
        return {m: summarize(r)[key] for m, r in res.items()}

    fit_mode = getattr(args, "fit_scale", None)
    fit_hop = getattr(args, "fit_hop", False)
    scale, hop, all_rows = calibrate(specs, run, fit_mode=fit_mode, fit_hop=fit_hop, progress=_progress)
    fitted = any(r["fitted"] for r in all_rows)
    if args.json:
        print(
            json.dumps(
                {"profile": profile.to_json(), "compute_scale": scale, "hop_overhead_s": hop, "calibration": all_rows}
            )
        )
    else:
        what = "compute scale and a per-message overhead" if fit_hop else "one factor"
        print(
            f"simulator calibration: profile {profile.note}; compute scale {scale:.3f}"
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
    """``meshd simulate``: Spec-Bench prompts through a simulated mesh; every figure is simulated."""
    measured = args.profile == "this-device" or args.calibrate_with
    torch.set_num_threads(1 if measured else (args.threads or 1))  # one: no oversubscription on a shared box
    env = _Env(args.model, args.dtype)
    if args.calibrate_with:
        return _calibrate(env, args, [Path(p) for p in args.calibrate_with])
    profile = load_profile(args.profile, env.full, env.source.fingerprint)
    link = parse_link(args.link)
    origins = parse_origins(args.originator, args.originators)
    modes = args.modes.split(",")
    questions = pick_questions(Path(args.questions), args.prompts)
    where = "own device" if origins[0] is None else f"stage {origins[0]}'s device"
    _progress(
        f"simulate: {args.stages} stages x {profile.name}, link {link}, originator on {where}, "
        f"{len(questions)} prompts x {args.max_tokens} tokens, modes {','.join(modes)}"
    )
    _progress(f"profile: {profile.note}")
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
    )
    summary = {m: summarize(r) for m, r in res.items()}
    flow = res.get("flow") or next(iter(res.values()))
    record = {
        "label": "simulated",
        "config": {k: v for k, v in vars(args).items() if k != "func"} | {"drafter": drafter},
        "profile": profile.to_json(),
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        _progress(f"record: {args.out}")
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"SIMULATED (not measured): {args.stages} stages, profile {profile.name}, link {link}, originator on "
        f"{where}, drafter {drafter}, {len(questions)} Spec-Bench prompts x {args.max_tokens} tokens, "
        f"T={args.temperature}, acceptance from the real {env.source.name} ({str(env.full.dtype)[6:]})"
    )
    print(f"profile: {profile.note}")
    print(table(summary, args.rate))
    return 0
