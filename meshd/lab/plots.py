"""PNG plots from benchmark records (``meshd plot``): bench records, simulate records, load records.

Each plot says in its title where its numbers come from (measured / emulated / simulated) and how
many cores the emulated devices shared, because on a 2-core machine that decides what they mean.
A plot whose records are missing is skipped with a line saying what it needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from meshd.modes import MESH_MODES


def load_records(paths: list[Path]) -> list[dict]:
    """Read JSON records, tagging each with its path and kind (bench, simulate or load)."""
    out = []
    for p in paths:
        try:
            rec = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: not a readable JSON record ({exc})") from None
        if not isinstance(rec, dict):
            continue
        kind = (
            "simulate"
            if rec.get("label") == "simulated"
            else "load"
            if "load" in rec
            else "bench"
            if "summary" in rec and "config" in rec
            else None
        )
        if kind:
            out.append(rec | {"_path": str(p), "_kind": kind})
    return out


def _plt():
    """pyplot on the file-only Agg backend. Imported here, not at the top: matplotlib is an optional
    dependency (the dev extra) that only drawing needs, and slow to import."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("meshd plot needs matplotlib: pip install matplotlib (or the dev extra)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _source(rec: dict) -> str:
    """'measured, 2 daemons on loopback (1 thread each, sharing 2 cores), ...' for a bench record."""
    cfg = rec.get("config", {})
    info = cfg.get("backend_info", cfg.get("backend", "?"))
    emulated = cfg.get("link") or float(cfg.get("device_slowdown") or 1.0) != 1.0
    return f"{'emulated' if emulated else 'measured'}: {info}"


def _mesh_records(records: list[dict], backend: str = "daemons") -> list[dict]:
    return [
        r
        for r in records
        if r["_kind"] == "bench"
        and r["config"].get("backend") == backend
        and all(f"ALL/{m}" in r["summary"] for m in MESH_MODES)
    ]


def _speedups(rec: dict, qids: set[int] | None = None) -> dict[str, float]:
    """Mode ratios of total tokens over total seconds, over the questions ``qids`` (default: all)."""
    if qids is None:
        s = {m: rec["summary"][f"ALL/{m}"]["tokens_per_s"] for m in MESH_MODES}
    else:
        runs = [r for r in rec["runs"] if r["question_id"] in qids]
        s = {
            m: sum(r["new_tokens"] for r in runs if r["mode"] == m)
            / max(1e-9, sum(r["seconds"] for r in runs if r["mode"] == m))
            for m in MESH_MODES
        }
    return {"flow/ar": s["flow"] / s["ar"], "chunk/ar": s["chunk"] / s["ar"], "flow/chunk": s["flow"] / s["chunk"]}


def plot_categories(records: list[dict], out: Path) -> Path | str:
    """Tokens/s per mode and category (grouped bars), from the unshaped 2-daemon record, else any bench record."""
    recs = [r for r in records if r["_kind"] == "bench"]
    if not recs:
        return "tokens/s per category: needs a meshd bench record"
    plain = [r for r in _mesh_records(records) if not r["config"].get("link")]
    rec = min(plain, key=lambda r: r["config"].get("stages", 0)) if plain else recs[0]
    summary = rec["summary"]
    cats = list(dict.fromkeys(k.split("/", 1)[0] for k in summary))
    modes = list(dict.fromkeys(k.split("/", 1)[1] for k in summary))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, len(cats) * 0.9), 4.5))
    width = 0.8 / len(modes)
    for j, m in enumerate(modes):
        ax.bar(
            [i + j * width for i in range(len(cats))],
            [summary.get(f"{c}/{m}", {}).get("tokens_per_s", 0.0) for c in cats],
            width,
            label=m,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"tokens/s per mode and category\n{_source(rec)}", fontsize=9)
    ax.legend()
    return _save(fig, out / "tokens_per_category.png")


