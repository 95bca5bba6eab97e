"""Peak memory of real processes: one model load per process, and a 3-daemon mesh whose every
``--memory`` is below what the whole model needs.

``python -m meshd.lab.memory --model FILE`` (FILE e.g. from ``meshd make-model``) prints, per weight
format, the peak RSS (``VmHWM``) of a process holding the whole model and of one holding a 10-layer
slice, each after one 8-row forward; then starts three loopback daemons (``meshd.lab.testbed``), waits
for their plan, sends one greedy request and compares its tokens with a single-process greedy run of
the same file in the same format, and reports each daemon's peak RSS next to its ``--memory``.
Every figure comes from a separate process, so one measurement's heap never inflates another's.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from meshd.config import Config
from meshd.lab.testbed import LoopbackMesh, http
from meshd.serve.daemon import model_shape
from models.engine import generate
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.text import encode_prompt, stop_ids
from peers.sizes import format_size, parse_size

PROMPT = "The three most useful things to know about memory are"
MiB = 2**20


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """Peak and current resident bytes of process ``pid`` (``VmHWM``, ``VmRSS`` of /proc/PID/status), and
    the current split of the latter: ``RssAnon`` (heap: weights, buffers) and ``RssFile`` (clean mapped pages:
    libraries and the model file, which the kernel drops under pressure)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out


def probe(model: str, weights: str, layers: str | None, vocab: bool, tokens: int, prompt: str) -> dict:
    """In this process: load ``layers`` (and the vocabulary ends) as ``weights``, then either one 8-row
    forward (``tokens`` 0) or a greedy ``ar`` generation of ``tokens`` tokens (the reference output);
    what it held and its peak RSS."""
    torch.set_num_threads(1)
    src = ModelSource.resolve(model)
    span = LayerRange.parse(layers, src.config.n_layers)
    t0 = time.perf_counter()
    stage = Stage.load(src, span, vocab=vocab, weights=weights, dtype="auto")
    out = {"weights": weights, "held": stage.kernels, "layers": [span.first, span.stop], "vocab": vocab}
    out["load_s"] = round(time.perf_counter() - t0, 1)
    if tokens:
        tok = src.load_tokenizer()
        gen = generate(
            stage,
            encode_prompt(tok, prompt, chat=False),
            max_new_tokens=tokens,
            mode="ar",
            eos_ids=stop_ids(tok, src.config),
        )
        out["token_ids"] = list(gen.token_ids)
    else:
        x = torch.randn(8, src.config.hidden_size)
        stage.forward_one(x, stage.new_cache(16), torch.arange(8))
    return {**out, "weight_bytes": stage.nbytes(), **proc_memory()}


