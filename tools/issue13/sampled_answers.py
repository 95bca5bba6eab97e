"""Issue 13 at T=1: sampled answers as draft-head training data, mixed with the shipped greedy ones.

The shipped head learned from greedy answers only; at T > 0 it drafts after sampled text. This answers a
random subset of the training prompts (``training.prompts.training_prompts``: never an evaluation prompt)
at ``--temperature``, then writes a token file that ``meshd train-draft --tokens-file`` reads: those answers
(keys prefixed ``t1:``) shuffled together with ``--greedy-tokens`` answer tokens drawn at random from the
shipped file. Measured (docs/draft-head.md, "Sampled answers as training data"): a warm epoch on 440k
greedy + 219k sampled tokens lifted coupled T=1 replay by 1.7-2.0 %; over a draft vocabulary widened to
32,768 first, by 5.7-7.0 %, and that head ships (its mix is kept as
``models/heads/rollouts/14ffa64eac0329cb-sampled-mix.npz``; "A wider draft vocabulary").

    PYTHONPATH=. python tools/issue13/sampled_answers.py --questions $MESHD_SPEC_BENCH --out mix.npz \\
        --tokens 220000 --greedy-tokens 440000
    meshd train-draft --work W --out H --tokens 1 --epochs 1 --batch-tokens 2048 --eval-per-category 0 \\
        --init-head models/heads/smollm2-135m-instruct --lr 3e-4 --seed 6 --threads 2 --tokens-file mix.npz
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.source import ModelSource
from models.stage import Stage
from models.text import encode_messages, stop_ids
from training.prompts import training_prompts
from training.rollouts import TOKENS_FORMAT, batch_generate
from training.train_draft import shipped_tokens


def read_tokens(path: Path) -> list[tuple[str, np.ndarray, int]]:
    """(key, prompt + answer ids, prompt length) of every sequence in a ``train-draft`` token file."""
    with np.load(path) as z:
        toks, lens, plens = z["tokens"].astype(np.int64), z["lens"].tolist(), z["prompt_lens"].tolist()
        keys = json.loads(str(z["keys"]))
    starts = np.cumsum([0, *lens])
    return [(keys[i], toks[starts[i] : starts[i + 1]], plens[i]) for i in range(len(keys))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=Path, default=None, help="Spec-Bench file: its training split is answered too")
    p.add_argument("--out", type=Path, required=True, help="the token file to write")
    p.add_argument("--tokens", type=int, default=220_000, help="sampled answer tokens to make (about)")
    p.add_argument("--greedy-tokens", type=int, default=440_000, help="shipped greedy answer tokens mixed in")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--slots", type=int, default=128)
    p.add_argument("--group", type=int, default=384, help="prompts answered per batch (progress after each)")
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    src = ModelSource.resolve("default")
    shipped = shipped_tokens(src.fingerprint)
    if shipped is None or not shipped.is_file():
        sys.exit(f"no shipped token file for {src.name}: nothing to mix the sampled answers with")
    stage = Stage.load(src, dtype="bf16")  # the numerics train-draft's features come from on this CPU
    tok = src.load_tokenizer()
    eos = stop_ids(tok, stage.cfg)
    prompts = training_prompts((), a.questions)
    random.Random(a.seed).shuffle(prompts)
    rows: list[tuple[str, np.ndarray, int]] = []
    made, t0 = 0, time.time()
    for start in range(0, len(prompts), a.group):
        group = []
        for key, text in prompts[start : start + a.group]:
            ids = encode_messages(tok, [{"role": "user", "content": text}] if isinstance(text, str) else text)
            if len(ids) <= 1024:
                group.append((key, ids))
        group.sort(key=lambda kp: len(kp[1]))  # similar lengths share a padded width
        for r in batch_generate(
            stage, group, max_new=a.max_new, slots=a.slots, temperature=a.temperature, seed=a.seed + start, eos=eos
        ):
            rows.append(("t1:" + r.key, np.array(r.tokens), r.prompt_len))
            made += len(r.tokens) - r.prompt_len
        print(f"{time.time() - t0:.0f} s: {len(rows)} sampled answers, {made} tokens", flush=True)
        if made >= a.tokens:
            break
    greedy = read_tokens(shipped)
    random.Random(a.seed + 1).shuffle(greedy)
    picked, n = [], 0
    for r in greedy:
        if n >= a.greedy_tokens:
            break
        picked.append(r)
        n += len(r[1]) - r[2]
    mixed = picked + rows
    random.Random(a.seed + 2).shuffle(mixed)
    ids = np.concatenate([r[1] for r in mixed])
    np.savez_compressed(
        a.out,
        tokens=ids.astype(np.uint16 if int(ids.max()) < 2**16 else np.uint32),
        lens=np.array([len(r[1]) for r in mixed], dtype=np.int32),
        prompt_lens=np.array([r[2] for r in mixed], dtype=np.int32),
        keys=np.array(json.dumps([r[0] for r in mixed])),
        meta=np.array(json.dumps({"fingerprint": src.fingerprint, "max_new": a.max_new, "format": TOKENS_FORMAT})),
    )
    print(f"wrote {a.out}: {len(picked)} greedy answers ({n} tokens) and {len(rows)} sampled ({made} tokens)")


if __name__ == "__main__":
    main()