def plot_stages(records: list[dict], out: Path) -> Path | str:
    """Speed-up over ar (and flow over chunk) vs the number of stages, measured and simulated."""
    meas = sorted(
        (
            r
            for r in _mesh_records(records)
            if not r["config"].get("link") and float(r["config"].get("device_slowdown") or 1.0) == 1.0
        ),
        key=lambda r: r["config"]["stages"],
    )
    sims = sorted(
        (r for r in records if r["_kind"] == "simulate" and not r["config"].get("rate")),
        key=lambda r: r["config"]["stages"],
    )
    if len(meas) + len(sims) < 2:
        return "speed-up vs stages: needs daemon bench records (unshaped link) or simulate records, 2+ stage counts"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, style in (("flow/ar", "o-"), ("chunk/ar", "s-"), ("flow/chunk", "^-")):
        if meas:
            ax.plot(
                [r["config"]["stages"] for r in meas],
                [_speedups(r)[label] for r in meas],
                style,
                label=f"{label} (measured, loopback)",
            )
        pts = [(r["config"]["stages"], r.get("ratios", {}).get(label)) for r in sims]
        pts = [(k, v) for k, v in pts if v]
        if pts:
            ax.plot(
                *zip(*pts),
                style.replace("-", "--"),
                alpha=0.6,
                label=f"{label} (simulated, {sims[0]['profile']['name']})",
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("stages (devices)")
    ax.set_ylabel("speed-up (tokens/s ratio)")
    ax.set_xticks(sorted({r["config"]["stages"] for r in meas + sims}))
    where = (
        f"\nmeasured: loopback daemons, 1 thread each, all sharing {meas[0].get('machine', {}).get('cpus', '?')} cores"
        if meas
        else ""
    )
    ax.set_title(f"speed-up vs number of stages{where}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out / "speedup_vs_stages.png")


def _latency_ms(link: str | None) -> float:
    return float((link or "0ms").split("/")[0].lower().removesuffix("ms") or 0.0)


def plot_links(records: list[dict], out: Path) -> Path | str:
    """Speed-up vs emulated link latency, one line per stage count."""
    recs = [r for r in _mesh_records(records) if float(r["config"].get("device_slowdown") or 1.0) == 1.0]
    by_stages: dict[int, list[dict]] = {}
    for r in recs:
        by_stages.setdefault(r["config"]["stages"], []).append(r)
    by_stages = {k: v for k, v in by_stages.items() if len({_latency_ms(r["config"].get("link")) for r in v}) >= 2}
    if not by_stages:
        return "speed-up vs link latency: needs daemon bench records with 2+ different --link settings"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, rs in sorted(by_stages.items()):
        best: dict[float, dict] = {}  # one record per latency: the one with the most requests
        for r in rs:
            lat = _latency_ms(r["config"].get("link"))
            if lat not in best or len(r["runs"]) > len(best[lat]["runs"]):
                best[lat] = r
        rs = [best[x] for x in sorted(best)]
        qids = set.intersection(*({q["question_id"] for q in r["runs"]} for r in rs))  # compare like with like
        xs = sorted(best)
        for label, style in (("flow/ar", "o-"), ("flow/chunk", "^--")):
            ax.plot(xs, [_speedups(r, qids)[label] for r in rs], style, label=f"{label}, {k} stages")
        for x, r in zip(xs, rs):
            ax.annotate(
                r["config"].get("link") or "unshaped",
                (x, _speedups(r, qids)["flow/ar"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 4),
            )
        ax.text(0.01, 0.02, f"{len(qids)} prompts common to every record", transform=ax.transAxes, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("emulated link latency (ms, one way; bandwidth in the labels)")
    ax.set_ylabel("speed-up (tokens/s ratio)")
    ax.set_title("speed-up vs link latency (emulated in the transport; 2 cores shared by the daemons)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out / "speedup_vs_link.png")


def _load_points(records: list[dict]) -> tuple[list[dict], str]:
    """(rows with mode, rate, throughput, ttft_p50, tpot_p50, tpot_p95, nodes_per_round), source label."""
    rows: list[dict] = []
    label = ""
    for r in records:
        if r["_kind"] == "load":
            for row in r["load"].get("rows", r["load"]) if isinstance(r["load"], dict) else r["load"]:
                rows.append(row)
            label = f"measured: {r.get('config', {}).get('backend_info', 'loopback daemons')}"
    if not rows:
        for r in records:
            rate = r.get("config", {}).get("rate") if r["_kind"] == "simulate" else None
            if rate:
                for mode, s in r["summary"].items():
                    rows.append({"mode": mode, "rate": rate} | s)
                label = f"simulated: {r['config'].get('stages')} stages, profile {r['profile']['name']}"
    return rows, label


def plot_load(records: list[dict], out: Path) -> Path | str:
    """Throughput, latency and verified tree size vs offered load, per mode."""
    rows, label = _load_points(records)
    if len({r["rate"] for r in rows}) < 2:
        return "load: needs load results at 2+ arrival rates (meshd bench --load, or meshd simulate --rate)"
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels: list[tuple[str, Callable[[dict], float], Callable[[dict], float] | None, str]] = [
        ("throughput", lambda r: r["throughput"], None, "tokens/s (all requests)"),
        ("time to first token p50 (dotted: p95)", lambda r: r["ttft_p50"], lambda r: r["ttft_p95"], "s"),
        (
            "per-token latency p50 (dotted: p95)",
            lambda r: r["tpot_p50"] * 1e3,
            lambda r: r["tpot_p95"] * 1e3,
            "ms per token",
        ),
        ("verified nodes per round", lambda r: r.get("nodes_per_round", math.nan), None, "tree size"),
    ]
    for ax, (title, fn, fn95, ylabel) in zip(axes, panels):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = sorted(((r["rate"], r) for r in rows if r["mode"] == mode), key=lambda p: p[0])
            (line,) = ax.plot([p[0] for p in pts], [fn(p[1]) for p in pts], "o-", label=mode)
            if fn95:
                ax.plot([p[0] for p in pts], [fn95(p[1]) for p in pts], "x:", alpha=0.7, color=line.get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("arrival rate (requests/s, Poisson)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"load test: {label}", fontsize=9)
    return _save(fig, out / "load.png")


def plot_timeline(records: list[dict], out: Path) -> Path | str:
    """Which device computes what, over time, for one flow request (Gantt style)."""
    sims = [r for r in records if r["_kind"] == "simulate" and r.get("timeline")]
    if not sims:
        return "utilisation timeline: needs a meshd simulate record (its timeline is of the first flow request)"
    rec = min(sims, key=lambda r: (r["config"].get("rate") or 0, -r["config"]["stages"]))
    busy = rec["timeline"]
    t0 = min(b["start"] for b in busy)
    orig = sorted(b["start"] for b in busy if b["kind"] == "originator")
    # a few rounds are readable, a whole answer is a barcode: show about eight originator turns
    end = orig[min(len(orig) - 1, 8)] if len(orig) > 2 else max(b["end"] for b in busy)
    colours = {"stage": "tab:blue", "originator": "tab:orange"}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 0.6 * rec["config"]["stages"] + 1.8))
    for b in busy:
        if b["start"] > end:
            continue
        ax.broken_barh(
            [((b["start"] - t0) * 1e3, (b["end"] - b["start"]) * 1e3)],
            (b["device"] - 0.4, 0.8),
            color=colours.get(b["kind"], "tab:green"),
        )
    devices = sorted({b["device"] for b in busy})
    ax.set_yticks(devices, [f"device {d}" for d in devices])
    ax.set_xlabel("simulated time (ms), the first rounds of the request")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, ["stage forward", "originator (draft, verify)"], fontsize=8, loc="upper right")
    cfg = rec["config"]
    util = (rec.get("summary", {}).get("flow") or {}).get("utilisation")
    busy_note = f"\nstage busy fraction over all prompts {'/'.join(f'{u:.2f}' for u in util)}" if util else ""
    ax.set_title(
        f"per-device utilisation, one flow request (simulated: {cfg['stages']} stages, profile "
        f"{rec['profile']['name']}, link {cfg.get('link')}{busy_note})",
        fontsize=9,
    )
    return _save(fig, out / "timeline_flow.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


PLOTS = (plot_categories, plot_stages, plot_links, plot_load, plot_timeline)


def main(paths: list[str], out: str) -> int:
    """``meshd plot``: every plot the records allow; a line for each one skipped and why."""
    records = load_records([Path(p) for p in paths])
    if not records:
        print("no bench, simulate or load records among the files given")
        return 1
    for fn in PLOTS:
        res = fn(records, Path(out))
        print(f"wrote {res}" if isinstance(res, Path) else f"skipped {res}")
    return 0
