"""Benchmarks on Spec-Bench: decoding modes compared on the same prompts, interleaved.

Modes run one after another on each prompt (not one mode over all prompts, then the next),
so that drift of this machine (thermal, other load) hits every mode alike.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meshd.lab.emulate import CALL_KINDS, DeviceEmulation, link_emulation, slowdown
from meshd.lab.testbed import LoopbackMesh, http, ids_placing
from meshd.ring.scheduler import TREE_ENDS
from meshd.serve.loading import Ticker, quiet, stderr_say
from meshd.serve.local import LocalModel
from peers.planner import ROLES
from training.prompts import EVERYDAY, SPEC_BENCH_ENV, SPEC_BENCH_SOURCE, spec_bench_path

# every request's seed: at T > 0 each mode then draws the same numbers, and writes the same answer
# (models/verify.py), so modes are compared answer for answer
SEED = 0


@dataclass
class Run:
    question_id: int
    category: str
    mode: str
    new_tokens: int
    rounds: int
    mean_accepted: float
    target_forwards: int
    seconds: float
    tokens_per_s: float
    trees: int = 0  # verified trees (flow's rounds count every walk advance; this counts whole trees)
    draft_seconds: float = 0.0  # of ``seconds``, what the drafter took (the head's forwards included)
    verified_nodes: int = 0  # rows the target verified, roots included
    # of ``seconds``, the prompt's prefill up to its last row's hidden state (0: the backend did not say)
    prefill_seconds: float = 0.0
    plain_trees: int = 0  # of ``trees``, those of the root alone (ar's all; spec's and flow's while backed off)
    # summed over ``trees``: from each fresh root to its first tokens (0: the backend did not say; one device's)
    first_tokens_seconds: float = 0.0
    text_sha: str = ""  # of the answer's text (modes compared answer for answer: same_texts); "": not given
    # flow with slots: why its drafted trees ended (Stats.tree_ends: missed, unsent, undrafted); {}: not given
    tree_ends: dict[str, int] = field(default_factory=dict)
    # from the request's submission to its first tokens at the daemon's API (0: the backend did not say)
    first_token_seconds: float = 0.0

    @property
    def decode_seconds(self) -> float:
        """Seconds after the prefill: what llama-bench's text-generation figure (tg) times."""
        return self.seconds - self.prefill_seconds if self.prefill_seconds else 0.0


def question_file(arg: str | None) -> Path:
    """The question file ``--questions`` names: a path, or ``everyday`` for the project's own set;
    without one, the path in ``$MESHD_SPEC_BENCH``. Spec-Bench is public but not part of this
    repository, so a run on it names the copy it read (and fails clearly without one)."""
    path = spec_bench_path(arg)
    if path is None:
        raise ValueError(
            f"no question file: pass --questions PATH to Spec-Bench's question.jsonl ({SPEC_BENCH_SOURCE}) "
            f"or --questions everyday, or set {SPEC_BENCH_ENV}"
        )
    if path == Path("everyday"):
        return EVERYDAY
    if not arg and not path.is_file():
        raise ValueError(f"question file {path} (from ${SPEC_BENCH_ENV}) not found")
    return path


def spread_over_categories(questions: list[dict], n: int) -> list[dict]:
    """``n`` of ``questions``, round robin over their categories (file order within each)."""
    by_cat: dict[str, list[dict]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q)
    out = [q for group in itertools.zip_longest(*by_cat.values()) for q in group if q is not None]
    return out[:n]


