"""The ``meshd`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DEMO_QUESTION = "What are three good reasons to learn a second language? Answer briefly."


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def _load_target(model: str, dtype: str):
    from models.source import ModelSource
    from models.stage import Stage

    src = ModelSource.resolve(model)
    return src, Stage.load(src, dtype=dtype)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="GGUF file, HF safetensors dir, or 'default' (embedded)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype (auto: bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA, else fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def cmd_generate(args: argparse.Namespace) -> int:
    from models.budget import CostCurve, TreeBudget
    from models.drafters import load_drafter
    from models.engine import generate
    from models.profile import stage_cost_curve
    from models.text import decode, encode_prompt, has_chat_template, stop_ids
    from models.verify import Sampling

    _threads(args.threads)
    t0 = time.perf_counter()
    src, target = _load_target(args.model, args.dtype)
    tok = src.load_tokenizer()
    chat = has_chat_template(tok) if args.chat is None else args.chat
    prompt = encode_prompt(tok, args.prompt, chat)
    drafter = load_drafter(args.drafter, target) if args.mode == "spec" else None
    curve = stage_cost_curve(src, target, with_head=True) if args.mode == "spec" else None
    load_s = time.perf_counter() - t0
    streamed: list[int] = []
    printed = ""

    def on_tokens(new: list[int]) -> None:
        nonlocal printed
        if args.json:
            return
        streamed.extend(new)
        text = decode(tok, streamed)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    res = generate(target, prompt, max_new_tokens=args.max_tokens, mode=args.mode, drafter=drafter,
                   sampling=Sampling(args.temperature, args.top_p), seed=args.seed, eos_ids=stop_ids(tok, target.cfg),
                   budget=TreeBudget(CostCurve(curve)) if curve else None, on_tokens=on_tokens)
    st = res.stats
    if args.json:
        out = {
            "text": decode(tok, res.token_ids), "token_ids": res.token_ids, "new_tokens": st.new_tokens,
            "rounds": st.rounds, "mean_accepted": round(st.mean_accepted, 4), "target_forwards": st.target_forwards,
            "seconds": round(st.seconds, 4), "tokens_per_s": round(st.tokens_per_s, 3),
            "finish_reason": res.finish_reason, "mode": args.mode, "drafter": drafter.name if drafter else None,
            "dtype": str(target.dtype).removeprefix("torch."), "prompt_tokens": len(prompt),
            "prefill_seconds": round(st.prefill_seconds, 4), "draft_seconds": round(st.draft_seconds, 4),
            "verified_nodes": st.verified_nodes, "load_seconds": round(load_s, 3),
            "cost_curve_ms": {t: round(s * 1e3, 3) for t, s in curve.items()} if curve else None,
        }
        print(json.dumps(out))
    else:
        print()
        print(f"[{args.mode}{'/' + drafter.name if drafter else ''}] {st.new_tokens} tokens in {st.seconds:.2f}s "
              f"({st.tokens_per_s:.1f} tok/s), {st.rounds} rounds, {st.mean_accepted:.2f} tokens/round, "
              f"{st.target_forwards} target forwards", file=sys.stderr)
    return 0


def _parse_layers(spec: str | None, n: int) -> tuple[int, int]:
    if not spec:
        return 0, n
    a, _, b = spec.partition(":")
    return int(a or 0), int(b or n)


def cmd_profile(args: argparse.Namespace) -> int:
    from models.profile import SIZES, stage_cost_curve, transformers_cost_curve
    from models.source import ModelSource
    from models.stage import Stage

    _threads(args.threads)
    src = ModelSource.resolve(args.model)
    first, last = _parse_layers(args.layers, src.config.n_layers)
    report = {"model": str(src.path), "layers": [first, last], "threads": int(os.environ.get("OMP_NUM_THREADS", 0))
              or None, "curves_ms": {}}
    import torch

    report["threads"] = torch.get_num_threads()
    for dt in args.dtypes.split(","):
        head = first == 0 and last == src.config.n_layers
        stage = Stage.load(src, first, last, head=head, dtype=dt)
        print(f"measuring {dt} layers [{first}, {last}) ...", file=sys.stderr)
        ours = stage_cost_curve(src, stage, with_head=head, refresh=True, repeats=args.repeats)
        report["curves_ms"][f"meshd-{dt}"] = {t: round(s * 1e3, 2) for t, s in ours.items()}
        if args.compare_transformers:
            if not head:
                print("--compare-transformers needs the whole model; skipping it for a slice", file=sys.stderr)
            else:
                ref = transformers_cost_curve(stage, repeats=args.repeats)
                report["curves_ms"][f"transformers-{dt}"] = {t: round(s * 1e3, 2) for t, s in ref.items()}
        del stage
    if args.json:
        print(json.dumps(report))
    else:
        names = list(report["curves_ms"])
        print(f"forward time (ms) over T new tokens after 128 cached, layers [{first}, {last}), "
              f"{report['threads']} threads")
        print("T".rjust(4) + "".join(n.rjust(20) for n in names))
        for t in SIZES:
            print(str(t).rjust(4) + "".join(f"{report['curves_ms'][n][t]:20.1f}" for n in names))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    print("meshd demo: single-device tree speculative decoding on the embedded SmolLM2-135M-Instruct",
          file=sys.stderr)
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    return cmd_generate(argparse.Namespace(
        prompt=args.question, model="default", dtype="auto", threads=None, mode="spec", drafter="ngram",
        max_tokens=args.max_tokens, temperature=0.0, top_p=1.0, seed=None, chat=None, json=False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshd", description="Serve one LLM from a mesh of small devices.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one request on this device")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--mode", choices=["ar", "spec"], default="spec")
    g.add_argument("--drafter", default="ngram", help="ngram | model:PATH[@LAYERS]")
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
    pr.add_argument("--repeats", type=int, default=5)
    pr.add_argument("--compare-transformers", action="store_true",
                    help="also time transformers' forward with the same weights")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profile)

    d = sub.add_parser("demo", help="answer one question with the embedded model")
    d.add_argument("question", nargs="?", default=DEMO_QUESTION)
    d.add_argument("--max-tokens", type=int, default=96)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(asctime)s %(name)s: %(message)s")
    from models.config import ModelError

    try:
        return args.func(args)
    except (ModelError, ValueError) as e:
        print(f"meshd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
