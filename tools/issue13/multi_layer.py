"""Issue 13: does a head that reads more than the target's last layer draft better? (EAGLE-3's fused features)

Two heads are trained on the same data with the same recipe and draft vocabulary, and replayed on the same
held-out rollouts: one reads what the shipped head reads (the target's last post-norm feature), the other a
learned mix of that feature and the outputs of two earlier layers (``--layers``; each RMS-normalised without
weights first, since the residual stream's scale grows with depth). The mix (3H -> H, no bias) starts as
"take the last feature", so the second head begins where the first does and differs only by what the extra
layers are worth. Only the first level of a draft reads the target's features; deeper levels read the head's
own output in both heads (training-time test trains them that way).

Data: the first ``--tokens`` answer tokens of the project's token file (as ``meshd train-draft --train-tokens``
takes them), features recomputed by prefill through the target cut into three stages at ``--layers``, in fp32
(dense: the same numbers on any CPU). Evaluation: Spec-Bench's held-out split (``--per-category`` of each
category) and the everyday set, T=0, replay (exact for greedy decoding), head alone and merged with n-gram.

    PYTHONPATH=. python tools/issue13/multi_layer.py --tokens 200000 --work /tmp/multi-layer \\
        --questions PATH/TO/spec_bench/question.jsonl

Prints and writes ``WORK/report.json``; features and heads stay in ``WORK`` (a rerun reuses them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.config import ModelConfig
from models.drafters import MergedDrafter, NGramDrafter
from models.eagle import EagleDrafter, EagleHead, HeadConfig
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage
from models.text import stop_ids
from training.evaluate import evaluate_acceptance, held_out_cache, held_out_rollouts
from training.log import log
from training.prompts import EVERYDAY, held_out_questions, load_questions
from training.rollouts import Rollout, features_label
from training.train import StoredSequence, TrainConfig, choose_vocab, train_head
from training.train_draft import first_answer_tokens, shipped_tokens


class MixedHead(EagleHead):
    """An EAGLE head whose first-level input feature is a learned mix of several layers' features
    (the last layer's in the last H columns)."""

    def __init__(self, hc: HeadConfig, target_cfg: ModelConfig, n_inputs: int):
        super().__init__(hc, target_cfg)
        h = hc.hidden_size
        self.mix = nn.Linear(n_inputs * h, h, bias=False)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[:, -h:] = torch.eye(h)

    def mixed(self, feats: torch.Tensor) -> torch.Tensor:
        """The H-wide feature the head reads, from (..., n_inputs * H) features; what a drafter is given."""
        return self.mix(feats.to(self.mix.weight.dtype))

    def unroll(self, emb: torch.Tensor, feat: torch.Tensor, steps: int) -> list[torch.Tensor]:
        return super().unroll(emb, self.mixed(feat), steps)


def rms(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit RMS per row, without weights: the residual stream's scale grows with depth, so an
    earlier layer's output would otherwise enter the mix at another scale than the last (normed) feature."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@torch.inference_mode()
def layer_features(stages: list[Stage], ids: list[int], chunk: int = 512) -> torch.Tensor:
    """(len(ids), 3H) fp16: RMS-normalised outputs of the first two stages, then the last post-norm feature."""
    caches = [s.new_cache(len(ids)) for s in stages]
    out = []
    for s in range(0, len(ids), chunk):
        part = torch.tensor(ids[s : s + chunk])
        pos = torch.arange(s, s + len(part))
        x = stages[0].embed(part)
        cols = []
        for st, cache in zip(stages, caches):
            x = st.forward_one(x, cache, pos)
            cols.append(x)
        out.append(torch.cat([rms(cols[0]), rms(cols[1]), stages[-1].final_norm(cols[2])], dim=-1).half())
    return torch.cat(out)


def load_sequences(stages: list[Stage], src: ModelSource, tokens: int, cache: Path) -> list[StoredSequence]:
    """The first ``tokens`` answer tokens' sequences with their three-layer features (cached in ``cache``)."""
    if cache.is_file():
        return torch.load(str(cache), weights_only=False)
    path = shipped_tokens(src.fingerprint)
    if path is None or not path.is_file():
        raise SystemExit(
            f"no token file for {src.name} in the repository (models/heads/rollouts/); nothing to train on"
        )
    with np.load(path) as z:
        toks, lens, plens = z["tokens"].astype(np.int64), z["lens"].tolist(), z["prompt_lens"].tolist()
    starts = np.cumsum([0, *lens])
    dummy = [(torch.zeros(n), torch.zeros(0), p) for n, p in zip(lens, plens)]
    chosen = len(first_answer_tokens(dummy, tokens))
    total = int(starts[chosen])
    log(f"features: {chosen} sequences, {total} tokens by prefill through 3 stages")
    seqs, done, t0, last = [], 0, time.perf_counter(), 0.0
    for i in range(chosen):
        ids = toks[starts[i] : starts[i + 1]].tolist()
        seqs.append((torch.tensor(ids), layer_features(stages, ids[:-1]), plens[i]))
        done += len(ids)
        el = time.perf_counter() - t0
        if el - last > 60:
            log(f"  {done}/{total} tokens, {done / el:.0f} tok/s, ~{(total - done) / (done / el) / 60:.0f} min left")
            last = el
    torch.save(seqs, str(cache))
    return seqs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=250_000, help="answer tokens to train on")
    ap.add_argument("--layers", default="3,15", help="the two earlier layers whose outputs are mixed in")
    ap.add_argument("--work", required=True)
    ap.add_argument("--questions", required=True, help="Spec-Bench's question file (its held-out split is replayed)")
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--everyday", type=int, default=46, help="the first N everyday prompts (46: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="tree16,tree64")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lo, mid = (int(x) for x in a.layers.split(","))
    src = ModelSource.resolve("default")
    n = src.config.n_layers
    spans = ((0, lo), (lo, mid), (mid, n))  # the middle stage needs no embeddings or LM head
    stages = [Stage.load(src, LayerRange(f, s), vocab=f != lo, dtype="fp32") for f, s in spans]
    target = Stage.load(src, dtype="fp32")
    h = target.cfg.hidden_size

    seqs3 = load_sequences(stages, src, a.tokens, work / f"feats-{a.tokens}-{lo}-{mid}.pt")
    seqs1 = [(t, f[:, -h:], p) for t, f, p in seqs3]
    tok = src.load_tokenizer()
    eos = stop_ids(tok, target.cfg)
    ids, coverage = choose_vocab(((t, p) for t, _, p in seqs1), 8192, always=eos)
    answer = sum(len(t) - p for t, _, p in seqs1)
    log(f"{len(seqs1)} sequences, {answer} answer tokens; the draft vocabulary covers {coverage:.1%}")
    tc = TrainConfig(epochs=a.epochs, batch_tokens=a.batch_tokens)
    lm_rows = target.lm_head_w.index_select(0, ids).float()
    hc = HeadConfig.for_target(target.cfg, draft_vocab_size=len(ids))
    heads: dict[str, EagleHead] = {}
    report: dict = {"tokens": a.tokens, "layers": [lo, mid], "sequences": len(seqs1), "train": {}}
    for name, seqs in (("last", seqs1), ("mixed", seqs3)):
        torch.manual_seed(0)
        head = EagleHead(hc, target.cfg) if name == "last" else MixedHead(hc, target.cfg, 3)
        head.draft_vocab = ids
        state = train_head(head, target, seqs, tc, work / f"train-{name}-{a.tokens}-{lo}-{mid}.ckpt", lm_rows=lm_rows)
        tail = state["history"][-5:]
        report["train"][name] = {
            "seconds": round(state["seconds"], 1),
            "batches": state["step"],
            "top1_last_batches": {
                k: round(sum(r[k] for r in tail) / len(tail), 4) for k in ("top1_1", "top1_2", "top1_3")
            },
        }
        log(f"head {name}: {report['train'][name]}")
        heads[name] = head

    sets = {
        "specbench": held_out_questions(Path(a.questions), a.per_category),
        "everyday": load_questions(EVERYDAY)[: a.everyday],
    }
    for set_name, qs in sets.items():
        cats = {str(q["question_id"]): q["category"] for q in qs}
        rolls = held_out_rollouts(
            target,
            tok,
            qs,
            max_new=128,
            temperature=0.0,
            seed=0,
            eos=eos,
            slots=48,
            cache=held_out_cache(work, qs, 128, 0.0, features_label(target)),
        )
        feats = [layer_features(stages, list(r.tokens[:-1])) for r in rolls]
        for name, head in heads.items():
            with torch.no_grad():
                fs = [f[:, -h:] if name == "last" else head.mixed(f.float()) for f in feats]
            rs = [Rollout(r.key, r.tokens, r.prompt_len, f.to(target.dtype), r.finish) for r, f in zip(rolls, fs)]
            eagle = EagleDrafter(head, target)
            drafters = {"eagle": eagle, "eagle+ngram": MergedDrafter([eagle.fresh(), NGramDrafter()])}
            res = evaluate_acceptance(drafters, rs, cats, settings=a.settings.split(","))
            report.setdefault(set_name, {})[name] = {k: v["mean_accepted"] for k, v in res.items()}
            report[set_name][f"{name}_per_category"] = {k: v["per_category"] for k, v in res.items()}
            log(f"{set_name} {name}: {report[set_name][name]}")
            (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    summary = {s: {k: v for k, v in r.items() if "per_category" not in k} for s, r in report.items() if s in sets}
    print(json.dumps({"train": report["train"], **summary}, indent=1))


if __name__ == "__main__":
    main()