def run_interleaved(
    questions: list[dict], modes: dict[str, Callable[[str], dict]], progress: Callable[[str], None] | None = None
) -> list[Run]:
    """``modes`` maps a label to a function question-text -> stats dict (the ``generate --json`` fields).

    ``progress`` hears a line after each run and, while one runs, every ``TICK_EVERY_S`` seconds."""
    runs = []
    total = len(questions) * len(modes)
    t0 = time.perf_counter()
    for q in questions:
        for label, fn in modes.items():
            running = f"[{len(runs) + 1}/{total}] q{q['question_id']} {q['category']} {label}: running"
            with Ticker(progress or quiet, running):
                s = fn(q["turns"][0])
            runs.append(
                Run(
                    q["question_id"],
                    q["category"],
                    label,
                    s["new_tokens"],
                    s["rounds"],
                    s["mean_accepted"],
                    s["target_forwards"],
                    s["seconds"],
                    s["tokens_per_s"],
                    s.get("trees", 0),
                    s.get("draft_seconds", 0.0),
                    s.get("verified_nodes", 0),
                    s.get("prefill_seconds", 0.0),
                    s.get("plain_trees", 0),
                    s.get("first_tokens_seconds", 0.0),
                    text_digest(s["text"]) if "text" in s else "",
                    dict(s.get("tree_ends") or {}),
                    s.get("first_token_seconds") or 0.0,
                )
            )
            if progress:
                done = len(runs)
                eta = (time.perf_counter() - t0) / done * (total - done)
                progress(
                    f"[{done}/{total}] q{q['question_id']} {q['category']:<16} {label:<12} "
                    f"{s['tokens_per_s']:6.1f} tok/s  {s['mean_accepted']:.2f} tok/round  eta {eta:4.0f}s"
                )
    return runs


def text_digest(text: str) -> str:
    """A short fingerprint of an answer: records compare modes' answers without carrying their text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def same_texts(answers: dict[str, dict]) -> dict[str, list[int]]:
    """``answers``: {mode: {prompt: answer}}, the first mode the reference. Every mode must write the
    reference's answer for each prompt, greedy or sampled with one seed (a position's noise is keyed
    by the seed and the position whatever the tree, models/verify.py; batch-invariant layers, as
    int4a8's, make the logits the same bits; dense ones may part at a near-tie): per later mode, how
    many of its answers equal the reference's for the same prompt, and how many were compared (prompts
    the reference lacks are not)."""
    modes = list(answers)
    if len(modes) < 2:
        return {}
    first = answers[modes[0]]
    out = {}
    for m in modes[1:]:
        both = [k for k in answers[m] if k in first]
        out[m] = [sum(answers[m][k] == first[k] for k in both), len(both)]
    return out


def same_texts_line(same: dict[str, list[int]], first: str) -> str:
    parts = ", ".join(f"{m} {k}/{n}" for m, (k, n) in same.items())
    return f"{parts} the same as {first}'s"


def sum_tree_ends(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Why drafted trees ended (``Stats.tree_ends``), summed over requests, in ``TREE_ENDS``' order."""
    counts = list(counts)
    return {why: n for why in TREE_ENDS if (n := sum(c.get(why, 0) for c in counts))}


def tree_ends_line(ends: dict[str, dict[str, int]]) -> str | None:
    """``ends``: {mode: {why: trees}} (``Stats.tree_ends`` summed). One line saying, per mode that counted
    them, why its drafted trees ended, as shares of those trees; None where no mode did."""
    parts = []
    for mode, got in ends.items():
        if total := sum(got.values()):
            shares = ", ".join(f"{why} {100 * n / total:.0f} %" for why, n in got.items())
            parts.append(f"{mode} {shares} (of {total})")
    if not parts:
        return None
    return (
        "why drafted trees ended (below the node where the walk stopped, the pool held other tokens than the "
        "target's: missed; held it, unsent: unsent; held none: undrafted): " + "; ".join(parts)
    )


def decode_rate(runs: Sequence[Run]) -> float:
    """Tokens per second after the prefill (the prefill's own token left out), over the runs whose
    backend timed their prefill: the figure to set beside llama-bench's ``tg`` (which times generation
    without the prompt), where ``tokens_per_s`` includes the prompt's prefill. 0.0 where none did."""
    timed = [r for r in runs if r.prefill_seconds and r.new_tokens > 1]
    secs = sum(r.decode_seconds for r in timed)
    return round(sum(r.new_tokens - 1 for r in timed) / secs, 3) if secs > 0 else 0.0


