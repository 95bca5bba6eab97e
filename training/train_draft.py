"""``meshd train-draft``: self-distil an EAGLE draft head for a target, in three resumable phases.

1. generate: the target answers the training prompts (:mod:`training.prompts`), every position's
   post-norm feature recorded (:mod:`training.rollouts`);
2. train: :func:`training.train.train_head` on the stored rollouts;
3. evaluate: held-out acceptance by exact replay (:mod:`training.evaluate`), when a Spec-Bench
   question file is given (its held-out split is the only evaluation set that is never trained on).

The head, its ``eagle.json`` and a ``report.json`` (data, loss curve, held-out figures) go to ``out``,
by default the user's heads directory (:func:`models.eagle.user_heads_dir`) under a name from the model,
where ``--drafter auto`` finds it for that model. ``time_budget`` bounds the whole run
(:mod:`training.timebudget` says how it is split).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.config import ModelError
from models.drafters import NGramDrafter
from models.eagle import (
    CONFIG_FILE,
    HEADS_DIR,
    WEIGHTS_FILE,
    EagleDrafter,
    EagleHead,
    HeadConfig,
    find_head,
    head_dirs,
    load_head,
    save_head,
    user_heads_dir,
)
from models.layers import dense
from models.source import ModelSource
from models.stage import Stage
from models.text import stop_ids
from training import promptgen
from training.evaluate import evaluate_acceptance, held_out_cache, held_out_rollouts
from training.log import log
from training.prompts import (
    SPEC_BENCH_ENV,
    Prompt,
    held_out_questions,
    read_spec_bench,
    spec_bench_path,
    training_prompts,
)
from training.rollouts import DataStore, data_dir_name, features_label, generate_data, work_dir
from training.stopping import StopRequest, either
from training.timebudget import TimeBudget, format_duration
from training.train import StoredSequence, TrainConfig, choose_vocab, train_head, vocab_coverage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


ROLLOUTS_DIR = HEADS_DIR / "rollouts"


def default_head_dir(src: ModelSource) -> Path:
    """Where a head for ``src`` goes without ``--out``: ``<user heads>/<model name>-<fingerprint[:12]>``.

    The name is for people listing the directory; the fingerprint part keeps two models of the same
    file name (another quantization, another fine-tune) from overwriting each other's head. Lookup
    never relies on the name: :func:`models.eagle.find_head` matches the fingerprint in ``eagle.json``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.name).strip(".-") or "model"
    return user_heads_dir() / f"{name}-{src.fingerprint[:12]}"


def shipped_tokens(fingerprint: str) -> Path | None:
    """The token ids of the shipped head's training answers for this target, if the project has them
    (``models/heads/rollouts/FINGERPRINT.npz``): a rerun on a new machine starts from them, features
    recomputed by prefill, instead of generating them again."""
    path = ROLLOUTS_DIR / f"{fingerprint}.npz"
    return path if path.is_file() else None


def first_answer_tokens(seqs: list[StoredSequence], tokens: int) -> list[StoredSequence]:
    """The stored sequences in order, up to ``tokens`` answer tokens (for data-size curves)."""
    out, total = [], 0
    for t, f, p in seqs:
        if total + len(t) - p > tokens:
            break
        out.append((t, f, p))
        total += len(t) - p
    return out


def weights_digest(head: Path) -> str:
    """The first 16 hex digits of the sha256 of a head's weights file ("?" when it has none)."""
    weights = head / WEIGHTS_FILE if head.is_dir() else head
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else "?"


def head_identity(path: str | Path) -> str:
    """What a warm start begins from, for the checkpoint's identity: the head's path and its weights'
    digest (a checkpoint made from another head, or from this path before it was retrained, must not
    resume)."""
    found = Path(path).expanduser()
    return f"{found}@{weights_digest(found)}"


