"""Self-distillation for the EAGLE head: generate with the target, record its features, train, report.

Three resumable phases under a work directory:

1. **generate**: the target answers training prompts (Spec-Bench with ``question_id % 4 != 0`` plus
   any prompt files; the held-out split ``% 4 == 0`` is never trained on) through a padded batched
   decoder (one SDPA per layer for all slots, finished slots refilled at once), recording every
   position's post-norm feature. Finished sequences go to shards; ``progress.json`` lists the
   prompts done, so a cut-off run loses at most the sequences in flight.
2. **train**: feature regression (smooth L1) + soft cross-entropy against the target's own
   distribution over the draft vocabulary, with a multi-step unroll so deep tree levels (which
   feed on predicted features) are trained too. Checkpoints every few minutes; resume skips the
   batches already done.
3. **evaluate**: held-out acceptance, measured exactly by replaying reference continuations: the
   walk of a (greedy or tree-rejection-sampling) verification accepts a drafted child iff it is
   the token the target emits, so simulating rounds against a recorded target rollout gives the
   same accepted lengths as running the engine, at the cost of drafting only.
"""

from __future__ import annotations

import json
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

from models.stage import Stage, linear, rms_norm, rotate

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench_questions.jsonl"


def log(msg: str) -> None:
    print(f"[train-draft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- prompts ---------------------------------------------------------------------------------
def spec_bench_rows(path: Path = SPEC_BENCH) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"Spec-Bench questions not found at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_held_out(question_id: int) -> bool:
    return question_id % 4 == 0


def training_prompts(files: Sequence[str | Path] = (), spec_bench: Path | None = SPEC_BENCH) -> list[tuple[str, str]]:
    """(key, user message) pairs: Spec-Bench's training split (first turns) plus every prompt file.

    Prompt files are JSONL (``{"prompt": ...}``, ``{"text": ...}`` or ``{"turns": [...]}``) or plain
    text with one prompt per line.
    """
    out: list[tuple[str, str]] = []
    if spec_bench is not None:
        for r in spec_bench_rows(spec_bench):
            if not is_held_out(int(r["question_id"])):
                out.append((f"specbench:{r['question_id']}", r["turns"][0]))
    for f in files:
        f = Path(f)
        for i, line in enumerate(f.read_text().splitlines()):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                r = json.loads(line)
                text = r.get("prompt") or r.get("text") or (r.get("turns") or [""])[0]
            else:
                text = line.strip()
            if text:
                out.append((f"{f.name}:{i}", text))
    return out


def held_out_questions(per_category: int | None = None, path: Path = SPEC_BENCH) -> list[dict]:
    rows = [r for r in spec_bench_rows(path) if is_held_out(int(r["question_id"]))]
    if per_category is None:
        return rows
    seen: Counter[str] = Counter()
    out = []
    for r in rows:
        if seen[r["category"]] < per_category:
            seen[r["category"]] += 1
            out.append(r)
    return out


# ---- batched generation ----------------------------------------------------------------------
class BatchDecoder:
    """A fixed number of slots decoding in lock-step over a padded KV cache (one SDPA per layer).

    Uses the stage's own weights and helpers; each slot has its own length, positions and mask.
    """

    def __init__(self, stage: Stage, slots: int, width: int):
        cfg = stage.cfg
        self.stage, self.slots, self.width = stage, slots, width
        shape = (stage.n_layers, slots, cfg.n_kv_heads, width, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=stage.dtype)
        self.v = torch.zeros(shape, dtype=stage.dtype)
        self.lens = torch.zeros(slots, dtype=torch.long)

    @torch.inference_mode()
    def load(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        """Prefill ``prompt`` into ``slot``; return its post-norm features (P, H)."""
        st = self.stage
        p = len(prompt)
        if p >= self.width:
            raise ValueError(f"prompt of {p} tokens does not fit a decoder of width {self.width}")
        cache = st.new_cache(p)
        feats = []
        for s in range(0, p, 512):
            ids = torch.tensor(prompt[s : s + 512])
            feats.append(st.final_norm(st.forward_one(st.embed(ids), cache, torch.arange(s, s + len(ids)))))
        self.k[:, slot, :, :p] = cache.k[:, :, :p]
        self.v[:, slot, :, :p] = cache.v[:, :, :p]
        self.lens[slot] = p
        return torch.cat(feats)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per slot at position ``lens[slot]``; returns post-norm features (slots, H)."""
        st, cfg = self.stage, self.stage.cfg
        nq, nkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pos = self.lens.clone()
        if int(pos.max()) >= self.width:
            raise ValueError("a slot ran past the decoder's width")
        n = self.slots
        rows = torch.arange(n)
        cos, sin = st._rope(pos)
        cos, sin = cos[:, None, :], sin[:, None, :]
        # attend over the whole (contiguous) width: slicing to the longest slot costs a copy per layer
        allowed = torch.arange(self.width)[None, :] <= pos[:, None]
        mask = torch.zeros(n, 1, 1, self.width, dtype=st.dtype).masked_fill_(
            ~allowed[:, None, None, :], torch.finfo(st.dtype).min
        )
        scale = 1.0 / math.sqrt(d)
        x = st.embed(tokens).to(st.dtype)
        for li, layer in enumerate(st.layers):
            h = rms_norm(x, layer.attn_norm, cfg.rms_eps)
            qkv = linear(h, layer.wqkv, layer.bqkv)
            q = rotate(qkv[:, : nq * d].view(n, nq, d), cos, sin)
            k = rotate(qkv[:, nq * d : (nq + nkv) * d].view(n, nkv, d), cos, sin)
            v = qkv[:, (nq + nkv) * d :].view(n, nkv, d)
            self.k[li, rows, :, pos] = k
            self.v[li, rows, :, pos] = v
            # one query row per slot: plain batched matmuls beat the CPU flash kernel by far here
            qg = q.view(n, nkv, nq // nkv, d)
            scores = torch.matmul(qg, self.k[li].transpose(-1, -2)) * scale + mask
            o = torch.matmul(torch.softmax(scores.float(), dim=-1).to(st.dtype), self.v[li])
            x = x + linear(o.reshape(n, nq * d), layer.wo)
            h = rms_norm(x, layer.ffn_norm, cfg.rms_eps)
            gate, up = linear(h, layer.w_gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.w_down)
        self.lens += 1
        return st.final_norm(x)


@dataclass
class Rollout:
    key: str
    tokens: list[int]  # prompt + answer
    prompt_len: int
    feats: torch.Tensor  # (len(tokens) - 1, H) post-norm features of every forwarded position
    finish: str


def batch_generate(
    stage: Stage,
    prompts: Sequence[tuple[str, list[int]]],
    *,
    max_new: int,
    slots: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    eos: Iterable[int] = (),
    on_done: Callable[[Rollout], None] | None = None,
    progress=None,
) -> list[Rollout]:
    """Answer every prompt (greedy or sampled), refilling slots as sequences finish."""
    eos = set(eos)
    if not prompts:
        return []
    gen = torch.Generator().manual_seed(seed)
    width = max(len(p) for _, p in prompts) + max_new + 2
    dec = BatchDecoder(stage, min(slots, len(prompts)), width)
    queue = list(prompts)
    state: list[dict | None] = [None] * dec.slots
    results: list[Rollout] = []

    def keep(f: torch.Tensor) -> torch.Tensor:
        return f if stage.dtype == torch.float32 else f.to(torch.float16)

    def pick(logits: torch.Tensor) -> list[int]:
        if temperature <= 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()

    def finish(b: int, reason: str) -> None:
        s = state[b]
        r = Rollout(s["key"], s["tokens"], s["plen"], torch.cat(s["feats"]), reason)
        results.append(r)
        if on_done:
            on_done(r)
        if progress is not None:
            progress.update(len(r.tokens) - r.prompt_len)
        state[b] = None

    def fill(b: int) -> None:
        while queue:
            key, ids = queue.pop(0)
            f = dec.load(b, ids)
            first = pick(stage.logits(f[-1:], normed=True))[0]
            state[b] = {"key": key, "tokens": [*ids, first], "plen": len(ids), "feats": [keep(f)], "new": 1}
            if first in eos or max_new <= 1:
                finish(b, "stop" if first in eos else "length")
                continue
            return
        dec.lens[b] = 0

    for b in range(dec.slots):
        fill(b)
    while any(s is not None for s in state):
        toks = torch.tensor([s["tokens"][-1] if s else 0 for s in state])
        for b, s in enumerate(state):
            if s is None:
                dec.lens[b] = 0
        feats = dec.step(toks)
        nxt = pick(stage.logits(feats, normed=True))
        for b, s in enumerate(state):
            if s is None:
                continue
            s["feats"].append(keep(feats[b : b + 1]))
            s["tokens"].append(nxt[b])
            s["new"] += 1
            if nxt[b] in eos or s["new"] >= max_new:
                finish(b, "stop" if nxt[b] in eos else "length")
                fill(b)
    return results


# ---- the data store --------------------------------------------------------------------------
class DataStore:
    """Shards of (tokens, features) plus ``progress.json``: what is done survives an interruption."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta_path = self.root / "progress.json"
        self.meta = (
            json.loads(self.meta_path.read_text())
            if self.meta_path.is_file()
            else {"done": [], "shards": [], "answer_tokens": 0, "prompt_tokens": 0, "sequences": 0, "gen_seconds": 0.0}
        )
        self._buf: list[Rollout] = []

    @property
    def done(self) -> set[str]:
        return set(self.meta["done"])

    def add(self, r: Rollout) -> None:
        self._buf.append(r)

    def flush(self, seconds: float = 0.0) -> None:
        from safetensors.torch import save_file

        if self._buf:
            name = f"shard-{len(self.meta['shards']):05d}.safetensors"
            toks = torch.tensor([t for r in self._buf for t in r.tokens], dtype=torch.int32)
            lens = torch.tensor([len(r.tokens) for r in self._buf], dtype=torch.int64)
            plens = torch.tensor([r.prompt_len for r in self._buf], dtype=torch.int64)
            feats = torch.cat([r.feats.to(torch.float16) for r in self._buf]).contiguous()
            tmp = self.root / (name + ".tmp")
            save_file({"tokens": toks, "lens": lens, "prompt_lens": plens, "feats": feats}, str(tmp))
            os.replace(tmp, self.root / name)
            self.meta["shards"].append(name)
            self.meta["done"] += [r.key for r in self._buf]
            self.meta["sequences"] += len(self._buf)
            self.meta["answer_tokens"] += sum(len(r.tokens) - r.prompt_len for r in self._buf)
            self.meta["prompt_tokens"] += sum(r.prompt_len for r in self._buf)
            self._buf = []
        self.meta["gen_seconds"] = round(self.meta["gen_seconds"] + seconds, 1)
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.meta_path)

    def sequences(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Every stored (tokens, features, prompt_len)."""
        from safetensors.torch import load_file

        out = []
        for name in self.meta["shards"]:
            sd = load_file(str(self.root / name))
            t0 = f0 = 0
            for n, p in zip(sd["lens"].tolist(), sd["prompt_lens"].tolist()):
                out.append((sd["tokens"][t0 : t0 + n].long(), sd["feats"][f0 : f0 + n - 1], p))
                t0 += n
                f0 += n - 1
        return out


def generate_data(
    stage: Stage,
    tok,
    store: DataStore,
    prompts: list[tuple[str, str]],
    *,
    target_tokens: int,
    max_new: int,
    slots: int,
    seed: int,
    eos: Sequence[int],
    chunk: int = 144,
    max_prompt: int = 1024,
) -> None:
    """Answer prompts until ``target_tokens`` answer tokens are stored (resumable)."""
    from tqdm import tqdm

    from models.text import encode_messages

    done = store.done
    todo = []
    for key, text in prompts:
        if key not in done:
            ids = encode_messages(tok, [{"role": "user", "content": text}])
            if len(ids) <= max_prompt:
                todo.append((key, ids))
    # chunks of similar prompt length keep the padded width tight; their order is shuffled
    todo.sort(key=lambda p: (len(p[1]), p[0]))
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    random.Random(seed).shuffle(chunks)
    have = store.meta["answer_tokens"]
    if have >= target_tokens or not todo:
        log(f"generation: {have} answer tokens stored ({store.meta['sequences']} sequences); nothing to do")
        return
    log(f"generation: {have} answer tokens stored, target {target_tokens}; {len(todo)} prompts left")
    bar = tqdm(total=target_tokens, initial=have, unit="tok", desc="generate", file=sys.stderr, smoothing=0.05)
    try:
        for ci, group in enumerate(chunks):
            if store.meta["answer_tokens"] >= target_tokens:
                break
            t0 = time.perf_counter()
            last = [t0]

            def on_done(r: Rollout, last=last) -> None:
                store.add(r)
                if time.perf_counter() - last[0] > 120:  # checkpoint every two minutes
                    now = time.perf_counter()
                    store.flush(now - last[0])
                    last[0] = now

            batch_generate(
                stage, group, max_new=max_new, slots=slots, seed=seed + ci, eos=eos, on_done=on_done, progress=bar
            )
            store.flush(time.perf_counter() - last[0])
    finally:
        bar.close()
    log(
        f"generation: {store.meta['answer_tokens']} answer + {store.meta['prompt_tokens']} prompt tokens in "
        f"{store.meta['sequences']} sequences ({store.meta['gen_seconds']:.0f} s)"
    )


# ---- training --------------------------------------------------------------------------------
def choose_vocab(seqs, size: int, always: Iterable[int] = ()) -> tuple[torch.Tensor, float]:
    """The ``size`` most frequent answer tokens (plus ``always``; then prompt tokens if the answers have
    fewer distinct ones), and the answer-token coverage."""
    counts: Counter[int] = Counter()
    prompt_counts: Counter[int] = Counter()
    for toks, _, plen in seqs:
        counts.update(toks[plen:].tolist())
        prompt_counts.update(toks[:plen].tolist())
    ranked = [*always, *(t for t, _ in counts.most_common()), *(t for t, _ in prompt_counts.most_common())]
    ids = list(dict.fromkeys(ranked))[:size]
    total = sum(counts.values())
    covered = sum(counts[t] for t in ids)
    return torch.tensor(sorted(ids)), covered / max(total, 1)


@dataclass
class TrainConfig:
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


def make_batches(seqs, tc: TrainConfig, epoch: int) -> list[list[int]]:
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


def collate(seqs, idx: list[int], tc: TrainConfig):
    """Padded (tokens t+1, features t, target features t+1, loss weights) with the window's tail kept."""
    items = []
    for i in idx:
        toks, feats, plen = seqs[i]
        n = len(toks)
        s = max(0, n - tc.max_len)
        items.append((toks[s:], feats[s:], plen - s))
    t = max(len(x[0]) for x in items) - 2  # rows t=0..n-3: input (tok t+1, f_t), target f_{t+1}
    b = len(items)
    h = items[0][1].shape[1]
    nxt = torch.zeros(b, t, dtype=torch.long)
    fin = torch.zeros(b, t, h)
    ftg = torch.zeros(b, t, h)
    w = torch.zeros(b, t)
    for j, (toks, feats, plen) in enumerate(items):
        r = len(toks) - 2
        nxt[j, :r] = toks[1 : r + 1]
        fin[j, :r] = feats[:r].float()
        ftg[j, :r] = feats[1 : r + 1].float()
        # a row predicts the token after position t+1; answer positions start at plen - 1
        w[j, :r] = tc.prompt_weight
        w[j, max(0, plen - 2) : r] = 1.0
    return nxt, fin, ftg, w


def train_head(
    head, target: Stage, seqs, tc: TrainConfig, ckpt: Path, *, lm_rows: torch.Tensor, log_every: int = 20
) -> dict:
    """Train ``head`` in place; resumes from ``ckpt``; returns the loss history and timing."""
    from tqdm import tqdm

    torch.manual_seed(tc.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.95))
    per_epoch = [make_batches(seqs, tc, e) for e in range(tc.epochs)]
    total = sum(len(b) for b in per_epoch)
    warm = max(1, min(100, total // 20))

    def lr_at(step: int) -> float:
        if step < warm:
            return tc.lr * (step + 1) / warm
        return tc.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))

    state = {"step": 0, "history": [], "seconds": 0.0}
    if ckpt.is_file():
        saved = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        if saved.get("total") == total:
            head.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            state = saved["state"]
            log(f"training: resumed at step {state['step']}/{total}")
        else:
            log("training: checkpoint is for a different data set or schedule; starting over")

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": head.state_dict(), "opt": opt.state_dict(), "state": state, "total": total}, str(tmp))
        os.replace(tmp, ckpt)

    embed = target.embed_w.float()
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
            nxt, fin, ftg, w = collate(seqs, idx, tc)
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
            if acc["n"] >= log_every or step + 1 == total:
                row = {k: round(v / acc["n"], 4) for k, v in acc.items() if k != "n"}
                row.update(step=step + 1, epoch=epoch, lr=round(lr_at(step), 6), seconds=round(state["seconds"], 1))
                state["history"].append(row)
                bar.set_postfix(loss=row["loss"], top1=row.get("top1_1"))
                acc = Counter()
            if now - last_ckpt > tc.checkpoint_seconds:
                save()
                last_ckpt = now
    finally:
        bar.close()
        save()
    head.eval()
    return state


# ---- held-out evaluation ---------------------------------------------------------------------
def simulate(drafter, r: Rollout, *, top_k: int, depth: int, pool: int, nodes: int) -> list[int]:
    """Tokens emitted per round when verifying ``nodes`` best drafted nodes against rollout ``r``.

    Exact for greedy decoding, and for tree rejection sampling given the sampled continuation:
    a drafted child is accepted iff it is the token the target emits.
    """
    plen = r.prompt_len
    ctx = list(r.tokens[: plen + 1])
    drafter.reset(list(r.tokens[:plen]))
    drafter.accept(ctx, r.feats[:plen])
    per_round = []
    total = len(r.tokens)
    while len(ctx) < total:
        tree = drafter.draft(ctx, top_k=top_k, depth=depth, max_nodes=pool)
        tree = tree.best(nodes)
        node, a = 0, 0
        while len(ctx) + a < total:
            c = tree.child_with_token(node, r.tokens[len(ctx) + a])
            if c is None:
                break
            node, a = c, a + 1
        emitted = min(a + 1, total - len(ctx))
        base = len(ctx) - 1
        ctx = list(r.tokens[: len(ctx) + emitted])
        per_round.append(emitted)
        drafter.accept(ctx, r.feats[base : len(ctx) - 1])
    return per_round


def held_out_rollouts(
    stage: Stage,
    tok,
    questions: list[dict],
    *,
    max_new: int,
    temperature: float,
    seed: int,
    eos: Sequence[int],
    slots: int,
    cache: Path | None = None,
) -> list[Rollout]:
    """Reference continuations of held-out questions (cached on disk: evaluation, never training)."""
    from models.text import encode_messages

    if cache is not None and cache.is_file():
        saved = torch.load(str(cache), map_location="cpu", weights_only=False)
        return [Rollout(**d) for d in saved]
    prompts = [
        (str(q["question_id"]), encode_messages(tok, [{"role": "user", "content": q["turns"][0]}])) for q in questions
    ]
    rolls = batch_generate(stage, prompts, max_new=max_new, slots=slots, temperature=temperature, seed=seed, eos=eos)
    order = {k: i for i, (k, _) in enumerate(prompts)}
    rolls.sort(key=lambda r: order[r.key])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save([r.__dict__ for r in rolls], str(cache))
    return rolls


DRAFT_SETTINGS = {
    "chain": dict(top_k=1, depth=8, pool=8, nodes=8),
    "tree16": dict(top_k=8, depth=8, pool=128, nodes=16),
    "tree32": dict(top_k=8, depth=8, pool=128, nodes=32),
    "tree64": dict(top_k=8, depth=10, pool=160, nodes=64),
}


def evaluate_acceptance(
    drafters: dict, rolls: list[Rollout], categories: dict[str, str], settings: Sequence[str] = tuple(DRAFT_SETTINGS)
) -> dict:
    """Mean tokens per round, overall and per category, for each drafter x tree setting."""
    out: dict = {}
    for dname, drafter in drafters.items():
        for sname in settings:
            per_cat: dict[str, list[int]] = {}
            t0 = time.perf_counter()
            for r in rolls:
                rounds = simulate(drafter, r, **DRAFT_SETTINGS[sname])
                per_cat.setdefault(categories[r.key], []).extend(rounds)
            allr = [x for v in per_cat.values() for x in v]
            out[f"{dname}/{sname}"] = {
                "mean_accepted": round(sum(allr) / max(len(allr), 1), 3),
                "rounds": len(allr),
                "draft_seconds": round(time.perf_counter() - t0, 2),
                "per_category": {c: round(sum(v) / len(v), 3) for c, v in sorted(per_cat.items())},
            }
            log(f"eval {dname}/{sname}: {out[f'{dname}/{sname}']['mean_accepted']}")
    return out


# ---- the command -----------------------------------------------------------------------------
def train_draft(
    *,
    model: str = "default",
    out: str | Path,
    prompts: Sequence[str] = (),
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
    """``meshd train-draft``: generate (resumable), train (resumable), evaluate, write the head + report."""
    from models.eagle import EagleDrafter, EagleHead, HeadConfig, save_head
    from models.source import ModelSource
    from models.text import stop_ids

    t_start = time.perf_counter()
    src = ModelSource.resolve(model)
    fp = src.fingerprint
    work = Path(work) if work else Path(os.path.expanduser("~/.cache/meshd/train-draft")) / fp
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out)
    log(f"target {src.name} ({fp}); work dir {work}; head -> {out}")
    target = Stage.load(src, dtype=dtype)
    tok = src.load_tokenizer()
    eos = stop_ids(tok, target.cfg)
    store = DataStore(work / "data")

    all_prompts = training_prompts(prompts)
    generate_data(
        target, tok, store, all_prompts, target_tokens=tokens, max_new=max_new, slots=slots, seed=seed, eos=eos
    )
    if generate_only:
        return {"data": store.meta}
    seqs = store.sequences()
    ids, coverage = choose_vocab(seqs, vocab, always=eos)
    log(f"data: {len(seqs)} sequences; draft vocabulary {len(ids)} covers {coverage:.1%} of answer tokens")

    hc = HeadConfig.for_target(target.cfg, draft_vocab_size=len(ids), target_fingerprint=fp, target_name=src.name)
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
            "config": {k: v for k, v in tc.__dict__.items()},
            "loss_curve": state["history"],
        },
    }
    save_head(head, out, report)

    if eval_per_category > 0:
        from models.drafters import NGramDrafter
        from models.eagle import load_head

        questions = held_out_questions(eval_per_category)
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
            cache=work / f"heldout-{eval_per_category}-{eval_tokens}-t0-{dtype}.pt",
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