def summarize_runs(runs: list[Run], baseline: str, temperature: float = 0.0) -> tuple[dict, str]:
    """Per-category and overall figures, plus a markdown table. Speed-ups are ratios of total
    tokens over total seconds, per category, against ``baseline``. Where the backend gave the answers,
    the table follows a line saying how many of each mode's answers are ``baseline``'s (the oracle)."""
    by: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        by[(r.category, r.mode)].append(r)
        by[("ALL", r.mode)].append(r)
    cats = [*list(dict.fromkeys(r.category for r in runs)), "ALL"]
    modes = list(dict.fromkeys(r.mode for r in runs))
    table: dict = {}
    for c in cats:
        for m in modes:
            rs = by[(c, m)]
            toks, secs = sum(r.new_tokens for r in rs), sum(r.seconds for r in rs)
            rounds = sum(r.rounds for r in rs)
            table[f"{c}/{m}"] = {
                "n": len(rs),
                "tokens": toks,
                "seconds": round(secs, 3),
                "tokens_per_s": round(toks / secs, 3) if secs else 0.0,
                "decode_tokens_per_s": decode_rate(rs),
                "mean_accepted": round(sum(r.mean_accepted * r.rounds for r in rs) / rounds, 3) if rounds else 0.0,
                "tokens_per_forward": round(toks / max(1, sum(r.target_forwards for r in rs)), 3),
                # tokens per verified tree (the acceptance figure slots do not dilute; prefill's token aside)
                "accepted_per_tree": round(sum(r.mean_accepted * r.rounds for r in rs) / trees, 3)
                if (trees := sum(r.trees for r in rs))
                else 0.0,
                "trees": trees,
                "plain_trees": sum(r.plain_trees for r in rs),  # backed off: trees of the root alone
                # a tree's wait for its first tokens, mean over trees (None: its backend does not time it)
                "first_tokens_ms": round(1e3 * waited / trees, 1)
                if trees and (waited := sum(r.first_tokens_seconds for r in rs))
                else None,
                "tree_ends": sum_tree_ends(r.tree_ends for r in rs),
                # time to first token at the daemon's API, mean over the runs that report it (None: none does)
                "ttft_ms": round(1e3 * sum(ts) / len(ts), 1)
                if (ts := [r.first_token_seconds for r in rs if r.first_token_seconds])
                else None,
            }
    head = "| category | " + " | ".join(f"{m} tok/s | {m} decode | {m} acc" for m in modes)
    head += "".join(f" | {m}/{baseline}" for m in modes if m != baseline) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(modes) + len(modes) - (baseline in modes))]
    for c in cats:
        row = [c]
        for m in modes:
            t = table[f"{c}/{m}"]
            decode = f"{t['decode_tokens_per_s']:.2f}" if t["decode_tokens_per_s"] else "-"
            row += [f"{t['tokens_per_s']:.2f}", decode, f"{t['mean_accepted']:.2f}"]
        base = table.get(f"{c}/{baseline}", {}).get("tokens_per_s", 0)
        row += [f"{table[f'{c}/{m}']['tokens_per_s'] / base:.2f}x" if base else "-" for m in modes if m != baseline]
        lines.append("| " + " | ".join(row) + " |")
    answers: dict[str, dict] = defaultdict(dict)  # modes whose backend gave their answers
    for r in runs:
        if r.text_sha:
            answers[r.mode][r.question_id] = r.text_sha
    same = same_texts({baseline: answers.pop(baseline)} | answers) if baseline in answers else {}
    for m, got in same.items():
        table[f"ALL/{m}"]["same_text"] = got
    if same:
        kind = "greedy answers" if temperature == 0 else f"sampled answers (seed {SEED})"
        lines = [f"{kind} (the oracle): {same_texts_line(same, baseline)}", "", *lines]
    if (why := tree_ends_line({m: table[f"ALL/{m}"]["tree_ends"] for m in modes})) is not None:
        lines += ["", why]
    if ttft := {m: t for m in modes if (t := table[f"ALL/{m}"]["ttft_ms"]) is not None}:
        lines += ["", "time to first token at the API, mean ms: " + ", ".join(f"{m} {t:.0f}" for m, t in ttft.items())]
    return table, "\n".join(lines)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "processor": platform.processor(),
    }


