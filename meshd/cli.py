"""The ``meshd`` command line: one entry point, one subcommand per job.

Every subcommand's flags are defined here. The modules that do the work pull in torch,
transformers, aiohttp or asyncio, so each ``cmd_*`` imports them when it runs, not at the top
of this module: ``meshd --help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from meshd import __version__, config, logs
from meshd.client import DEFAULT_PEER
from meshd.modes import LOCAL_MODES, MESH_DEFAULT, MESH_MODES
from models.config import ModelError
from models.formats import WEIGHT_FORMATS, WEIGHTS_HELP
from peers.codec import WIRE_ACTIVATIONS, WIRE_ACTIVATIONS_HELP
from peers.planner import SPLITS

DEMO_QUESTION = "What are three good reasons to learn a second language? Answer briefly."
QUESTIONS_HELP = (
    "question file: Spec-Bench's question.jsonl (data/spec_bench/question.jsonl in the Spec-Bench repository) "
    "or another JSONL of the same shape, or 'everyday' (the project's own set); default: $MESHD_SPEC_BENCH"
)
MESH_MODE_HELP = (
    "flow: each draft tree streams through the ring and is verified as it returns; chunk: each tree is "
    "verified once all of it is back; ar: no drafting (default: %(default)s)"
)


def _threads(n: int | None) -> None:
    import torch  # lazy (see the module docstring): only commands that compute need torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def _duration(text: str) -> float:
    """``--time-budget``'s type: seconds, with the parser's own message on a bad value."""
    from training.timebudget import parse_duration  # imports no torch: parsing flags stays fast

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="GGUF file, HF safetensors dir, Hugging Face repo id already in the local cache (owner/name; never "
        "downloaded), or 'default' (embedded)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute dtype (auto: bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA, else fp32)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS, help=WEIGHTS_HELP)


def cmd_generate(args: argparse.Namespace) -> int:
    # lazy (see the module docstring): the model code imports torch and transformers
    from meshd.serve.loading import stderr_say
    from meshd.serve.local import LocalModel
    from models.eagle import default_drafter

    _threads(args.threads)
    local = LocalModel(args.model, args.dtype, args.weights, say=stderr_say)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.drafter == "auto":
        args.drafter = default_drafter(local.source)
    if args.mode == "spec" or args.stages > 1 or args.mode in ("chunk", "flow"):
        local.curve  # noqa: B018 - measured (with progress lines) before the answer starts, not inside it
    out = local.run(
        args.prompt,
        mode=args.mode,
        drafter=args.drafter,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        on_text=None if args.json else show,
        stages=args.stages,
    )
    if args.json:
        out["load_seconds"] = round(local.load_seconds, 3)
        if args.mode == "spec":
            out["cost_curve_ms"] = {t: round(s * 1e3, 3) for t, s in local.curve.items()}
        print(json.dumps(out))
    else:
        print()
        print(
            f"[{out['mode']}{'/' + out['drafter'] if out['drafter'] else ''}] {out['new_tokens']} tokens in "
            f"{out['seconds']:.2f}s ({out['tokens_per_s']:.1f} tok/s), {out['rounds']} rounds, "
            f"{out['mean_accepted']:.2f} tokens/round, {out['target_forwards']} target forwards",
            file=sys.stderr,
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from meshd.lab import bench  # lab modules import torch: loaded by their commands only, so `meshd --help` is fast
    from training.prompts import load_questions

    args.questions = str(bench.question_file(args.questions))  # the record names the file read
    questions = load_questions(
        Path(args.questions), args.categories or args.n_categories, args.per_category, held_out_only=args.held_out
    )
    default_modes = {"local": "ar,spec:ngram", "daemons": "local:spec,ar,chunk,flow", "inprocess": "ar,chunk,flow"}
    labels = (args.modes or default_modes[args.backend]).split(",")
    try:
        temperatures = [float(t) for t in str(args.temperature).split(",")]
    except ValueError:
        raise ValueError(f"--temperature {args.temperature!r}: expected numbers, e.g. 0 or 0,1") from None
    if args.load:
        args.temperature = temperatures[0]
        return _bench_load(args, questions, [m for m in labels if not m.startswith("local:")])
    with bench.open_backend(args) as backend:
        for temperature in temperatures:  # one record per temperature; modes interleaved within it
            args.temperature = temperature
            modes = {m: backend.runner(m) for m in labels}
            print(
                f"bench: {len(questions)} questions x {len(modes)} modes on {backend.describe()}, "
                f"{args.max_tokens} new tokens, T={temperature}",
                file=sys.stderr,
            )
            runs = bench.run_interleaved(questions, modes, bench.progress_printer)
            config = {k: v for k, v in vars(args).items() if k != "func"} | {"backend_info": backend.describe()}
            config["devices"] = backend.devices()  # per daemon: busy fraction, emulation overruns
            config |= backend.layout()  # the daemons' layer split, which a calibration replays
            table, md = bench.summarize_runs(runs, baseline=labels[0], temperature=temperature)
            md = f"{backend.describe()}, {args.max_tokens} new tokens, T={temperature}\n\n{md}"
            md += bench.devices_note(config["devices"])
            path = bench.write_record(Path(args.out), config, runs, table, md)
            print(md)
            print(f"record: {path}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from meshd.lab import plots  # lazy, as in cmd_bench

    return plots.main(args.records, args.out)


def _bench_load(args: argparse.Namespace, questions: list[dict], modes: list[str]) -> int:
    """``meshd bench --load RATES``: Poisson load on real daemons, several originators."""
    from meshd.lab import bench, loadtest  # lazy, as in cmd_bench

    if args.backend != "daemons":
        raise ValueError("--load needs --backend daemons: it measures real daemons under concurrent requests")
    rates = [float(r) for r in args.load.split(",")]
    with bench.open_backend(args) as backend:
        origins = [i for i, r in enumerate(bench.daemon_roles(args.roles, args.stages)) if r != "stage"]
        k = min(args.originators or len(origins), len(origins))
        urls = [backend.mesh.url(i) for i in origins[:k]]
        print(
            f"load test: rates {rates} req/s x {args.requests} requests, modes {','.join(modes)}, {k} originators, "
            f"{backend.describe()}, {args.max_tokens} new tokens, T={args.temperature}",
            file=sys.stderr,
        )
        rows = loadtest.run(
            urls,
            backend.model,
            [q["turns"][0] for q in questions],
            rates,
            modes,
            n=args.requests,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            progress=bench.progress_printer,
        )
        config = {k: v for k, v in vars(args).items() if k != "func"} | {
            "backend_info": backend.describe(),
            "originators": k,
            "devices": backend.devices(),  # per daemon: busy fraction, emulation overruns
        }
    md = loadtest.load_table(rows) + bench.devices_note(config["devices"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"config": config, "machine": bench.machine_info(), "load": {"rows": rows}}, indent=1))
    path.with_suffix(".md").write_text(f"measured: {config['backend_info']}\n\n{md}\n")
    print(md)
    print(f"record: {path}", file=sys.stderr)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from meshd.lab.sim import cli as sim_cli  # lazy, as in cmd_bench

    return sim_cli.main(args)


def cmd_profile(args: argparse.Namespace) -> int:
    # lazy, as in every command here: torch and the models load only for the command that needs them,
    # which keeps `meshd --help` fast
    import torch

    from meshd.serve.loading import Ticker, load_layers, stderr_say
    from models.profile import SIZES, compare_forward_times, stage_cost_curve, transformers_cost_curve
    from models.ranges import LayerRange
    from models.source import ModelSource
    from models.stage import Stage

    _threads(args.threads)
    src = ModelSource.resolve(args.model)
    span = LayerRange.parse(args.layers, src.config.n_layers)

    def load(weights: str | None, dtype: str) -> Stage:
        what = f"loading layers [{span.first}, {span.stop}) of {src.path.name} ({weights or dtype})"
        stderr_say(f"{what} ...")
        return load_layers(src, span, dtype, weights, what, vocab=whole, say=stderr_say)

    report = {
        "model": str(src.path),
        "layers": [span.first, span.stop],
        "threads": torch.get_num_threads(),
        "curves_ms": {},
    }
    whole = span == LayerRange.whole(src.config.n_layers)  # only the whole model computes logits
    if args.weights:  # weight formats side by side, each with the activations it picks, measured interleaved
        stages = {w: load(w, "auto") for w in args.weights.split(",")}
        what = f"measuring {', '.join(stages)} layers [{span.first}, {span.stop}), interleaved"
        stderr_say(f"{what} ...")
        with Ticker(stderr_say, what):
            curves = compare_forward_times(stages, repeats=args.repeats, lm_head=whole)
        for w, curve in curves.items():
            report["curves_ms"][f"meshd-{w}"] = {t: round(s * 1e3, 2) for t, s in curve.items()}
    for dt in [] if args.weights else args.dtypes.split(","):
        stage = load(None, dt)
        what = f"measuring {dt} layers [{span.first}, {span.stop})"
        stderr_say(f"{what} ...")
        with Ticker(stderr_say, what):
            ours = stage_cost_curve(src, stage, with_lm_head=whole, refresh=True, repeats=args.repeats)
        report["curves_ms"][f"meshd-{dt}"] = {t: round(s * 1e3, 2) for t, s in ours.items()}
        if args.compare_transformers:
            if not whole:
                print("--compare-transformers needs the whole model; skipping it for a slice", file=sys.stderr)
            else:
                stderr_say(f"measuring transformers' forward, {dt} ...")
                with Ticker(stderr_say, f"measuring transformers' forward, {dt}"):
                    ref = transformers_cost_curve(stage, repeats=args.repeats)
                report["curves_ms"][f"transformers-{dt}"] = {t: round(s * 1e3, 2) for t, s in ref.items()}
        del stage
    if args.json:
        print(json.dumps(report))
    else:
        names = list(report["curves_ms"])
        print(
            f"forward time (ms) over T new tokens after 128 cached, layers [{span.first}, {span.stop}), "
            f"{report['threads']} threads"
        )
        print("T".rjust(4) + "".join(n.rjust(20) for n in names))
        for t in SIZES:
            print(str(t).rjust(4) + "".join(f"{report['curves_ms'][n][t]:20.1f}" for n in names))
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from models.synthetic import SHAPES, write_synthetic_gguf  # lazy, as in every command here

    shape = SHAPES[args.shape]
    said = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // total
        if pct // 5 != said[0] // 5 or done == total:  # a line every 5 %
            said[0] = pct
            print(f"  {done / 2**20:8.1f} / {total / 2**20:.1f} MiB ({pct} %)", file=sys.stderr, flush=True)

    print(f"writing {args.out}: {args.shape} {shape}, {args.quant}, seed {args.seed}", file=sys.stderr)
    t0 = time.perf_counter()
    out = write_synthetic_gguf(
        Path(args.out), shape, args.quant, seed=args.seed, name=f"synthetic-{args.shape}", progress=progress
    )
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a small mesh on this machine, ask it one question through its REST API, stop it."""
    import asyncio  # lazy (see the module docstring): the client and testbed need asyncio and aiohttp

    from meshd.client.http import Client, Reply
    from meshd.lab.testbed import LoopbackMesh

    if args.single:
        print("meshd demo: single-device tree speculative decoding on the embedded model", file=sys.stderr)
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        argv = ["generate", args.question, "--mode", "spec", "--drafter", "ngram", "--max-tokens", str(args.max_tokens)]
        return cmd_generate(build_parser().parse_args(argv))

    print(
        f"meshd demo: starting {args.peers} daemons on 127.0.0.1 with the embedded SmolLM2-135M-Instruct; they "
        "find each other over mDNS and split its 30 layers ...",
        file=sys.stderr,
    )
    with (
        tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp,
        LoopbackMesh(Path(tmp), args.peers, dtype="auto", threads=max(1, (os.cpu_count() or 2) // args.peers)) as mesh,
    ):
        plan = mesh.wait_plan(
            list(range(args.peers)), args.peers, timeout=300, progress=lambda m: print(m, file=sys.stderr)
        )
        for s in plan["stages"]:
            print(f"  stage {s['node_id'][:8]}: layers {s['first_layer']}:{s['stop_layer']}", file=sys.stderr)
        # ask a peer that does not hold the first layers: it originates (drafts, verifies) while its own
        # slice sits in the middle or at the end of the ring, the case FlowSpec's fixed head device cannot do
        first = next(s["node_id"] for s in plan["stages"] if s["first_layer"] == 0)
        asked = next(i for i in reversed(range(args.peers)) if mesh.node_id(i) != first or args.peers == 1)
        print(
            f"asking peer {mesh.url(asked)} (node {mesh.node_id(asked)[:8]}, not the first stage: it drafts, "
            "the ring verifies, mode flow)\n",
            file=sys.stderr,
        )
        print(f"Q: {args.question}\nA: ", end="", flush=True)

        async def ask() -> Reply:
            reply = Reply()
            async with Client(mesh.url(asked), timeout=600) as c:
                async for text in c.stream_chat(
                    [{"role": "user", "content": args.question}],
                    reply,
                    max_tokens=args.max_tokens,
                    temperature=0,
                    mode="flow",
                ):
                    print(text, end="", flush=True)
            return reply

        st = asyncio.run(ask()).stats
        print(
            f"\n\n[flow over {args.peers} daemons] {st.get('new_tokens')} tokens in {st.get('seconds', 0):.2f}s "
            f"({st.get('tokens_per_s', 0):.1f} tok/s), {st.get('mean_accepted', 0):.2f} tokens per verification",
            file=sys.stderr,
        )
        print("stopping the daemons (SIGTERM) ...", file=sys.stderr)
    codes = [p.returncode for p in mesh.procs]
    print(f"stopped: exit codes {codes}", file=sys.stderr)
    return 0 if all(c == 0 for c in codes) else 1


def cmd_train_draft(args: argparse.Namespace) -> int:
    from training.stopping import StopRequest
    from training.train_draft import train_draft  # lazy: keeps `meshd --help` fast

    _threads(args.threads)
    stop = StopRequest()
    with stop.installed():
        train_draft(
            model=args.model,
            out=args.out,
            prompts=args.prompts,
            spec_bench=args.questions,
            tokens=args.tokens,
            epochs=args.epochs,
            seed=args.seed,
            work=args.work,
            dtype=args.dtype,
            weights=args.weights,
            slots=args.slots,
            max_new=args.max_new,
            vocab=args.vocab,
            steps=args.steps,
            lr=args.lr,
            batch_tokens=args.batch_tokens,
            eval_per_category=args.eval_per_category,
            generate_only=args.generate_only,
            write_prompts=args.write_prompts,
            prompt_count=args.prompt_count,
            tokens_file=args.tokens_file,
            train_tokens=args.train_tokens,
            init_head=args.init_head,
            time_budget=args.time_budget,
            command="meshd " + " ".join(sys.argv[1:]),
            stop=stop,
        )
    return stop.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from meshd.serve.daemon import serve  # lazy (see the module docstring): the daemon loads torch and aiohttp

    cfg = config.with_secret_files(config.load_config(args))
    logging.getLogger().setLevel(cfg.log_level.upper())
    device = shaping = None
    if args.emulate or args.link:
        from meshd.lab.emulate import DeviceEmulation, link_emulation  # lazy: only a benchmark run pays for it

        try:
            device = DeviceEmulation.parse(args.emulate) if args.emulate else None
            shaping = link_emulation(args.link)
        except ValueError as exc:
            print(f"meshd serve: error: {exc}", file=sys.stderr)
            return 2
    return serve(cfg, link_emulation=shaping, device=device)


def cmd_chat(args: argparse.Namespace) -> int:
    from meshd.client import commands  # lazy (see the module docstring): aiohttp

    return commands.cmd_chat(args)


def cmd_query(args: argparse.Namespace) -> int:
    from meshd.client import commands  # lazy (see the module docstring): aiohttp

    return commands.cmd_query(args)


def cmd_status(args: argparse.Namespace) -> int:
    from meshd.client import commands  # lazy (see the module docstring): aiohttp

    return commands.cmd_status(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshd", description="Serve one LLM from a mesh of small devices.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one request on this device")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_weights_arg(g)
    g.add_argument(
        "--mode",
        choices=sorted({*LOCAL_MODES, *MESH_MODES}),
        default="spec",
        help="spec (default): tree speculative decoding, every layer on this device; ar: no drafting; chunk, "
        "flow: spec as the mesh runs it, through --stages in-process stages (flow streams each tree through "
        "them, chunk verifies it once whole); spec with --stages > 1 runs as flow",
    )
    g.add_argument(
        "--stages",
        type=int,
        default=1,
        help="stages of the in-process ring that chunk, flow and, above 1, every mode run through",
    )
    g.add_argument(
        "--drafter",
        default="auto",
        help="auto (the EAGLE head for this model, yours from train-draft or the shipped one, with n-gram; else "
        "ngram) | eagle[:DIR] | eagle+ngram | ngram | model:PATH[@LAYERS]",
    )
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template")
    g.add_argument("--no-chat", dest="chat", action="store_false")
    g.add_argument("--json", action="store_true", help="print one JSON object with the text and statistics")
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("profile", help="measure this device's cost curve (forward time vs tokens)")
    _add_model_args(pr)
    pr.add_argument("--layers", default=None, help="slice as FIRST:LAST (default: the whole model)")
    pr.add_argument("--dtypes", default="fp32,bf16", help="comma-separated dtypes to measure")
    pr.add_argument(
        "--weights",
        default=None,
        help="comma-separated weight formats to compare instead of --dtypes, each with the activations it picks, "
        f"measured interleaved ({', '.join(WEIGHT_FORMATS)})",
    )
    pr.add_argument("--repeats", type=int, default=5)
    pr.add_argument(
        "--compare-transformers", action="store_true", help="also time transformers' forward with the same weights"
    )
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profile)

    b = sub.add_parser("bench", help="compare decoding modes on a question set, e.g. Spec-Bench (interleaved)")
    _add_model_args(b)
    _add_weights_arg(b)
    b.add_argument(
        "--backend",
        choices=["local", "inprocess", "daemons"],
        default="daemons",
        help="daemons: --stages real daemons on 127.0.0.1 (ar, chunk, flow, and the single-device "
        "baseline local:ar / local:spec in this process); inprocess: the mesh scheduler over --stages "
        "stages in this process; local: one device only (ar, spec:DRAFTER)",
    )
    b.add_argument(
        "--in-process", dest="backend", action="store_const", const="inprocess", help="same as --backend inprocess"
    )
    b.add_argument("--stages", type=int, default=2)
    b.add_argument(
        "--modes",
        default=None,
        help="comma-separated, first is the baseline (default: ar,spec:ngram locally, "
        "local:spec,ar,chunk,flow on daemons, ar,chunk,flow in process)",
    )
    b.add_argument("--link", default=None, help="emulated link for daemons, LATENCY/BANDWIDTH, e.g. 5ms/100mbit")
    b.add_argument(
        "--emulate",
        default=None,
        metavar="PROFILE[:xK]",
        help="daemons pace their work like a device profile (e.g. jetson-orin-7b:x4); records say 'emulated'",
    )
    b.add_argument(
        "--flow-slots",
        type=int,
        default=None,
        help="daemons keep this many segments per flow request in flight (default: the daemons' own, 0: sized "
        "from the ring's measured latency; 1: one tree per round, the scheduler before slots)",
    )
    b.add_argument(
        "--roles",
        default=None,
        metavar="ROLE,...",
        help="daemons: one role per daemon (both | stage | originator), e.g. both,stage,stage: peers that only "
        "serve stages make the planner take daemon 0's measured originator work off its layers (default: all both)",
    )
    b.add_argument(
        "--originator-stage",
        dest="originator_pin",  # records keep the stage the plan gave it (0-based) as originator_stage
        type=int,
        default=None,
        metavar="K",
        help="daemons: give daemon 0 (which takes the requests) the node id that puts it on stage K of the ring "
        "(1 = the first; default: where its random node id falls), so runs are comparable",
    )
    b.add_argument(
        "--wire-activations",
        default=None,
        choices=WIRE_ACTIVATIONS,
        help="daemons send hidden states so (default: the daemons' default, auto); " + WIRE_ACTIVATIONS_HELP,
    )
    b.add_argument(
        "--device-slowdown",
        type=float,
        default=1.0,
        help="daemons pad their compute to behave like a device this many times slower",
    )
    b.add_argument(
        "--drafter",
        default="auto",
        help="drafter of the mesh modes (daemons and inprocess) and of "
        "spec without a :DRAFTER suffix (auto: this model's head, yours or the shipped one, with n-gram, else ngram)",
    )
    b.add_argument("--questions", default=None, metavar="PATH", help=QUESTIONS_HELP)
    b.add_argument("--categories", nargs="*", default=None, help="category names (default: the first N)")
    b.add_argument("--n-categories", type=int, default=8)
    b.add_argument("--per-category", type=int, default=5)
    b.add_argument("--held-out", action="store_true", help="only question_id %% 4 == 0 (never trained on)")
    b.add_argument("--max-tokens", type=int, default=256)
    b.add_argument(
        "--temperature",
        default="0",
        help="comma-separated temperatures, e.g. 0,1: one run (and record) per temperature",
    )
    b.add_argument("--out", default="runs", help="directory for the JSON record and markdown table")
    b.add_argument(
        "--load",
        default=None,
        metavar="RATES",
        help="load test instead: comma-separated Poisson arrival rates (requests/s), daemons only",
    )
    b.add_argument("--requests", type=int, default=12, help="load test: requests per rate and mode")
    b.add_argument(
        "--originators",
        type=int,
        default=None,
        help="load test: spread requests over the first K daemons' APIs (default: all but --roles stage ones)",
    )
    b.set_defaults(func=cmd_bench)

    sm = sub.add_parser(
        "simulate",
        help="project the mesh onto devices we do not have (discrete-event simulator)",
        description="Questions (Spec-Bench or the everyday set) through the real scheduler and stage workers "
        "on a simulated clock; every figure printed is simulated. --threads defaults to 1 here.",
    )
    _add_model_args(sm)
    _add_weights_arg(sm)
    sm.add_argument("--stages", type=int, default=5)
    sm.add_argument(
        "--profile",
        default="jetson-orin-7b",
        help="jetson-orin-7b (an assumed projection profile) | this-device (measured, 1 thread) | FILE",
    )
    sm.add_argument("--link", default="1ms/150mbit", help="per-link LATENCY/BANDWIDTH, e.g. 1ms/150mbit, 0/inf")
    sm.add_argument(
        "--modes",
        default="ar,chunk,flow@1,flow",
        help="modes to compare; flow@N keeps N segments per request in flight (flow@1: one tree per round, "
        "the scheduler before slots; flow: slots from the ring's measured times); a ':redraft' suffix "
        "(flow:redraft) re-drafts flow's pools from the root instead of growing them level by level",
    )
    sm.add_argument("--prompts", type=int, default=10, help="questions, spread over the categories")
    sm.add_argument("--max-tokens", type=int, default=256)
    sm.add_argument("--drafter", default="auto", help="as for generate; acceptance is the real model's")
    sm.add_argument("--originator", default="0", help="stage whose device originates (meshd) or 'own' (FlowSpec)")
    sm.add_argument("--originators", type=int, default=1, help="originators, requests spread round robin")
    sm.add_argument(
        "--split",
        default="even",
        choices=SPLITS,
        help="layers per stage: even, or origin-aware (the planner's split when only the originators' devices "
        "originate: each takes its measured LM head and draft work off its share, as --role stage peers make it)",
    )
    sm.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: one request at a time)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--temperature", type=float, default=0.0)
    sm.add_argument(
        "--coalesce",
        action="store_true",
        help="stages merge a request's queued segments into one forward where their cost curve makes it cheap",
    )
    sm.add_argument(
        "--no-flow-backoff",
        action="store_true",
        help="flow drafts every tree, also where drafted trees yield fewer tokens a second than plain ones "
        "(as meshd serve --no-flow-backoff: to measure a drafter's acceptance)",
    )
    sm.add_argument(
        "--no-idle-drafting",
        action="store_true",
        help="draft every level before a flow round's first segment leaves (the scheduler before idle drafting)",
    )
    sm.add_argument(
        "--wire-activations",
        default="auto",
        choices=WIRE_ACTIVATIONS,
        help="each stage's link sends hidden states so, as a daemon's would (default auto: int8 where the "
        "profile's fp16 rows take a real share of a hop); " + WIRE_ACTIVATIONS_HELP,
    )
    sm.add_argument("--compute-scale", type=float, default=1.0, help="device slowdown factor on all compute")
    sm.add_argument("--cores", type=int, default=None, help="CPU cores shared by all devices (default: one each)")
    sm.add_argument("--questions", default=None, metavar="PATH", help=QUESTIONS_HELP)
    sm.add_argument(
        "--calibrate-with",
        nargs="+",
        default=None,
        metavar="FILE",
        help="measured loopback results (JSON, e.g. runs/bench-*.json): simulated vs measured tokens/s",
    )
    sm.add_argument(
        "--fit-scale",
        default="ar",
        metavar="MODE",
        help="calibration: fit one compute-cost factor on MODE of every record ('none': no fit)",
    )
    sm.add_argument(
        "--fit-hop",
        action="store_true",
        help="calibration: with --fit-scale, also fit a per-message daemon overhead (needs records of "
        "two or more stage counts on unshaped links)",
    )
    sm.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="calibration: simulate each record sampled at T > 0 with N seeds (--seed, --seed + 1, ...) and "
        "compare by their mean; the table shows their range (greedy records run once). `meshd bench` seeds "
        "every request with 0, the default --seed, so one seed simulates the record's own answers",
    )
    sm.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    sm.add_argument("--out", default=None, help="also write the JSON record here")
    sm.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plot", help="PNG plots from bench / simulate / load records (needs matplotlib)")
    pl.add_argument("records", nargs="+", help="JSON records: runs/bench-*.json, meshd simulate --out files")
    pl.add_argument("--out", default="docs/results", help="directory for the PNG files")
    pl.set_defaults(func=cmd_plot)

    t = sub.add_parser("train-draft", help="self-distil an EAGLE draft head for a target model (resumable)")
    t.add_argument("--model", default="default", help="the target: GGUF file, HF safetensors dir, or 'default'")
    t.add_argument(
        "--out",
        default=None,
        help="directory for the head (eagle.json, head.safetensors, report); default: your heads directory "
        "($XDG_CACHE_HOME/meshd/heads/MODEL-FINGERPRINT), where --drafter auto finds it for this model",
    )
    t.add_argument(
        "--time-budget",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="wall-clock limit for the whole run, e.g. 90s, 30m, 2h: generation stops at 60%% (keeping what it "
        "made), training runs until the last 10%% (annealed to fit), the held-out report gets the rest or is "
        "skipped; default: no limit",
    )
    t.add_argument(
        "--prompts",
        action="append",
        default=[],
        help="extra prompt file (JSONL or one per line); the project's models/heads/prompts/*.jsonl are always used",
    )
    t.add_argument(
        "--questions",
        default=None,
        metavar="PATH",
        help="Spec-Bench question file: its questions with question_id %% 4 != 0 are trained on too, the rest "
        "give the held-out figures of the report (default: $MESHD_SPEC_BENCH; without it: the project's "
        "prompts only, no held-out evaluation)",
    )
    t.add_argument("--tokens", type=int, default=200_000, help="self-distilled answer tokens to generate")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--work", default=None, help="data and checkpoints (default ~/.cache/meshd/train-draft/FP)")
    t.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="target dtype")
    t.add_argument(
        "--weights",
        default=None,
        choices=WEIGHT_FORMATS,
        help="how the target's weights are held while it makes the head's features (default: dense in --dtype; "
        "auto: what serve picks on this device); int4a8 features made no better head for the embedded model, "
        "but prefill faster where dense bf16 is slow (docs/draft-head.md)",
    )
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--slots", type=int, default=48, help="sequences generated together")
    t.add_argument("--max-new", type=int, default=256, help="answer length limit while generating data")
    t.add_argument(
        "--vocab",
        type=int,
        default=8192,
        help="draft vocabulary size (0: the full vocabulary); with --init-head, a size larger than that head's "
        "widens its vocabulary by the data's most frequent tokens (no retraining needed; --epochs 0 writes it as is)",
    )
    t.add_argument("--steps", type=int, default=3, help="training-time unroll depth")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per training batch")
    t.add_argument("--eval-per-category", type=int, default=3, help="held-out questions per category in the report")
    t.add_argument("--generate-only", action="store_true", help="stop after generating the data")
    t.add_argument(
        "--write-prompts",
        default=None,
        metavar="PATH",
        help="write a new prompt file instead of training: templates, questions the target writes itself, and "
        "follow-up turns on answers already in the work dir's data; none close to an evaluation prompt",
    )
    t.add_argument("--prompt-count", type=int, default=6000, help="prompts --write-prompts makes")
    t.add_argument(
        "--tokens-file",
        default=None,
        metavar="PATH",
        help="keep the generated answers' token ids here (about 1 MB a million tokens; features are recomputed "
        "by prefill): read first if it exists, rewritten after generation; default: read the project's "
        "models/heads/rollouts/FINGERPRINT.npz for this model when there is one",
    )
    t.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="train on the first stored answers up to this many tokens (for data-size curves); default: all",
    )
    t.add_argument(
        "--init-head",
        default=None,
        metavar="DIR",
        help="start from this head's weights and draft vocabulary instead of a fresh head: more epochs, or more "
        "data, on top of a head already trained; use a lower --lr (e.g. 3e-4)",
    )
    t.set_defaults(func=cmd_train_draft)

    mm = sub.add_parser(
        "make-model",
        help="write a synthetic Llama-shaped GGUF with random quantized weights (memory checks at real scale)",
        description="Random weights of a real model's shape, quantized with gguf-py, with the embedded model's "
        "tokenizer: meshd serves it like any GGUF, and its text is noise. Deterministic for a seed.",
    )
    mm.add_argument(
        "--shape",
        default="llama-1b",
        choices=["llama-1b", "tiny"],
        help="llama-1b: TinyLlama-1.1B's layers (22 x 2048, 32 heads, 4 KV heads, FFN 5632, untied LM head) with "
        "the 49,152-token SmolLM2 vocabulary, 1.17B parameters; tiny: the same in miniature (tests)",
    )
    mm.add_argument("--quant", default="Q4_1", choices=["Q4_0", "Q4_1", "Q8_0"], help="GGUF type of every matrix")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--out", required=True, metavar="PATH", help="the .gguf file to write")
    mm.set_defaults(func=cmd_make_model)

    d = sub.add_parser("demo", help="answer one question with the embedded model")
    d.add_argument("question", nargs="?", default=DEMO_QUESTION)
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--peers", type=int, default=3, help="daemons in the demo mesh")
    d.add_argument("--single", action="store_true", help="skip the mesh: the single-device engine only")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "serve",
        help="run the daemon: join the mesh, serve the REST API",
        description="Settings come from flags, then MESHD_* environment variables, then the TOML "
        "file (--config), then defaults.",
    )
    config.add_arguments(s)
    s.add_argument(
        "--emulate",
        default=None,
        metavar="PROFILE[:xK]",
        help="benchmarks: pace forwards, LM head and drafting like a device profile (jetson-orin-7b or a "
        "profile file), K times slower; overruns are counted in /mesh",
    )
    s.add_argument(
        "--link", default=None, help="benchmarks: shape outgoing links as LATENCY/BANDWIDTH, e.g. 1ms/150mbit"
    )
    s.set_defaults(func=cmd_serve)
    _add_client_commands(sub)
    return p


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    """``chat``, ``query`` and ``status``: clients of a running daemon's REST API (``meshd.client``)."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--peer",
            default=None,
            metavar="URL",
            help="daemon to talk to (default: $MESHD_PEER, else host and port from meshd serve's settings: "
            f"--config, MESHD_HOST/MESHD_PORT; else {DEFAULT_PEER})",
        )
        p.add_argument(
            "--api-key",
            default=None,
            help="bearer token if the daemon has one (default: api_key from meshd serve's settings: "
            "$MESHD_API_KEY, the config file)",
        )
        p.add_argument(
            "--config",
            default=None,
            metavar="PATH",
            help="meshd serve's TOML file (default: $MESHD_CONFIG, else $XDG_CONFIG_HOME/meshd/meshd.toml if it "
            "exists)",
        )

    c = sub.add_parser("chat", help="chat with the mesh in the terminal (streaming, multi-turn)")
    common(c)
    c.add_argument("--mode", choices=MESH_MODES, default=MESH_DEFAULT, help=MESH_MODE_HELP)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-tokens", type=int, default=None, help="per reply (default: the daemon's)")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=cmd_chat)

    q = sub.add_parser("query", help="ask the mesh one question and print the answer")
    q.add_argument("prompt")
    common(q)
    q.add_argument("--mode", choices=MESH_MODES, default=MESH_DEFAULT, help=MESH_MODE_HELP)
    q.add_argument("--max-tokens", type=int, default=128)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--top-p", type=float, default=None)
    q.add_argument("--seed", type=int, default=None)
    q.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: text, token_ids, new_tokens, rounds, mean_accepted, seconds, "
        "tokens_per_s (as `meshd generate --json`)",
    )
    q.set_defaults(func=cmd_query)

    st = sub.add_parser("status", help="show the mesh, its plan and each peer's layers and health")
    common(st)
    st.add_argument("--json", action="store_true", help="print the daemon's GET /mesh JSON")
    st.set_defaults(func=cmd_status)


# Commands that load a model in this process: they say so before their imports (torch, the model code),
# which take seconds of their own on a small or busy device; their own progress lines follow.
LOADS_A_MODEL = ("generate", "profile", "bench", "simulate")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(max(logging.DEBUG, logging.WARNING - 10 * args.verbose))
    if args.command in LOADS_A_MODEL:
        print(f"meshd {args.command}: starting (model {args.model}) ...", file=sys.stderr, flush=True)
    try:
        return args.func(args)
    except (ModelError, ValueError) as e:
        print(f"meshd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