def engine_speed(
    target: Stage,
    source,
    tok,
    questions: list[dict],
    drafters: dict,
    *,
    max_new: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Tokens/s and tokens/round through the real engine, modes interleaved per prompt (same machine, same run)."""
    from models.budget import CostCurve, TreeBudget
    from models.engine import generate
    from models.profile import stage_cost_curve
    from models.text import encode_messages, stop_ids
    from models.verify import Sampling

    curve = CostCurve(stage_cost_curve(source, target, with_head=True))
    eos = stop_ids(tok, target.cfg)
    modes = {"ar": None, **drafters}
    keys = ("tokens", "seconds", "rounds", "verified", "round_tokens")
    acc: dict[str, dict] = {m: dict.fromkeys(keys, 0) for m in modes}
    for qi, q in enumerate(questions):
        prompt = encode_messages(tok, [{"role": "user", "content": q["turns"][0]}])
        for m, d in modes.items():
            res = generate(
                target,
                prompt,
                max_new_tokens=max_new,
                mode="ar" if d is None else "spec",
                drafter=d,
                sampling=Sampling(temperature),
                seed=seed + qi,
                eos_ids=eos,
                budget=None if d is None else TreeBudget(curve),
            )
            a = acc[m]
            a["tokens"] += res.stats.new_tokens
            a["seconds"] += res.stats.seconds
            a["rounds"] += res.stats.rounds
            a["round_tokens"] += sum(res.stats.per_round)
            a["verified"] += res.stats.verified_nodes
    out = {}
    for m, a in acc.items():
        out[m] = {
            "tokens_per_s": round(a["tokens"] / a["seconds"], 2),
            "mean_accepted": round(a["round_tokens"] / a["rounds"], 3),
            "mean_verified_nodes": round(a["verified"] / a["rounds"], 1) if m != "ar" else 1.0,
            "tokens": a["tokens"],
            "seconds": round(a["seconds"], 1),
        }
    base = out["ar"]["tokens_per_s"]
    for m in out:
        out[m]["speedup_vs_ar"] = round(out[m]["tokens_per_s"] / base, 3)
    return {
        "dtype": str(target.dtype),
        "questions": len(questions),
        "max_new": max_new,
        "temperature": temperature,
        "cost_curve_ms": {t: round(s * 1e3, 2) for t, s in curve.to_dict().items()},
        "modes": out,
    }


def evaluate_main(argv: Sequence[str] | None = None) -> dict:
    """``python -m training.distill --head DIR``: held-out acceptance (replay) and engine speed; JSON to --out."""
    import argparse

    from models.drafters import MergedDrafter, NGramDrafter
    from models.eagle import EagleDrafter, load_head
    from models.source import ModelSource
    from models.text import stop_ids

    p = argparse.ArgumentParser(prog="python -m training.distill")
    p.add_argument("--model", default="default")
    p.add_argument("--head", required=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--per-category", type=int, default=5)
    p.add_argument("--t1-per-category", type=int, default=2)
    p.add_argument("--speed-per-category", type=int, default=1)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--slots", type=int, default=48)
    p.add_argument("--work", default=None)
    p.add_argument("--drafters", default="eagle,ngram,eagle+ngram", help="which drafters' acceptance to replay")
    p.add_argument("--settings", default=",".join(DRAFT_SETTINGS), help="tree settings to replay")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    src = ModelSource.resolve(a.model)
    work = Path(a.work) if a.work else Path(os.path.expanduser("~/.cache/meshd/train-draft")) / src.fingerprint
    target = Stage.load(src, dtype=a.dtype)
    tok = src.load_tokenizer()
    eos = stop_ids(tok, target.cfg)
    head = load_head(a.head, target.cfg, src.fingerprint)
    eagle = EagleDrafter(head, target)
    drafters = {"eagle": eagle, "ngram": NGramDrafter(), "eagle+ngram": MergedDrafter([eagle.fresh(), NGramDrafter()])}
    report: dict = {"head": str(a.head), "dtype": str(target.dtype)}
    for temp, per in ((0.0, a.per_category), (1.0, a.t1_per_category)):
        if per <= 0:
            continue
        qs = held_out_questions(per)
        cats = {str(q["question_id"]): q["category"] for q in qs}
        rolls = held_out_rollouts(
            target,
            tok,
            qs,
            max_new=a.max_new,
            temperature=temp,
            seed=0,
            eos=eos,
            slots=a.slots,
            cache=work / f"heldout-{per}-{a.max_new}-t{temp:g}-{a.dtype}.pt",
        )
        log(f"held-out rollouts T={temp:g}: {len(rolls)} prompts")
        chosen = {k: v for k, v in drafters.items() if k in a.drafters.split(",")}
        res = evaluate_acceptance(chosen, rolls, cats, settings=a.settings.split(","))
        report[f"acceptance_T{temp:g}"] = {"questions": len(qs), "results": res}
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    if a.speed_per_category > 0:
        qs = held_out_questions(a.speed_per_category)
        report["engine_speed_T0"] = engine_speed(
            target,
            src,
            tok,
            qs,
            {
                "ngram": NGramDrafter(),
                "eagle": eagle.fresh(),
                "eagle+ngram": MergedDrafter([eagle.fresh(), NGramDrafter()]),
            },
            max_new=a.max_new,
        )
        log(f"engine speed: {json.dumps(report['engine_speed_T0']['modes'])}")
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    evaluate_main()