def starting_point(path: str | Path) -> dict:
    """What a warm start began from, for its report: the head, its weights' digest and what its own report
    says of its data and training (itself nested back to the first fresh head; loss curves left out), so a
    head trained in several runs still says how it was made."""
    found = Path(path).expanduser()
    point: dict = {"head": str(found), "weights": weights_digest(found)}
    earlier = found / "report.json"
    if earlier.is_file():
        rep = json.loads(earlier.read_text())
        training = {k: v for k, v in rep.get("training", {}).items() if k != "loss_curve"}
        point["report"] = {"command": rep.get("command"), "data": rep.get("data"), "training": training}
    return point


def check_out_dir(out: Path) -> None:
    """Refuse, before hours of work, an ``out`` that exists and is not a head (publishing replaces it whole),
    or one named with a leading dot (lookup skips those: they are how unfinished heads are kept out of it)."""
    if out.name.startswith("."):
        raise ValueError(f"--out {out}: a head directory's name must not start with a dot (lookup skips those)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise ValueError(
            f"--out {out} exists and is not a draft head (no {CONFIG_FILE}); a finished head replaces the whole "
            "directory, so pass a new or empty one (or leave --out out: the head goes to the user's heads)"
        )


def publish_head(head: EagleHead, out: Path, report: dict) -> Path:
    """Write the head into a hidden directory next to ``out``, then rename it into place.

    A crash mid-write leaves only the hidden directory, which :func:`models.eagle.find_head` skips, so
    ``auto`` never picks up half a head; a head already at ``out`` (an earlier run's) is swapped out the
    same way and deleted only once the new one is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_head(head, tmp, report)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_report(out: Path, report: dict) -> None:
    """Replace ``out/report.json`` whole (a reader never sees half a file)."""
    tmp = out / f".report.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "report.json")


def where_auto_looks(out: Path, src: ModelSource) -> str:
    """The closing line: which drafter specs now use the head at ``out`` for this model."""
    try:
        found: Path | None = find_head(src.fingerprint, src.config)
    except ModelError:
        found = None
    if found is not None and found.resolve() == out.resolve():
        return (
            f"`--drafter auto` (the default of serve and generate) and `--drafter eagle` now use it for "
            f"{src.name} (fingerprint {src.fingerprint})"
        )
    if out.parent.resolve() in {d.resolve() for d in head_dirs()}:
        return f"`--drafter auto` uses {found} for this model, found first; remove it to use this head"
    other = f"; for this model auto uses {found}" if found is not None else ""
    return (
        f"`--drafter auto` does not look in {out.parent} (it looks in {user_heads_dir()}): "
        f"use --drafter eagle:{out}{other}"
    )


def train_draft(
    *,
    model: str = "default",
    out: str | Path | None = None,
    prompts: Sequence[str] = (),
    spec_bench: str | Path | None = None,
    tokens: int = 200_000,
    epochs: int = 3,
    seed: int = 0,
    work: str | Path | None = None,
    slots: int = 48,
    max_new: int = 256,
    dtype: str = "auto",
    weights: str | None = None,
    vocab: int = 8192,
    steps: int = 3,
    lr: float = 1e-3,
    eval_per_category: int = 3,
    eval_tokens: int = 128,
    batch_tokens: int = 4096,
    max_len: int = 1024,
    generate_only: bool = False,
    write_prompts: str | Path | None = None,
    prompt_count: int = 6000,
    tokens_file: str | Path | None = None,
    train_tokens: int | None = None,
    init_head: str | Path | None = None,
    time_budget: float | None = None,
    command: str | None = None,
    stop: StopRequest | None = None,
) -> dict:
    """Generate (resumable), train (resumable), write the head, evaluate, write the report.

    ``out``: the head's directory (default :func:`default_head_dir`, where ``auto`` finds it).
    ``spec_bench``: Spec-Bench's question file (default ``$MESHD_SPEC_BENCH``); without one, training
    uses only the project's own prompt files and ``prompts``, and the held-out evaluation is skipped.
    ``weights``: how the target's matrices are held while it makes the head's features (a format of
    ``--weights``; None: dense in ``dtype``; ``auto``: what serving picks on this device). Features of
    other numerics are kept in their own data directory. Measured on the embedded model, int4a8 features
    made no better head than dense ones (docs/draft-head.md), so this is a choice, not the default.
    ``time_budget``: seconds for the whole run, split as :mod:`training.timebudget` says; what it cut
    is logged and recorded under ``report["time_budget"]``. ``init_head``: start from this head (its
    weights and its draft vocabulary) instead of a fresh one, so more epochs or more data build on a
    head already trained rather than paying for all of its training again; a ``vocab`` larger than its
    draft vocabulary widens that (:func:`widen_vocab`), and ``epochs=0`` then writes it without training.
    ``stop`` (the command's SIGTERM and Ctrl-C,
    :mod:`training.stopping`) ends the run at the next point where its work is kept, without writing a
    head; the returned dict then says ``stopped`` (the signal's name).
    """
    t_start = time.perf_counter()
    if epochs < 0 or (epochs == 0 and init_head is None):
        raise ValueError(
            f"--epochs {epochs}: give at least 1, or 0 with --init-head DIR --vocab N to write that head with its "
            "draft vocabulary widened to N tokens and no training"
        )
    bench = spec_bench_path(spec_bench)
    if bench is not None:
        read_spec_bench(bench)  # a wrong path fails now, not after hours of generation
    budget = (
        TimeBudget(time_budget, report=bench is not None and eval_per_category > 0, start=t_start)
        if time_budget
        else None
    )
    cuts: dict[str, str] = {}
    all_prompts = training_prompts(prompts, bench)
    src = ModelSource.resolve(model)
    fp = src.fingerprint
    work = work_dir(fp, work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out is not None else default_head_dir(src)
    check_out_dir(out)
    log(f"target {src.name} ({fp}); work dir {work}; head -> {out}")
    stop = stop if stop is not None else StopRequest()  # not installed: never asks to stop
    gen_stop: Callable[[], bool] = stop
    if budget is not None:
        gen_stop = either(stop, budget.over(budget.end if generate_only else budget.generation_deadline))
        log(
            f"time budget {format_duration(budget.seconds)}: all of it for generation (--generate-only)"
            if generate_only
            else budget.describe()
        )
    target = Stage.load(src, dtype=dtype, weights=weights)
    # a warm start's head is read now: a wrong path or another model's head fails before hours of work
    start = load_head(init_head, target.cfg, fp).float() if init_head is not None else None
    numerics = features_label(target)
    log(f"features: {numerics}")
    tok = src.load_tokenizer()
    eos = stop_ids(tok, target.cfg)
    store = DataStore(work / data_dir_name(target))
    saved = Path(tokens_file) if tokens_file is not None else shipped_tokens(fp)
    if saved is not None and saved.is_file():
        store.load_tokens(saved, fp)
    if write_prompts is not None:
        return write_prompt_set(
            target, tok, store, all_prompts, Path(write_prompts), prompt_count, bench, seed, slots, eos
        )

    stop.graceful = True  # from here on every phase keeps its work when stopped
    gen_cut = generate_data(
        target,
        tok,
        store,
        all_prompts,
        target_tokens=tokens,
        max_new=max_new,
        slots=slots,
        seed=seed,
        eos=eos,
        stop=gen_stop,
    )
    if tokens_file is not None:
        n = store.save_tokens(Path(tokens_file), fp, max_new)
        log(f"wrote the token ids of {n} sequences to {tokens_file} ({Path(tokens_file).stat().st_size / 1e6:.1f} MB)")
    if gen_cut:
        cuts["generation"] = f"stopped at {store.meta['answer_tokens']} of {tokens} answer tokens"
    if stop():
        return stopped(stop, "after generation, every finished answer kept", store)
    if generate_only:
        return {"data": store.meta}
    if start is not None and vocab > len(start.draft_vocab):
        widen_vocab(start, store, vocab, target.cfg.vocab_size)
    if epochs == 0 and start is not None:  # a widened vocabulary needs no features: written as it is
        report = {
            "command": command,
            "target": src.name,
            "target_fingerprint": fp,
            "init_head": starting_point(init_head),
            "head": {"params": start.param_count(), "draft_vocab": len(start.draft_vocab)},
        }
        publish_head(start, out, report)
        log(f"wrote {out} (the head of {init_head} with a draft vocabulary of {len(start.draft_vocab)}; no training)")
        log(where_auto_looks(out, src))
        return report
    feat_stop: Callable[[], bool] = stop
    if budget is not None:  # the prefill may take half of what training has; it trains on what got features
        feat_stop = either(stop, budget.over(budget.clock() + budget.left(budget.training_deadline) / 2))
    store.fill_features(target, train_tokens, stop=feat_stop)
    if stop():
        return stopped(stop, "while making features, the sequences done kept", store)
    if store.without_features(train_tokens):
        cuts["features"] = "made for part of the data only; training used those sequences"
    seqs = store.sequences(train_tokens, made_only=True)
    if train_tokens is not None:
        seqs = first_answer_tokens(seqs, train_tokens)
        log(f"training on the first {len(seqs)} sequences ({sum(len(t) - p for t, _, p in seqs)} answer tokens)")
    if not seqs and "features" in cuts:
        raise ValueError(
            f"no training data for {src.name}: the time budget ran out while the target made the features of "
            "the stored answers; give a larger --time-budget, or run again: the features made are kept"
        )
    if not seqs and gen_cut:
        raise ValueError(
            f"no training data for {src.name} in {work / 'data'}: the time budget ran out before the target "
            "finished its first answers; give a larger --time-budget (or a smaller --max-new), or run again: "
            "generation resumes where it stopped"
        )
    if not seqs:
        raise ValueError(
            f"no training data for {src.name} in {work / 'data'}: no prompt could be answered (every prompt "
            "file empty, or every prompt longer than 1024 tokens); pass --prompts FILE with shorter prompts"
        )
    if start is not None:
        head = start
        ids = head.draft_vocab if head.hc.draft_vocab_size else torch.arange(target.cfg.vocab_size)
        coverage = vocab_coverage(seqs, ids)
        log(
            f"data: {len(seqs)} sequences; starting from the head in {init_head}, whose draft vocabulary of "
            f"{len(ids)} covers {coverage:.1%} of answer tokens"
        )
    else:
        if vocab > 0:
            ids, coverage = choose_vocab(((t, p) for t, _, p in seqs), vocab, always=eos)
        else:  # the full vocabulary
            ids, coverage = torch.arange(target.cfg.vocab_size), 1.0
        log(f"data: {len(seqs)} sequences; draft vocabulary {len(ids)} covers {coverage:.1%} of answer tokens")
        hc = HeadConfig.for_target(
            target.cfg, draft_vocab_size=len(ids) if vocab > 0 else 0, target_fingerprint=fp, target_name=src.name
        )
        torch.manual_seed(seed)
        head = EagleHead(hc, target.cfg)
        head.draft_vocab = ids
    lm_rows = dense(target.lm_head_w).index_select(0, ids).float()
    tc = TrainConfig(
        epochs=epochs,
        lr=lr,
        steps=steps,
        seed=seed,
        batch_tokens=batch_tokens,
        max_len=max_len,
        init=head_identity(init_head) if init_head is not None else None,
    )
    vocab_file = work / "vocab.pt"
    if vocab_file.is_file() and not torch.equal(torch.load(str(vocab_file)), ids):
        (work / "train.ckpt").unlink(missing_ok=True)  # the data changed: old checkpoints do not apply
    torch.save(ids, str(vocab_file))
    if budget is not None:
        log(f"training: {format_duration(budget.left(budget.training_deadline))} of the budget left for it")
    state = train_head(
        head,
        target,
        seqs,
        tc,
        work / "train.ckpt",
        lm_rows=lm_rows,
        deadline=budget.training_deadline if budget is not None else None,
        stop=stop,
    )
    if state["stopped"]:
        return stopped(stop, f"in training at batch {state['step']} of {state['planned']}, checkpoint saved", store)
    if state.get("cut"):
        cuts["training"] = (
            f"stopped at batch {state['step']} of {state['planned']} ({epochs} epochs; the schedule annealed by time)"
        )

    report = {
        "command": command,
        "target": src.name,
        "target_fingerprint": fp,
        "dtype": str(target.dtype),
        "features": numerics,
        "data": {
            "sequences": len(seqs),
            "answer_tokens": sum(len(t) - p for t, _, p in seqs),
            "prompt_tokens": sum(p for _, _, p in seqs),
            "stored_answer_tokens": store.meta["answer_tokens"],
            "generation_seconds": store.meta["gen_seconds"],
            "max_new_tokens": max_new,
            # what was trained on: the store keeps sequences in order, keyed by their prompt
            "prompt_sources": sorted({k.split(":")[0] for k in store.meta["done"][: len(seqs)]}),
            "held_out_rule": "Spec-Bench question_id % 4 == 0 is never trained on",
        },
        "head": {"params": head.param_count(), "draft_vocab": len(ids), "vocab_coverage": round(coverage, 4)},
        "training": {
            "epochs": epochs,
            "init_head": starting_point(init_head) if init_head is not None else None,
            "batches": state["step"],
            "planned_batches": state.get("planned"),
            "seconds": round(state["seconds"], 1),
            "config": dict(tc.__dict__),
            "loss_curve": state["history"],
        },
    }
    publish_head(head, out, report)  # usable from here on, whatever happens to the report

    if eval_per_category > 0 and bench is None:
        log(f"held-out evaluation skipped: it runs on Spec-Bench's held-out split (--questions or {SPEC_BENCH_ENV})")
    elif eval_per_category > 0 and budget is not None and not budget.report_fits():
        cuts["report"] = f"skipped: {budget.left():.0f} s of the budget left"
        log(f"held-out evaluation {cuts['report']}")
    elif eval_per_category > 0 and stop():
        report["stopped"] = stop.name
        log(f"held-out evaluation skipped: {stop.name}")
    elif eval_per_category > 0:
        report["held_out"] = held_out_report(
            target,
            tok,
            out,
            fp,
            bench,
            work=work,
            per_category=eval_per_category,
            eval_tokens=eval_tokens,
            seed=seed,
            eos=eos,
            slots=slots,
            numerics=numerics,
            budget=budget,
            stop=stop,
        )
        if report["held_out"].get("cut"):
            cuts["report"] = report["held_out"]["cut"]
    if budget is not None:
        report["time_budget"] = {"seconds": budget.seconds, "spent": round(budget.spent(), 1), "cut": cuts}
        log(
            f"time budget: {format_duration(budget.spent())} of {format_duration(budget.seconds)} spent; "
            + ("cut: " + "; ".join(f"{k} {v}" for k, v in cuts.items()) if cuts else "nothing cut")
        )
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(out, report)
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.1f} MB)")
    log(where_auto_looks(out, src))
    return report


def widen_vocab(head: EagleHead, store: DataStore, size: int, vocab_size: int) -> None:
    """Grow a warm start's draft vocabulary to ``size``: its own ids first, then the stored answers' most
    frequent tokens, then their prompts', then the lowest unused ids. The head predicts features and reads
    them with the target's own LM-head rows, so the wider rows need no retraining: the shipped head widened
    from 8,192 to 32,768 tokens drafted 3.7 % more tokens a round at T=1 untrained. Greedy drafts keep
    reading the ids it had (``greedy_vocab_size``): at T=0 the wider rows added 0.3 % for 2.5x the draft's
    time (docs/draft-head.md, "A wider draft vocabulary")."""
    old = head.draft_vocab.tolist()
    answered = [(toks, plen) for _, toks, plen in store.answered()]
    ids, coverage = choose_vocab(answered, size, always=old, vocab_size=vocab_size)
    known = set(old)
    head.draft_vocab = torch.tensor(old + [t for t in ids.tolist() if t not in known])
    head.hc.greedy_vocab_size = head.hc.greedy_vocab_size or len(old)
    head.hc.draft_vocab_size = len(head.draft_vocab)
    log(
        f"data: draft vocabulary widened from {len(old)} to {len(ids)} tokens (greedy drafts read the first "
        f"{head.hc.greedy_vocab_size}); it covers {coverage:.1%} of answer tokens"
    )


def stopped(stop: StopRequest, where: str, store: DataStore) -> dict:
    """The run's end when a signal stopped it: what was kept, and that a rerun continues."""
    log(
        f"stopped by {stop.name} {where} ({store.meta['answer_tokens']} answer tokens stored); no head written: "
        "run the same command again to continue"
    )
    return {"stopped": stop.name, "data": store.meta}


def write_prompt_set(
    target: Stage,
    tok: PreTrainedTokenizerBase,
    store: DataStore,
    known: Sequence[tuple[str, Prompt]],
    path: Path,
    count: int,
    bench: Path | None,
    seed: int,
    slots: int,
    eos: Sequence[int],
) -> dict:
    """``--write-prompts``: a new prompt file of ``count`` prompts (:func:`training.promptgen.make_prompt_set`),
    follow-up turns made on the answers already in the work dir's data; no prompt already known is repeated."""
    texts = {k: p for k, p in known if isinstance(p, str)}
    answers = [
        (texts[k], tok.decode(toks[plen:], skip_special_tokens=True))
        for k, toks, plen in store.answered()
        if k in texts
    ]
    made = promptgen.make_prompt_set(
        target, tok, count=count, answers=answers, spec_bench=bench, seed=seed, slots=slots, eos=eos
    )
    have = {" ".join(p.lower().split()) for p in texts.values()}
    made = [p for p in made if not isinstance(p, str) or " ".join(p.lower().split()) not in have]
    promptgen.write_prompts(path, made)
    log(f"wrote {len(made)} prompts to {path}")
    return {"prompts": len(made), "path": str(path)}


def held_out_report(
    target: Stage,
    tok: PreTrainedTokenizerBase,
    out: Path,
    fingerprint: str,
    bench: Path,
    *,
    work: Path,
    per_category: int,
    eval_tokens: int,
    seed: int,
    eos: Sequence[int],
    slots: int,
    numerics: str,
    budget: TimeBudget | None,
    stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Held-out acceptance of the head at ``out`` against n-gram lookup, by exact replay.

    Under a time budget the reference rollouts get half of what is left and the replay the rest;
    whatever did not fit is left out and said so under ``cut`` (rollouts cut short are not cached)."""
    questions = held_out_questions(bench, per_category)
    cats = {str(q["question_id"]): q["category"] for q in questions}
    roll_stop = stop
    if budget is not None:
        roll_stop = either(stop, budget.over(budget.clock() + budget.left() / 2))
    rolls = held_out_rollouts(
        target,
        tok,
        questions,
        max_new=eval_tokens,
        temperature=0.0,
        seed=seed,
        eos=eos,
        slots=slots,
        cache=held_out_cache(work, questions, eval_tokens, 0.0, numerics),
        stop=roll_stop,
    )
    if stop():
        return {"questions": len(questions), "cut": "stopped by a signal before the replay"}
    drafter = EagleDrafter(load_head(out, target.cfg, fingerprint), target)
    res = evaluate_acceptance(
        {"eagle": drafter, "ngram": NGramDrafter()},
        rolls,
        cats,
        settings=("chain", "tree32"),
        deadline=budget.end if budget is not None else None,
    )
    held: dict = {
        "questions": len(questions),
        "new_tokens": eval_tokens,
        "temperature": 0.0,
        "method": "replay of the target's greedy rollouts (exact acceptance)",
        "results": res,
    }
    replayed = min((r["rollouts"] for r in res.values()), default=0)
    if len(rolls) < len(questions) or replayed < len(rolls):
        held["cut"] = (
            f"cut to fit the time budget: {len(rolls)} of {len(questions)} questions answered, "
            f"at least {replayed} replayed per drafter and setting"
        )
        log(f"held-out evaluation {held['cut']}")
    return held