def write_record(out_dir: Path, config: dict, runs: list[Run], table: dict, markdown: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{stamp}.json"
    n = 1
    while path.exists():  # two runs in one second (one per temperature) must not overwrite each other
        n += 1
        path = out_dir / f"bench-{stamp}-{n}.json"
    path.write_text(
        json.dumps(
            {"config": config, "machine": machine_info(), "summary": table, "runs": [r.__dict__ for r in runs]},
            indent=1,
        )
    )
    (path.with_suffix(".md")).write_text(markdown + "\n")
    return path


progress_printer = stderr_say  # the benchmarks' progress lines: stderr, so stdout stays the table


class LocalBackend:
    """One device: the single-device engine (``ar``, ``spec:DRAFTER``) or in-process stages."""

    def __init__(self, args):
        torch.set_num_threads(args.threads or torch.get_num_threads())
        self.args = args
        self.local = LocalModel(args.model, args.dtype, args.weights, say=progress_printer)
        self.local.curve  # noqa: B018 - measure (or load) the cost curve before timing anything
        self.stages = args.stages if args.backend == "inprocess" else 1

    def describe(self) -> str:
        where = f"{self.stages} in-process stages" if self.stages > 1 else "one device"
        n = torch.get_num_threads()
        t = self.local.target
        return f"{where}, {n} thread{'s' if n > 1 else ''}, dtype {str(t.dtype)[6:]}, weights {t.kernels}"

    def runner(self, label: str) -> Callable[[str], dict]:
        mode, _, drafter = label.partition(":")
        a = self.args
        return lambda text: self.local.run(
            text,
            mode=mode,
            drafter=drafter or a.drafter,
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            seed=SEED,
            stages=self.stages,
        )

    def devices(self) -> list[dict]:
        return []  # one process: no daemons to ask

    def layout(self) -> dict:
        return {}  # one process: no plan

    def close(self) -> None:
        pass


def daemon_roles(spec: str | None, n: int) -> list[str]:
    """``--roles``: one role per daemon (``both``, ``stage`` or ``originator``; None: every daemon ``both``).
    Requests go through daemon 0, so it must originate; peers that only serve stages make the planner take
    the originators' measured work off their shares (``peers.planner``: the origin-aware split)."""
    if not spec:
        return ["both"] * n
    roles = [r.strip() for r in spec.split(",")]
    if len(roles) != n:
        raise ValueError(f"--roles {spec!r}: {len(roles)} roles for {n} daemons (--stages); give one per daemon")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"--roles {spec!r}: {bad[0]!r} is not a role; choose from {', '.join(ROLES)}")
    if roles[0] == "stage":
        raise ValueError(f"--roles {spec!r}: daemon 0 takes the requests, so it must originate (both or originator)")
    if all(r == "originator" for r in roles):
        raise ValueError(f"--roles {spec!r}: no daemon holds layers; at least one must be both or stage")
    return roles


def daemon_flags(args) -> list[str]:
    """The ``meshd serve`` flags every bench daemon gets from the bench's own. Bad values fail here, not in
    every daemon.

    Prefix caching is off: the modes take turns on each prompt, so with it on every mode after the first
    would find the prompt's KV kept by the one before and prefill only its last token, and the first mode
    (``ar``, the baseline) would be the only one to prefill cold (0.54-0.73 s against ~0.49 s a prompt on 5
    emulated boards, docs/benchmarks.md). ``python -m meshd.lab.multiturn`` measures the cache itself."""
    slowdown(args.device_slowdown)
    link_emulation(args.link)
    extra = ["--drafter", args.drafter, "--device-slowdown", str(args.device_slowdown), "--weights", args.weights]
    extra += ["--no-prefix-cache"]
    if args.link:
        extra += ["--link", args.link]
    if getattr(args, "emulate", None):
        DeviceEmulation.parse(args.emulate)
        extra += ["--emulate", args.emulate]
    if getattr(args, "flow_slots", None) is not None:
        extra += ["--flow-slots", str(args.flow_slots)]
    if getattr(args, "wire_activations", None):
        extra += ["--wire-activations", args.wire_activations]
    return extra


