"""How far each wire encoding of hidden states moves the model's answers: teacher-forced, against no cut.

    PYTHONPATH=. python tools/issue11/wire_quality.py --questions PATH [--prompts 6] [--stages 5] [--tokens 48]

The whole model runs each prompt plus its greedy continuation (``--tokens``, from the uncut model) with
its hidden states cut at the ``--stages - 1`` boundaries of an even layer split and carried as:
fp16 (the float wire), int8 with one scale per row (protocol versions 4-6, recomputed here for the
comparison) and int8 with one scale per 32 values (``peers.codec.QuantizedRows``, version 7). Per
encoding: how often its next-token argmax agrees with the uncut model's over the continuation's
positions, and the mean KL divergence of its next-token distribution from the uncut one. One
process, one thread: a measurement of numerics, not of speed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from meshd.lab.bench import spread_over_categories
from meshd.serve.loading import load_layers
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.text import encode_messages
from peers.codec import QuantizedRows
from training.prompts import load_questions


def per_row_int8(x: torch.Tensor) -> torch.Tensor:
    """Versions 4-6 of the wire: one symmetric scale per row (``max|row| / 127``), received in fp32."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127.0
    return torch.round(xf / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-127, 127) * scale


ENCODINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp16": lambda x: x.half(),
    "int8 per row (v4-6)": per_row_int8,
    "int8 per 32 values (v7)": lambda x: QuantizedRows.quantize(x).dequantize(),
}


def logits(full: Stage, stages: list[Stage], ids: list[int], carry: Callable | None) -> torch.Tensor:
    x = full.embed(torch.tensor(ids))
    for i, st in enumerate(stages):
        x = st.forward_one(x, st.new_cache(len(ids) + 8), torch.arange(len(ids)))
        if carry is not None and i < len(stages) - 1:
            x = carry(x).to(full.dtype)
    return full.logits(x).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", required=True, help="Spec-Bench question.jsonl, or another file of its shape")
    ap.add_argument("--prompts", type=int, default=6, help="spread over the file's categories")
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48, help="greedy continuation scored per prompt")
    ap.add_argument("--held-out", action="store_true", help="only question_id %% 4 == 0")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = ModelSource.resolve(args.model)
    n = src.config.n_layers
    full = load_layers(src, LayerRange.whole(n), "auto", None, "loading", vocab=True)
    tok = src.load_tokenizer()
    stages = [full.slice(r) for r in LayerRange.split(n, args.stages)]
    qs = load_questions(Path(args.questions), None, per_category=max(1, args.prompts), held_out_only=args.held_out)
    qs = spread_over_categories(qs, args.prompts)
    totals = {k: [0, 0, 0.0] for k in ENCODINGS}
    cuts = f"{args.stages} stages: {args.stages - 1} cuts, {args.tokens} tokens each"
    print(f"{src.name} ({str(full.dtype)[6:]}), {cuts}")
    for q in qs:
        ids = encode_messages(tok, [{"role": "user", "content": q["turns"][0]}])
        start = len(ids) - 1
        for _ in range(args.tokens):
            ids.append(int(logits(full, stages, ids, None)[-1].argmax()))
        ref = logits(full, stages, ids, None)[start:-1]
        for name, carry in ENCODINGS.items():
            got = logits(full, stages, ids, carry)[start:-1]
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
            t = totals[name]
            t[0] += int((got.argmax(-1) == ref.argmax(-1)).sum())
            t[1] += ref.shape[0]
            t[2] += float(kl)
        print(f"q{q['question_id']} {q['category']}: done", flush=True)
    print("| encoding | bytes per row | top-1 agreement with the uncut model | mean KL (nats) |")
    print("|---|---|---|---|")
    h = full.cfg.hidden_size
    row_bytes = {"fp16": 2 * h, "int8 per row (v4-6)": h + 4, "int8 per 32 values (v7)": QuantizedRows.row_bytes(h)}
    for name, (agree, total, kl) in totals.items():
        print(f"| {name} | {row_bytes[name]} | {agree}/{total} ({100 * agree / total:.1f} %) | {kl / total:.4f} |")


if __name__ == "__main__":
    main()
