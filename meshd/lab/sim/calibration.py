"""Calibration against measured loopback meshes: simulated vs measured tokens/s, and the fit of
a compute factor (and optionally a per-message overhead) that turns a bare-forward profile into
what a daemon pays."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def calibration_specs(record: dict | list) -> list[dict]:
    """Normalise a calibration input to a list of specs.

    Accepted: a spec ``{"stages": K, "link": "1ms/1000mbit", "threads_per_stage": 1, "modes": {"ar": tok_s,
    "chunk": tok_s, "flow": tok_s}}`` with optional ``metric`` ("e2e", tokens over submit-to-finish as
    the daemon's stats count them (default), or "decode"), ``max_tokens``, ``prompts`` (count) or
    ``question_ids``, ``drafter``, ``dtype``, ``weights``, ``originator`` ("own" or a stage index, default 0),
    ``layers`` (layers per stage in ring order; default an even split), ``cores`` (default: this
    machine's), ``compute_scale``, ``emulate`` (``PROFILE[:xK]``: the daemons
    were paced like that profile, which the simulation then uses instead of this device's, on devices of
    their own), ``wire_activations``, ``temperature``, ``first_tokens_ms`` ({mode: a tree's measured wait for its
    first tokens, ms}, compared beside the tokens/s); a list of specs; ``{"calibration": [...]}``;
    or a ``meshd bench --backend daemons`` record (``runs/bench-*.json``).
    """
    if isinstance(record, list):
        return [s for r in record for s in calibration_specs(r)]
    if "calibration" in record:
        return calibration_specs(record["calibration"])
    if "config" in record and "summary" in record:  # a meshd bench record
        cfg = record["config"]
        layers = cfg.get("layers")  # the daemons' plan, kept by records since 2026-12-03
        if layers is None and "stage" in (cfg.get("roles") or "").split(","):
            raise ValueError(
                f"a record of daemons started with --roles {cfg['roles']} cannot be calibrated against: their layer "
                "split came from the work each daemon measured, which this (older) record does not keep; "
                "calibrate with a newer record or one of daemons on the default role"
            )
        where = cfg.get("originator_stage", 0) if layers else 0
        whole = {  # each mode's figures over every category
            k.split("/", 1)[1]: v
            for k, v in record["summary"].items()
            if k.startswith("ALL/") and k.split("/", 1)[1] in ("ar", "chunk", "flow")
        }
        modes = {m: v["tokens_per_s"] for m, v in whole.items()}
        qids = list(dict.fromkeys(r["question_id"] for r in record.get("runs", [])))
        # a tree's wait for its first tokens, where the daemons' stats gave it (records since 2026-12-06)
        waits = {m: v["first_tokens_ms"] for m, v in whole.items() if v.get("first_tokens_ms")}
        return [
            {
                "stages": len(layers) if layers else cfg.get("stages", 1),
                "layers": layers,
                "originator": "own" if where is None else where,  # daemon 0 took the requests
                "link": cfg.get("link") or "0/inf",
                "threads_per_stage": cfg.get("threads") or 1,
                "modes": modes,
                "metric": "e2e",
                "max_tokens": cfg.get("max_tokens", 128),
                "question_ids": qids,
                "drafter": cfg.get("drafter"),
                "dtype": cfg.get("dtype"),
                "weights": cfg.get("weights"),
                "compute_scale": cfg.get("device_slowdown", 1.0),
                # daemons paced like a profile (``--emulate``): simulated with that profile, not this device's
                "emulate": cfg.get("emulate"),
                "wire_activations": cfg.get("wire_activations") or "auto",
                "temperature": cfg.get("temperature", 0.0),
                "first_tokens_ms": waits,
            }
        ]
    if "stages" not in record or "modes" not in record:
        raise ValueError("a calibration record needs 'stages' and 'modes' ({mode: measured tokens/s})")
    return [record]


def mean_of(runs: float | Sequence[float]) -> float:
    """One simulated figure: itself, or the mean of several seeds' runs."""
    return float(runs) if isinstance(runs, (int, float)) else sum(runs) / len(runs)


def calibration_rows(spec: dict, simulated: dict[str, float | Sequence[float]]) -> list[dict]:
    """Table rows of one measured mesh: measured against simulated tokens/s per mode. A mode simulated
    with several seeds (a record sampled at T > 0) is compared by the seeds' mean, and its row keeps every
    seed's figure (``simulated_runs``): one sampled run's paths differ from another's, so the spread says how
    far a single simulated run could sit from the measured one by sampling alone. Where the spec holds a
    tree's measured wait for its first tokens (``first_tokens_ms``) and the simulation's
    (``first_tokens_ms_simulated``, the simulator's run sets it), the row compares those too."""
    rows = []
    for mode, measured in spec["modes"].items():
        runs = simulated.get(mode)
        if runs is None:
            continue
        sim = mean_of(runs)
        row = {
            "stages": spec["stages"],
            "link": spec.get("link", "0/inf"),
            "mode": mode,
            "measured": measured,
            "simulated": sim,
            "rel_error": (sim - measured) / measured if measured else math.nan,
        }
        if not isinstance(runs, (int, float)) and len(runs) > 1:
            row["simulated_runs"] = [float(r) for r in runs]
        waited = spec.get("first_tokens_ms", {}).get(mode), spec.get("first_tokens_ms_simulated", {}).get(mode)
        if all(w is not None for w in waited):
            row["first_tokens_ms"] = {"measured": waited[0], "simulated": waited[1]}
        rows.append(row)
    return rows


def fit_scale_and_hop(points: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """Least squares over ``(hops per token, simulated s/token, measured s/token)`` of unshaped-link records:
    measured = scale * simulated + hops * hop. ``hop`` is what a daemon pays per message beyond the wire
    (decode, wake-ups, executor hand-offs); it shows as the gap between meshes of different sizes, which a
    compute factor alone cannot close. A negative fit means no such cost: ``hop`` 0, scale alone."""
    if len({h for h, _, _ in points}) < 2:
        raise ValueError("fitting a per-message overhead needs records of at least two stage counts")
    stt = sum(t * t for _, t, _ in points)
    sth = sum(t * h for h, t, _ in points)
    shh = sum(h * h for h, _, _ in points)
    stm = sum(t * m for _, t, m in points)
    shm = sum(h * m for h, _, m in points)
    det = stt * shh - sth * sth
    scale, hop = (stm * shh - shm * sth) / det, (stt * shm - sth * stm) / det
    if hop < 0:
        return stm / stt, 0.0
    return scale, hop


def calibration_table(rows: list[dict]) -> str:
    """The table; a column for a tree's wait for its first tokens where any row has it measured."""
    waits = any("first_tokens_ms" in r for r in rows)
    head = "| stages | link | mode | measured tok/s | simulated tok/s | error |"
    lines = [
        head + (" a tree's first tokens, ms: measured / simulated |" if waits else ""),
        "|---|---|---|---|---|---|" + ("---|" if waits else ""),
    ]
    for r in rows:
        line = (
            f"| {r['stages']} | {r['link']} | {r['mode']} | {r['measured']:.2f} | {r['simulated']:.2f}{_spread(r)} | "
            f"{r['rel_error'] * 100:+.1f}%{' (fit)' if r.get('fitted') else ''} |"
        )
        if waits:
            w = r.get("first_tokens_ms")
            line += f" {w['measured']:.0f} / {w['simulated']:.0f} |" if w else " - |"
        lines.append(line)
    return "\n".join(lines)


def _spread(row: dict) -> str:
    runs = row.get("simulated_runs")
    if not runs:
        return ""
    lo, hi = (min(runs) - row["measured"]) / row["measured"], (max(runs) - row["measured"]) / row["measured"]
    return f" (mean of {len(runs)} seeds: {min(runs):.2f} to {max(runs):.2f}, {lo * 100:+.1f}% to {hi * 100:+.1f}%)"


def calibrate(
    specs: list[dict],
    run: Callable[[dict, list[str], float, float], dict[str, float | Sequence[float]]],
    *,
    fit_mode: str | None,
    fit_hop: bool,
    progress: Callable[[str], None],
) -> tuple[float, float, list[dict]]:
    """The compute scale, the per-message overhead and the table rows of ``specs``.

    ``run(spec, modes, scale, hop)`` simulates one measured mesh and returns {mode: tokens/s}, or
    {mode: [tokens/s of each seed]} where it simulated several (a fit uses their mean).
    With ``fit_mode`` (``--fit-scale MODE``, default ``ar``) one number is fitted first: a factor on every
    compute cost, chosen so MODE matches its measurements (geometric mean over the records). The profile is a
    microbenchmark of bare forwards; a daemon also pays its event loop, executor hand-offs, codec
    and the memory traffic of its neighbours, which scale with the compute it wraps. With ``--fit-hop``
    a second number is fitted with it, from records of two or more mesh sizes: a fixed cost per message
    between devices (what a daemon pays beyond the wire), which a compute factor cannot express because
    a bigger mesh has more hops per token for the same compute. Every other figure in the table is
    then a prediction of the simulator, not a fit.
    Rows of the fitted mode carry ``"fitted": True``.
    """
    scale, hop, fitted = 1.0, 0.0, set()
    if fit_mode and fit_mode != "none":
        basis = [s for s in specs if fit_mode in s["modes"]]
        if not basis:
            raise ValueError(f"--fit-scale {fit_mode}: no calibration record measured that mode")
        unshaped = all((s.get("link") or "0/inf") == "0/inf" for s in basis)
        if fit_hop:
            if not unshaped:
                raise ValueError("--fit-hop needs records measured on unshaped links")
            points = []
            for s in basis:
                hops = s["stages"] + (1 if str(s.get("originator", 0)) == "own" else 0)
                points.append((hops, 1 / mean_of(run(s, [fit_mode], 1.0, 0.0)[fit_mode]), 1 / s["modes"][fit_mode]))
            scale, hop = fit_scale_and_hop(points)
        else:
            # on unshaped links every simulated time is compute, so one step is exact; link time does not scale
            for _ in range(1 if unshaped else 4):
                ratios_ = [mean_of(run(s, [fit_mode], scale, 0.0)[fit_mode]) / s["modes"][fit_mode] for s in basis]
                step = math.exp(sum(math.log(r) for r in ratios_) / len(ratios_))  # geometric mean over records
                scale *= step
                if abs(step - 1.0) < 0.01:
                    break
        fitted = {(s["stages"], s.get("link") or "0/inf", fit_mode) for s in basis}
        progress(
            f"fitted compute scale {scale:.3f}"
            + (f" and per-message overhead {hop * 1e3:.2f} ms" if hop else "")
            + f" on {fit_mode} of {len(basis)} record(s)"
        )
    all_rows = []
    for spec in specs:
        rows = calibration_rows(spec, run(spec, list(spec["modes"]), scale, hop))
        for r in rows:
            r["fitted"] = (r["stages"], r["link"], r["mode"]) in fitted
        all_rows += rows
    return scale, hop, all_rows
