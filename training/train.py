"""Training the EAGLE head on stored rollouts: feature regression plus the target's own distribution.

The loss is smooth-L1 on the predicted feature plus a soft cross-entropy against the target's
distribution over the draft vocabulary, with a multi-step unroll (EAGLE-3's training-time test)
so deep tree levels, which feed on predicted features, are trained too. Checkpoints every few
minutes; a rerun resumes at the batch it reached.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.eagle import EagleHead
from models.layers import dense
from models.stage import Stage
from training.log import log

StoredSequence = tuple[torch.Tensor, torch.Tensor, int]
"""(tokens, post-norm features of every position but the last, prompt length), as stored."""


def choose_vocab(
    answers: Iterable[tuple[Sequence[int] | torch.Tensor, int]],
    size: int,
    always: Iterable[int] = (),
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, float]:
    """The ``size`` most frequent answer tokens of ``answers`` ((prompt + answer ids, prompt length) pairs)
    after ``always``, then prompt tokens, and the answer-token coverage. Where the data has fewer distinct
    tokens than ``size`` and ``vocab_size`` is given, the lowest unused ids fill the rest (BPE vocabularies
    list their most frequent merges first).

    A draft vocabulary costs one LM-head row a drafted node, and a token outside it is never drafted: at
    T=1 the held-out answers' tokens fell outside the 8,192 most frequent answer tokens 13-16 % of the time
    (docs/draft-head.md, "A wider draft vocabulary")."""
    counts: Counter[int] = Counter()
    prompt_counts: Counter[int] = Counter()
    for toks, plen in answers:
        seq = torch.as_tensor(toks)
        counts.update(seq[plen:].tolist())
        prompt_counts.update(seq[:plen].tolist())
    ranked = [*always, *(t for t, _ in counts.most_common()), *(t for t, _ in prompt_counts.most_common())]
    ids = list(dict.fromkeys(ranked))[:size]
    if vocab_size is not None and len(ids) < size:
        taken = set(ids)
        ids += [t for t in range(vocab_size) if t not in taken][: size - len(ids)]
    total = sum(counts.values())
    covered = sum(counts[t] for t in ids)
    return torch.tensor(sorted(ids)), covered / max(total, 1)


def vocab_coverage(seqs: Sequence[StoredSequence], ids: torch.Tensor) -> float:
    """The share of answer tokens that a draft vocabulary ``ids`` holds (a warm start keeps its head's)."""
    keep = set(ids.tolist())
    total = covered = 0
    for toks, _, plen in seqs:
        answer = toks[plen:].tolist()
        total += len(answer)
        covered += sum(t in keep for t in answer)
    return covered / max(total, 1)


@dataclass
class TrainConfig:
    """How the head is trained; part of the report, and of the checkpoint's identity (a change restarts)."""

    epochs: int = 3
    lr: float = 1e-3
    batch_tokens: int = 4096
    max_len: int = 1024
    steps: int = 3  # unroll depth (training-time test)
    step_weights: tuple[float, ...] = (1.0, 0.7, 0.5, 0.4)
    ce_weight: float = 0.5
    prompt_weight: float = 0.1
    seed: int = 0
    checkpoint_seconds: float = 180.0
    init: str | None = None  # the head a warm start began from (path@digest); None: a fresh head


def make_batches(seqs: Sequence[StoredSequence], tc: TrainConfig, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of sequence indices, shuffled deterministically per epoch."""
    rng = random.Random(tc.seed * 1000 + epoch)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), 256):  # sort within pools so padding stays small
        pool = sorted(order[start : start + 256], key=lambda i: min(len(seqs[i][0]), tc.max_len))
        cur: list[int] = []
        longest = 0
        for i in pool:
            n = min(len(seqs[i][0]), tc.max_len)
            if cur and max(longest, n) * (len(cur) + 1) > tc.batch_tokens:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(
    seqs: Sequence[StoredSequence], idx: list[int], tc: TrainConfig, target_width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (tokens t+1, features t, target features t+1, loss weights) with the window's tail kept.

    ``target_width``: the target features are the last that many columns of a sequence's features (the
    head's hidden size); the columns before them are extra inputs only (features of earlier layers, for a
    head that fuses several; ``tools/issue13/multi_layer.py``). None: all columns are the target's."""
    items = []
    for i in idx:
        toks, feats, plen = seqs[i]
        n = len(toks)
        s = max(0, n - tc.max_len)
        items.append((toks[s:], feats[s:], plen - s))
    t = max(len(x[0]) for x in items) - 2  # rows t=0..n-3: input (tok t+1, f_t), target f_{t+1}
    b = len(items)
    h = items[0][1].shape[1]
    ht = h if target_width is None else target_width
    nxt = torch.zeros(b, t, dtype=torch.long)
    fin = torch.zeros(b, t, h)
    ftg = torch.zeros(b, t, ht)
    w = torch.zeros(b, t)
    for j, (toks, feats, plen) in enumerate(items):
        r = len(toks) - 2
        nxt[j, :r] = toks[1 : r + 1]
        fin[j, :r] = feats[:r].float()
        ftg[j, :r] = feats[1 : r + 1, h - ht :].float()
        # a row predicts the token after position t+1; answer positions start at plen - 1
        w[j, :r] = tc.prompt_weight
        w[j, max(0, plen - 2) : r] = 1.0
    return nxt, fin, ftg, w


def train_head(
    head: EagleHead,
    target: Stage,
    seqs: Sequence[StoredSequence],
    tc: TrainConfig,
    ckpt: Path,
    *,
    lm_rows: torch.Tensor,
    log_every: int = 20,
    deadline: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Train ``head`` in place; resumes from ``ckpt``; returns the loss history and timing.

    ``deadline`` (on ``time.perf_counter``, from a time budget) ends training early, after at least
    one batch, with the checkpoint saved so a rerun resumes. Cutting a cosine schedule off midway
    would leave the head at a high learning rate, so with a deadline the schedule's progress is
    whichever is further along, the batches done or the time spent of this run's share (warm-up
    included: it ends after 5 % of the time at the latest): the rate reaches its floor by the
    deadline however many batches fit. ``state["cut"]`` says whether the
    deadline stopped it before the ``state["planned"]`` batches.

    ``stop`` (a signal's stop test, :mod:`training.stopping`) is asked after every batch; when true,
    training ends there mid-schedule with the checkpoint saved (``state["stopped"]``), for a rerun to
    continue the same schedule."""
    torch.manual_seed(tc.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.95))
    per_epoch = [make_batches(seqs, tc, e) for e in range(tc.epochs)]
    total = sum(len(b) for b in per_epoch)
    warm = max(1, min(100, total // 20))

    t_begin = time.perf_counter()
    warm_time = 0.05  # under a deadline, warm-up also ends after this fraction of the time: few batches may fit

    def lr_at(step: int) -> float:
        spent = 0.0
        if deadline is not None:
            spent = min(1.0, (time.perf_counter() - t_begin) / max(deadline - t_begin, 1e-9))
        if step < warm and spent < warm_time:
            return tc.lr * max((step + 1) / warm, spent / warm_time)
        progress = max(0.0, (step - warm) / max(1, total - warm))
        if deadline is not None:
            progress = max(progress, (spent - warm_time) / (1 - warm_time))
        return tc.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    state: dict = {"step": 0, "history": [], "seconds": 0.0}
    if ckpt.is_file():
        saved = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        if saved.get("total") == total and saved.get("init") == tc.init:
            head.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            state = saved["state"]
            log(f"training: resumed at step {state['step']}/{total}")
        else:
            log("training: checkpoint is for a different data set, schedule or starting head; starting over")
    state["cut"] = state["stopped"] = False
    state["planned"] = total

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {"model": head.state_dict(), "opt": opt.state_dict(), "state": state, "total": total, "init": tc.init},
            str(tmp),
        )
        os.replace(tmp, ckpt)

    embed = dense(target.embed_w).float()  # quantized embeddings as a plain table
    lm = lm_rows.float()
    head.float().train()
    bar = tqdm(total=total, initial=state["step"], unit="batch", desc="train", file=sys.stderr)
    t_last = time.perf_counter()
    last_ckpt = t_last
    acc: dict[str, float] = Counter()
    flat = [(e, b) for e, bs in enumerate(per_epoch) for b in bs]
    try:
        for step in range(state["step"], total):
            epoch, idx = flat[step]
            nxt, fin, ftg, w = collate(seqs, idx, tc, head.hc.hidden_size)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            emb = F.embedding(nxt, embed)
            outs = head.unroll(emb, fin, tc.steps)
            with torch.no_grad():
                tgt_p = torch.softmax(F.linear(ftg, lm), dim=-1)
                tgt_tok = tgt_p.argmax(-1)
            loss = torch.zeros(())
            for s, out in enumerate(outs, start=1):
                ws = w.clone()
                ws[:, : s - 1] = 0
                denom = ws.sum().clamp_min(1.0)
                vl = (F.smooth_l1_loss(out, ftg, reduction="none").mean(-1) * ws).sum() / denom
                lp = torch.log_softmax(F.linear(out, lm), dim=-1)
                ce = (-(tgt_p * lp).sum(-1) * ws).sum() / denom
                loss = loss + tc.step_weights[s - 1] * (vl + tc.ce_weight * ce)
                with torch.no_grad():
                    hit = ((lp.argmax(-1) == tgt_tok).float() * (ws >= 1.0)).sum() / (ws >= 1.0).sum().clamp_min(1)
                acc[f"vloss{s}"] += float(vl.detach())
                acc[f"ce{s}"] += float(ce.detach())
                acc[f"top1_{s}"] += float(hit)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            acc["loss"] += float(loss.detach())
            acc["n"] += 1
            state["step"] = step + 1
            bar.update(1)
            now = time.perf_counter()
            state["seconds"] += now - t_last
            t_last = now
            cut = deadline is not None and now >= deadline and step + 1 < total
            halt = stop is not None and step + 1 < total and stop()
            if acc["n"] >= log_every or step + 1 == total or cut or halt:  # the curve ends where training did
                row = {k: round(v / acc["n"], 4) for k, v in acc.items() if k != "n"}
                row.update(step=step + 1, epoch=epoch, lr=round(lr_at(step), 6), seconds=round(state["seconds"], 1))
                state["history"].append(row)
                bar.set_postfix(loss=row["loss"], top1=row.get("top1_1"))
                acc = Counter()
            if now - last_ckpt > tc.checkpoint_seconds:
                save()
                last_ckpt = now
            if cut:
                state["cut"] = True
                log(f"training: stopped by the time budget at batch {step + 1}/{total} (a rerun resumes here)")
                break
            if halt:
                state["stopped"] = True
                log(f"training: stopped at batch {step + 1}/{total}, checkpoint saved (a rerun resumes here)")
                break
    finally:
        bar.close()
        save()
    head.eval()
    return state