class DaemonBackend:
    """``--stages`` real daemons on loopback; requests go through the REST API of the first one."""

    def __init__(self, args):
        self.args = args
        extra = daemon_flags(args)
        roles = daemon_roles(getattr(args, "roles", None), args.stages)
        holders: int | range = sum(1 for r in roles if r != "originator")
        if "stage" in roles and "both" in roles:  # origin-aware: a busy originator may be left no layers at all
            holders = range(sum(1 for r in roles if r == "stage"), holders + 1)
        node_ids = None
        if getattr(args, "originator_pin", None) is not None:
            at = args.originator_pin
            if not 1 <= at <= args.stages or "originator" in roles:
                raise ValueError(
                    f"--originator-stage {at}: give a stage from 1 to {args.stages} (--stages), with every daemon "
                    "holding one (no --roles originator)"
                )
            node_ids = ids_placing(0, at - 1, args.stages)
        self._tmp = tempfile.TemporaryDirectory(prefix="meshd-bench-")
        progress_printer(f"starting {args.stages} daemons on 127.0.0.1 ...")
        self.mesh = LoopbackMesh(
            Path(self._tmp.name),
            args.stages,
            model=args.model,
            dtype=args.dtype if args.dtype != "auto" else "auto",
            threads=args.threads or 1,
            extra=extra,
            extra_for={i: ["--role", r] for i, r in enumerate(roles) if r != "both"},
            node_ids=node_ids,
        )
        try:  # each daemon's state is said when it changes, and the wait itself regularly
            with Ticker(progress_printer, f"waiting for {args.stages} daemons to load and agree on a plan"):
                live = list(range(args.stages))
                self.plan = self.mesh.wait_plan(live, holders, timeout=300, progress=progress_printer)
        except Exception:
            self.close()
            raise
        self.model = self.mesh.status(0)["model"]
        self._busy0 = self._busy()  # busy fractions count from here, not from the daemons' start-up
        # per mode: (wall seconds of its requests, busy seconds per stage during them), for per-mode fractions
        self._busy_by: dict[str, tuple[float, list[float]]] = {}
        self._emulation0: dict[int, dict] = {}  # each daemon's emulation report at the previous record
        for i in range(args.stages):  # overruns count from here too
            self._emulation_since(i, (self.mesh.status(i) or {}).get("emulation"))

    def describe(self) -> str:
        a, layout = self.args, self.layout()
        return (
            f"{a.stages} daemons on loopback ({a.threads or 1} thread each, sharing {os.cpu_count()} cores), "
            f"link {a.link or 'unshaped'}, device slowdown x{a.device_slowdown}, no prefix caching"
            + (f", EMULATED device profile {a.emulate}" if getattr(a, "emulate", None) else "")
            + (f", flow slots {a.flow_slots}" if getattr(a, "flow_slots", None) is not None else "")
            + (f", wire activations {a.wire_activations}" if getattr(a, "wire_activations", None) else "")
            + (f", roles {a.roles}" if getattr(a, "roles", None) else "")
            + f", layers per stage {'/'.join(str(n) for n in layout['layers'])}{self._origin_place(layout)}"
        )

    @staticmethod
    def _origin_place(layout: dict) -> str:
        """Where the originator's own stage sits in the ring (``layout``: :meth:`layout`): the peers' node ids
        decide it (random, unless ``--originator-stage`` chose them), and it moves the figures
        (docs/benchmarks.md, "Two daemons, traced", "The originator's place in the ring"), so every table
        says it."""
        at, n = layout["originator_stage"], len(layout["layers"])
        return " (the originator holds none)" if at is None else f" (the originator's is stage {at + 1} of {n})"

    def runner(self, label: str) -> Callable[[str], dict]:
        a = self.args
        if label.startswith("local:"):  # the single-device baseline, in this process, while the daemons idle
            return self._local(label.removeprefix("local:"))

        def run(text: str) -> dict:
            before = self._busy()
            try:
                return ask(text)
            finally:
                self._count_busy(label, before, self._busy())

        def ask(text: str) -> dict:
            code, body = http(
                "POST",
                self.mesh.url(0) + "/v1/chat/completions",
                {
                    "model": self.model,
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": a.max_tokens,
                    "temperature": a.temperature,
                    "seed": SEED,
                    "mode": label,
                },
                timeout=600,
            )
            if code != 200:
                raise RuntimeError(f"daemon answered {code}: {body}")
            return body["meshd"] | {"text": body["choices"][0]["message"]["content"]}

        return run

    def _local(self, label: str) -> Callable[[str], dict]:
        if not hasattr(self, "local"):
            torch.set_num_threads(self.args.threads or 1)  # one device = what one daemon has
            self.local = LocalModel(self.args.model, self.args.dtype, self.args.weights, say=progress_printer)
            self.local.curve  # noqa: B018 - measure (or load) the cost curve before timing anything
        mode, _, drafter = label.partition(":")
        a = self.args
        return lambda text: self.local.run(
            text, mode=mode, drafter=drafter or a.drafter, max_tokens=a.max_tokens, temperature=a.temperature, seed=SEED
        )

    def _busy(self) -> tuple[float, list[float]]:
        return time.monotonic(), [
            ((self.mesh.status(i) or {}).get("stage") or {}).get("busy_seconds", 0.0) for i in range(self.args.stages)
        ]

    def _count_busy(self, label: str, before: tuple[float, list[float]], after: tuple[float, list[float]]) -> None:
        wall, busy = self._busy_by.get(label, (0.0, [0.0] * self.args.stages))
        (t0, b0), (t1, b1) = before, after
        self._busy_by[label] = (wall + t1 - t0, [b + y - x for b, x, y in zip(busy, b0, b1, strict=True)])

    def _emulation_since(self, i: int, report: dict | None) -> dict | None:
        """Daemon ``i``'s emulation report with its call and overrun counts since the previous record's."""
        if not report:
            return report
        prev, self._emulation0[i] = self._emulation0.get(i), report
        if prev is None:
            return report
        since = {k: {n: report[k][n] - prev[k][n] for n in ("calls", "overruns")} for k in CALL_KINDS if k in report}
        return report | since

    def layout(self) -> dict:
        """The plan the daemons served, for the record (the simulator's calibration replays it): layers per
        stage in ring order, and the stage daemon 0 (the originator) holds, None where it holds no layers."""
        stages = self.plan["stages"]
        origin = self.mesh.node_id(0)
        at = next((k for k, st in enumerate(stages) if st["node_id"] == origin), None)
        return {"layers": [st["stop_layer"] - st["first_layer"] for st in stages], "originator_stage": at}

    def devices(self) -> list[dict]:
        """Each daemon's stage figures from its ``/mesh`` (cumulative since start-up); since the daemons were
        ready or the previous call (one record per temperature): its emulation report's calls and overruns,
        its busy fraction (``busy_fraction``) and per mode its busy fraction while that mode's requests ran
        (``busy_by_mode``: the modes run one request at a time, so each request's stage time is its own)."""
        (t0, b0), (t1, b1) = self._busy0, self._busy()
        by_modes, self._busy0, self._busy_by = self._busy_by, (t1, b1), {}
        out = []
        for i in range(self.args.stages):
            st = self.mesh.status(i) or {}
            busy = (b1[i] - b0[i]) / (t1 - t0) if t1 > t0 else 0.0
            by_mode = {m: round(b[i] / wall, 3) for m, (wall, b) in by_modes.items() if wall > 0}
            out.append(
                {
                    "node": i,
                    "stage": st.get("stage"),
                    "emulation": self._emulation_since(i, st.get("emulation")),
                    "busy_fraction": busy,
                    "busy_by_mode": by_mode,
                }
            )
        return out

    def close(self) -> None:
        self.mesh.close() if hasattr(self, "mesh") else None
        self._tmp.cleanup()