def in_child(model: str, weights: str, layers: str | None, vocab: bool, tokens: int = 0, prompt: str = PROMPT) -> dict:
    """:func:`probe` in a fresh Python process, so its peak is its own."""
    cmd = [sys.executable, "-m", "meshd.lab.memory", "--model", model, "probe", "--weights", weights]
    cmd += ["--layers", layers or ":", "--tokens", str(tokens), "--prompt", prompt] + (["--vocab"] if vocab else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def whole_model_need(model: str, weights: str, context: int, dtype: str = "auto") -> tuple[int, int, int]:
    """(bytes the whole model needs on one peer by the planner's count, fixed bytes every peer
    spends first, bytes per layer with its KV reservation) for ``weights`` in ``dtype`` at ``context`` tokens."""
    src = ModelSource.resolve(model)
    vocab = Stage.load(src, LayerRange(0, 0), vocab=True, weights=weights, dtype=dtype)
    shape = model_shape(src, vocab, context)
    return (
        shape.fixed_bytes + shape.n_layers * shape.bytes_per_stage_layer,
        shape.fixed_bytes,
        shape.bytes_per_stage_layer,
    )


def mesh_run(
    model: str, weights: str, memory: int, tokens: int, prompt: str, mode: str, workdir: Path, timeout: float
) -> dict:
    """Three loopback daemons with ``--memory memory`` each: their plan, one greedy request's tokens,
    and each daemon's peak and current RSS after it."""
    extra = ["--weights", weights, "--memory", f"{memory // MiB}MiB"]
    with LoopbackMesh(workdir, 3, mdns=False, model=model, dtype="auto", threads=1, extra=extra) as mesh:
        t0 = time.monotonic()
        plan = mesh.wait_plan([0, 1, 2], 3, timeout, progress=lambda s: print(s, file=sys.stderr, flush=True))
        ready_s = time.monotonic() - t0
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "mode": mode}
        code, reply = http("POST", mesh.url(0) + "/v1/completions", body, timeout=timeout)
        if code != 200:
            raise RuntimeError(f"the mesh answered {code}: {reply}")
        ids = {mesh.node_id(i): i for i in range(3)}
        stages = [(ids[s["node_id"]], [s["first_layer"], s["stop_layer"]]) for s in plan["stages"]]
        rss = [proc_memory(p.pid) for p in mesh.procs]
    return {"plan": stages, "ready_s": round(ready_s), "reply": reply, "daemons": rss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="GGUF file (e.g. from `meshd make-model`)")
    sub = p.add_subparsers(dest="what")
    pr = sub.add_parser("probe", help="one measurement in this process (what the report runs in children)")
    pr.add_argument("--weights", required=True)
    pr.add_argument("--layers", default=":")
    pr.add_argument("--vocab", action="store_true")
    pr.add_argument("--tokens", type=int, default=0)
    pr.add_argument("--prompt", default=PROMPT)
    p.add_argument("--formats", default="native,int8,bf16", help="weight formats of the load table ('' skips it)")
    p.add_argument("--slice", default="0:10", help="the slice of the load table")
    p.add_argument("--mesh-weights", default="native", help="the mesh's weight format ('' skips the mesh)")
    p.add_argument(
        "--memory",
        default=None,
        help="each daemon's --memory (default: its fixed share + one layer more than a third of the layers)",
    )
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens of the mesh request and the reference")
    p.add_argument("--mode", default="flow", help="the mesh request's mode")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.what == "probe":
        print(json.dumps(probe(args.model, args.weights, args.layers, args.vocab, args.tokens, args.prompt)))
        return 0

    size = Path(args.model).stat().st_size
    report: dict = {"model": args.model, "file_bytes": size, "loads": []}
    print(f"{args.model}: {size / MiB:.1f} MiB", flush=True)
    print(
        "| format | whole model: peak / RSS (anon) / weights, MiB | slice "
        + args.slice
        + ": peak / RSS (anon) / weights |"
    )
    print("|---|---|---|")
    for w in filter(None, args.formats.split(",")):
        rows = [in_child(args.model, w, None, True), in_child(args.model, w, args.slice, False)]
        report["loads"] += rows
        cells = [
            f"{r['VmHWM'] / MiB:.0f} / {r['VmRSS'] / MiB:.0f} ({r['RssAnon'] / MiB:.0f})"
            f" / {r['weight_bytes'] / MiB:.0f}"
            for r in rows
        ]
        print(f"| {w} ({rows[0]['held']}) | {cells[0]} | {cells[1]} |", flush=True)

    if args.mesh_weights:
        w = args.mesh_weights
        context = Config().max_context
        need, fixed, per_layer = whole_model_need(args.model, w, context)
        n_layers = ModelSource.resolve(args.model).config.n_layers
        memory = parse_size(args.memory) if args.memory else fixed + (math.ceil(n_layers / 3) + 1) * per_layer
        memory = -(-memory // MiB) * MiB
        print(
            f"\nmesh, --weights {w}: the whole model needs {format_size(need)} by the planner's count "
            f"({format_size(fixed)} fixed + {n_layers} x {format_size(per_layer)}); each daemon --memory "
            f"{format_size(memory)}",
            flush=True,
        )
        if memory >= need:
            print("  (that is not below the whole model's need: the check proves nothing)", flush=True)
        ref = in_child(args.model, w, None, True, args.tokens)
        print(f"single process, {w}, ar: {ref['token_ids']} (peak RSS {ref['VmHWM'] / MiB:.0f} MiB)", flush=True)
        with tempfile.TemporaryDirectory(prefix="meshd-memory-") as tmp:
            run = mesh_run(args.model, w, memory, args.tokens, PROMPT, args.mode, Path(tmp), args.timeout)
        got = run["reply"]["meshd"]["token_ids"]
        same = got == ref["token_ids"]
        print(f"mesh ({args.mode}): {got} -> {'the same tokens' if same else 'DIFFERENT tokens'}", flush=True)
        print("| daemon | layers | --memory | peak RSS | RSS after (anon + file) |")
        print("|---|---|---|---|---|")
        for i, layers in run["plan"]:
            d = run["daemons"][i]
            print(
                f"| {i} | {layers[0]}:{layers[1]} | {memory / MiB:.0f} MiB | {d['VmHWM'] / MiB:.0f} MiB "
                f"| {d['VmRSS'] / MiB:.0f} MiB ({d['RssAnon'] / MiB:.0f} + {d['RssFile'] / MiB:.0f}) |"
            )
        report["mesh"] = {
            **run,
            "weights": w,
            "memory": memory,
            "need": need,
            "reference": ref,
            "same_tokens": same,
        }
        if not same:
            print("the mesh's tokens differ from the single process's", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if not args.mesh_weights or report["mesh"]["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
