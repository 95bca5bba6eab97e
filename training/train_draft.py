"""``meshd train-draft``: self-distil an EAGLE draft head for a target, in three resumable phases.

1. generate: the target answers the training prompts (:mod:`training.prompts`), every position's
   post-norm feature recorded (:mod:`training.rollouts`);
2. train: :func:`training.train.train_head` on the stored rollouts;
3. evaluate: held-out acceptance by exact replay (:mod:`training.evaluate`), when a Spec-Bench
   question file is given (its held-out split is the only evaluation set that is never trained on).

The head, its ``eagle.json`` and a ``report.json`` (data, loss curve, held-out figures) go to ``out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from models.drafters import NGramDrafter
from models.eagle import EagleDrafter, EagleHead, HeadConfig, load_head, save_head
from models.source import ModelSource
from models.stage import Stage
from models.text import stop_ids
from training.evaluate import evaluate_acceptance, held_out_cache, held_out_rollouts
from training.log import log
from training.prompts import SPEC_BENCH_ENV, held_out_questions, read_spec_bench, spec_bench_path, training_prompts
from training.rollouts import DataStore, generate_data, work_dir
from training.train import TrainConfig, choose_vocab, train_head


def train_draft(
    *,
    model: str = "default",
    out: str | Path,
    prompts: Sequence[str] = (),
    spec_bench: str | Path | None = None,
    tokens: int = 200_000,
    epochs: int = 3,
    seed: int = 0,
    work: str | Path | None = None,
    slots: int = 48,
    max_new: int = 256,
    dtype: str = "auto",
    vocab: int = 8192,
    steps: int = 3,
    lr: float = 1e-3,
    eval_per_category: int = 3,
    eval_tokens: int = 128,
    batch_tokens: int = 4096,
    max_len: int = 1024,
    generate_only: bool = False,
    command: str | None = None,
) -> dict:
    """Generate (resumable), train (resumable), evaluate, write the head + report.

    ``spec_bench``: Spec-Bench's question file (default ``$MESHD_SPEC_BENCH``); without one, training
    uses only the project's own prompt files and ``prompts``, and the held-out evaluation is skipped.
    """
    t_start = time.perf_counter()
    bench = spec_bench_path(spec_bench)
    if bench is not None:
        read_spec_bench(bench)  # a wrong path fails now, not after hours of generation
    all_prompts = training_prompts(prompts, bench)
    src = ModelSource.resolve(model)
    fp = src.fingerprint
    work = work_dir(fp, work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out)
    log(f"target {src.name} ({fp}); work dir {work}; head -> {out}")
    target = Stage.load(src, dtype=dtype)
    tok = src.load_tokenizer()
    eos = stop_ids(tok, target.cfg)
    store = DataStore(work / "data")

    generate_data(
        target, tok, store, all_prompts, target_tokens=tokens, max_new=max_new, slots=slots, seed=seed, eos=eos
    )
    if generate_only:
        return {"data": store.meta}
    seqs = store.sequences()
    if vocab > 0:
        ids, coverage = choose_vocab(seqs, vocab, always=eos)
    else:  # the full vocabulary
        ids, coverage = torch.arange(target.cfg.vocab_size), 1.0
    log(f"data: {len(seqs)} sequences; draft vocabulary {len(ids)} covers {coverage:.1%} of answer tokens")

    hc = HeadConfig.for_target(
        target.cfg, draft_vocab_size=len(ids) if vocab > 0 else 0, target_fingerprint=fp, target_name=src.name
    )
    torch.manual_seed(seed)
    head = EagleHead(hc, target.cfg)
    head.draft_vocab = ids
    lm_rows = target.lm_head_w.index_select(0, ids).float()
    tc = TrainConfig(epochs=epochs, lr=lr, steps=steps, seed=seed, batch_tokens=batch_tokens, max_len=max_len)
    vocab_file = work / "vocab.pt"
    if vocab_file.is_file() and not torch.equal(torch.load(str(vocab_file)), ids):
        (work / "train.ckpt").unlink(missing_ok=True)  # the data changed: old checkpoints do not apply
    torch.save(ids, str(vocab_file))
    state = train_head(head, target, seqs, tc, work / "train.ckpt", lm_rows=lm_rows)

    report = {
        "command": command,
        "target": src.name,
        "target_fingerprint": fp,
        "dtype": str(target.dtype),
        "data": {
            "sequences": len(seqs),
            "answer_tokens": store.meta["answer_tokens"],
            "prompt_tokens": store.meta["prompt_tokens"],
            "generation_seconds": store.meta["gen_seconds"],
            "max_new_tokens": max_new,
            "prompt_sources": sorted({k.split(":")[0] for k, _ in all_prompts}),
            "held_out_rule": "Spec-Bench question_id % 4 == 0 is never trained on",
        },
        "head": {"params": head.param_count(), "draft_vocab": len(ids), "vocab_coverage": round(coverage, 4)},
        "training": {
            "epochs": epochs,
            "batches": state["step"],
            "seconds": round(state["seconds"], 1),
            "config": dict(tc.__dict__),
            "loss_curve": state["history"],
        },
    }
    save_head(head, out, report)

    if eval_per_category > 0 and bench is None:
        log(f"held-out evaluation skipped: it runs on Spec-Bench's held-out split (--questions or {SPEC_BENCH_ENV})")
    elif eval_per_category > 0:
        questions = held_out_questions(bench, eval_per_category)
        cats = {str(q["question_id"]): q["category"] for q in questions}
        rolls = held_out_rollouts(
            target,
            tok,
            questions,
            max_new=eval_tokens,
            temperature=0.0,
            seed=seed,
            eos=eos,
            slots=slots,
            cache=held_out_cache(work, questions, eval_tokens, 0.0, dtype),
        )
        drafter = EagleDrafter(load_head(out, target.cfg, fp), target)
        res = evaluate_acceptance(
            {"eagle": drafter, "ngram": NGramDrafter()}, rolls, cats, settings=("chain", "tree32")
        )
        report["held_out"] = {
            "questions": len(questions),
            "new_tokens": eval_tokens,
            "temperature": 0.0,
            "method": "replay of the target's greedy rollouts (exact acceptance)",
            "results": res,
        }
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.1f} MB)")
    return report