class open_backend:
    def __init__(self, args):
        self.args = args

    def __enter__(self):
        self.backend = DaemonBackend(self.args) if self.args.backend == "daemons" else LocalBackend(self.args)
        return self.backend

    def __exit__(self, *exc) -> None:
        self.backend.close()


OVERRUN_WARNING = 0.1  # a share of emulated calls whose real work overran the profile: CPU-bound, not emulated


def devices_note(devices: list[dict]) -> str:
    """Lines under a bench table: per daemon its busy fraction and, when emulated, the profile and overruns."""
    lines = []
    for d in devices:
        st, em = d.get("stage") or {}, d.get("emulation")
        busy = d.get("busy_fraction")
        line = (
            f"daemon {d['node']}: busy fraction {busy:.2f} during this record"
            if busy is not None
            else f"daemon {d['node']}: busy fraction {st.get('utilisation', 0.0):.2f} since start"
        )
        if d.get("busy_by_mode"):
            line += " (" + ", ".join(f"{m} {b:.2f}" for m, b in d["busy_by_mode"].items()) + ")"
        if em:
            calls = sum(em[k]["calls"] for k in CALL_KINDS)
            over = sum(em[k]["overruns"] for k in CALL_KINDS)
            line += f", EMULATED {em['spec']}: {over}/{calls} calls overran the profile"
            if calls and over / calls > OVERRUN_WARNING:
                line += " (CPU-bound: these figures are this machine's, not the profile's)"
        lines.append(line)
    return ("\n\n" + "\n".join(lines)) if lines else ""
