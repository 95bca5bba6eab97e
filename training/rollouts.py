"""The target's own answers to training prompts, with its post-norm feature at every position.

:func:`batch_generate` decodes many prompts together through a padded batched decoder (one
attention per layer for all slots, finished slots refilled at once); :class:`DataStore` keeps
finished sequences in shards with ``progress.json`` listing the prompts done, so a cut-off run
loses at most the sequences in flight; :func:`generate_data` runs it until enough answer tokens
are stored.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.cache import cache_dir
from models.kvcache import KVCache
from models.layers import decoder_layer, float_mask
from models.stage import Stage
from models.text import encode_messages
from models.verify import Draws, draw, mixed_seed
from training.log import log
from training.prompts import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def work_dir(fingerprint: str, given: str | Path | None = None) -> Path:
    """Where a target's generated data, checkpoints and held-out rollouts live (``given`` overrides)."""
    return Path(given) if given else cache_dir("train-draft", fingerprint)


class BatchDecoder:
    """A fixed number of slots decoding in lock-step over a padded KV cache (one attention per layer).

    Uses the stage's own weights and layer; each slot has its own length, positions and mask.
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
        feats = prefill_features(st, prompt, cache)
        self.k[:, slot, :, :p] = cache.k[:, :, :p]
        self.v[:, slot, :, :p] = cache.v[:, :, :p]
        self.lens[slot] = p
        return feats

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
        cos, sin = st.rope(pos, st.dtype)
        # attend over the longest slot's length, not the whole width, while that is much shorter: a slice
        # of the cache is copied per layer, which costs more than it saves once the slots are long
        span = int(pos.max()) + 1
        span = span if 2 * span <= self.width else self.width
        mask = float_mask(torch.arange(span)[None, :] <= pos[:, None], st.dtype)[:, None, None, :]
        scale = 1.0 / math.sqrt(d)

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Slot i's one row (row i of q/k/v) over slot i's cache row; q (nq, slots, d)."""
            self.k[li, rows, :, pos] = k.transpose(0, 1)
            self.v[li, rows, :, pos] = v.transpose(0, 1)
            # one query row per slot: plain batched matmuls beat the CPU flash kernel by far here
            qg = q.transpose(0, 1).reshape(n, nkv, nq // nkv, d)
            scores = torch.matmul(qg, self.k[li, :, :, :span].transpose(-1, -2)) * scale + mask
            o = torch.matmul(torch.softmax(scores.float(), dim=-1).to(st.dtype), self.v[li, :, :, :span])
            return o.reshape(n, nq, d).transpose(0, 1)

        x = st.embed(tokens).to(st.dtype)
        for li, layer in enumerate(st.layers):
            x = decoder_layer(layer, x, cfg, cos, sin, lambda q, k, v, li=li: attend(li, q, k, v))
        self.lens += 1
        return st.final_norm(x)


TOKENS_FORMAT = "meshd-rollout-tokens-1"


def features_label(target: Stage) -> str:
    """The numerics a target's features come from, e.g. ``dense-bfloat16`` or ``int4a8-float32``."""
    return f"{target.weights}-{str(target.dtype).removeprefix('torch.')}"


def data_dir_name(target: Stage) -> str:
    """The work dir's data directory for this target's features: ``data`` for dense weights (where
    every store was before weight formats), ``data-FORMAT`` for quantized ones, so features of
    different numerics never mix in one training set."""
    return "data" if target.weights == "dense" else f"data-{target.weights}"


def feature_dtype(stage: Stage) -> torch.dtype:
    """How features are kept: fp16 (half the memory of fp32) unless the target itself runs in fp32."""
    return torch.float32 if stage.dtype == torch.float32 else torch.float16


@torch.inference_mode()
def prefill_features(stage: Stage, ids: Sequence[int], cache: KVCache, chunk: int = 512) -> torch.Tensor:
    """Post-norm features of every position of ``ids``, prefilled into ``cache`` in chunks."""
    out = []
    for s in range(0, len(ids), chunk):
        part = torch.tensor(ids[s : s + chunk])
        h = stage.forward_one(stage.embed(part), cache, torch.arange(s, s + len(part)))
        out.append(stage.final_norm(h))
    return torch.cat(out)


@dataclass
class Rollout:
    """One prompt answered by the target, with the features a draft head learns from."""

    key: str
    tokens: list[int]  # prompt + answer
    prompt_len: int
    feats: torch.Tensor  # (len(tokens) - 1, H) post-norm features of every forwarded position
    finish: str


def rollout_draws(seed: int, key: str) -> Draws:
    """The noise a sampled rollout of prompt ``key`` is drawn with when :func:`batch_generate` is given
    ``keyed_noise``: noise by position, as a serving request's (models/verify.py), so a replay can rank drafts
    with it as a coupled drafter does (:func:`training.evaluate.replay_rounds`)."""
    return Draws(mixed_seed(seed, key))


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
    progress: tqdm | None = None,
    stop: Callable[[], bool] | None = None,
    enough: Callable[[], bool] | None = None,
    keyed_noise: bool = False,
) -> list[Rollout]:
    """Answer every prompt (greedy or sampled), refilling slots as sequences finish.

    ``stop`` (a time budget's test) is asked before every decoding step and every prefill: once it
    answers true, the finished rollouts are returned and those still in flight are dropped (unfinished answers would
    teach the head truncated text; a resumed run answers those prompts again). ``enough`` (the data
    target's test) is asked before every prefill: once true, no prompt starts and those in flight finish.
    ``keyed_noise`` samples each answer with :func:`rollout_draws` (a serving request's noise, by position)
    instead of one generator for the batch: slower per token, but a replay can couple drafts to it."""
    eos = set(eos)
    if not prompts:
        return []
    gen = torch.Generator().manual_seed(seed)
    width = max(len(p) for _, p in prompts) + max_new + 2
    # long prompts get fewer slots: every step reads every slot's whole cache, and a smaller batch keeps
    # the step's temporaries small (64k cached positions per layer at most)
    slots = min(slots, len(prompts), max(4, 65536 // width))
    dec = BatchDecoder(stage, slots, width)
    queue = list(prompts)
    state: list[dict | None] = [None] * dec.slots
    results: list[Rollout] = []

    def keep(f: torch.Tensor) -> torch.Tensor:
        return f.to(feature_dtype(stage))

    noise: dict[str, Draws] = {}

    def pick(logits: torch.Tensor, at: Sequence[tuple[str, int] | None]) -> list[int]:
        """The next token of each row; ``at``: the row's prompt key and the position it samples (None: idle)."""
        if temperature <= 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / temperature, dim=-1)
        if not keyed_noise:
            return torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()
        out = []
        for row, where in zip(probs, at):
            if where is None:
                out.append(0)
                continue
            key, pos = where
            if key not in noise:
                noise[key] = rollout_draws(seed, key)
            d = noise[key]
            out.append(draw(row, d.exponential(pos, len(row))))
        return out

    def finish(b: int, reason: str) -> None:
        s = state[b]
        r = Rollout(s["key"], s["tokens"], s["plen"], torch.cat(s["feats"]), reason)
        results.append(r)
        noise.pop(r.key, None)
        if on_done:
            on_done(r)
        if progress is not None:
            progress.update(len(r.tokens) - r.prompt_len)
        state[b] = None

    def fill(b: int) -> None:
        # a prefill after the budget ran out is wasted; one after the target was reached is not needed
        while queue and not (stop is not None and stop()) and not (enough is not None and enough()):
            key, ids = queue.pop(0)
            f = dec.load(b, ids)
            first = pick(stage.logits(f[-1:], normed=True), [(key, len(ids))])[0]
            state[b] = {"key": key, "tokens": [*ids, first], "plen": len(ids), "feats": [keep(f)], "new": 1}
            if first in eos or max_new <= 1:
                finish(b, "stop" if first in eos else "length")
                continue
            return
        dec.lens[b] = 0

    for b in range(dec.slots):
        fill(b)
    while any(s is not None for s in state):
        if stop is not None and stop():
            break
        toks = torch.tensor([s["tokens"][-1] if s else 0 for s in state])
        for b, s in enumerate(state):
            if s is None:
                dec.lens[b] = 0
        feats = dec.step(toks)
        nxt = pick(stage.logits(feats, normed=True), [(s["key"], len(s["tokens"])) if s else None for s in state])
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
        if self._buf:
            feats = torch.cat([r.feats.to(torch.float16) for r in self._buf]).contiguous()
            self._write_shard([r.tokens for r in self._buf], [r.prompt_len for r in self._buf], feats)
            self.meta["done"] += [r.key for r in self._buf]
            self._count([(len(r.tokens), r.prompt_len) for r in self._buf])
            self._buf = []
        self.meta["gen_seconds"] = round(self.meta["gen_seconds"] + seconds, 1)
        self._save_meta()

    def _write_shard(self, tokens: list[list[int]], prompt_lens: list[int], feats: torch.Tensor | None) -> None:
        """A new shard of these sequences; without ``feats`` until :meth:`fill_features` adds them."""
        name = f"shard-{len(self.meta['shards']):05d}.safetensors"
        tensors = {
            "tokens": torch.tensor([t for ts in tokens for t in ts], dtype=torch.int32),
            "lens": torch.tensor([len(ts) for ts in tokens], dtype=torch.int64),
            "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int64),
        }
        if feats is not None:
            tensors["feats"] = feats
        self._save_shard(name, tensors)
        self.meta["shards"].append(name)

    def _save_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard file ``name`` whole or not at all (a temporary file renamed into place)."""
        tmp = self.root / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.root / name)

    def _count(self, sizes: list[tuple[int, int]]) -> None:
        """Add sequences of (length, prompt length) to the totals."""
        self.meta["sequences"] += len(sizes)
        self.meta["answer_tokens"] += sum(n - p for n, p in sizes)
        self.meta["prompt_tokens"] += sum(p for _, p in sizes)

    def _save_meta(self) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.meta_path)

    def answered(self) -> list[tuple[str, list[int], int]]:
        """Every stored (prompt key, tokens, prompt length), without the features."""
        out = []
        keys = iter(self.meta["done"])
        for name in self.meta["shards"]:
            with safe_open(str(self.root / name), "pt") as f:
                toks, lens, plens = (f.get_tensor(k).tolist() for k in ("tokens", "lens", "prompt_lens"))
            t0 = 0
            for n, p in zip(lens, plens):
                out.append((next(keys), toks[t0 : t0 + n], p))
                t0 += n
        return out

    def save_tokens(self, path: Path, fingerprint: str, max_new: int) -> int:
        """Write every stored sequence's token ids (no features) to ``path``, compressed: what must last
        of hours of generation, small enough for a repository (uint16 ids, compressed: 0.9 MB for the
        1.4M tokens of the embedded model's data). Returns the sequence count; :meth:`load_tokens`
        rebuilds the store from the file."""
        rows = self.answered()
        toks = np.array([t for _, ts, _ in rows for t in ts], dtype=np.uint32)
        dtype = np.uint16 if toks.size == 0 or int(toks.max()) < 2**16 else np.uint32
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                tokens=toks.astype(dtype),
                lens=np.array([len(ts) for _, ts, _ in rows], dtype=np.int32),
                prompt_lens=np.array([p for _, _, p in rows], dtype=np.int32),
                keys=np.array(json.dumps([k for k, _, _ in rows])),
                meta=np.array(json.dumps({"fingerprint": fingerprint, "max_new": max_new, "format": TOKENS_FORMAT})),
            )
        os.replace(tmp, path)
        return len(rows)

    def load_tokens(self, path: Path, fingerprint: str) -> int:
        """Add the sequences of a :meth:`save_tokens` file not stored yet, as token ids only: their
        features are made later by :meth:`fill_features`, when training needs them, so answering new
        prompts does not wait for a prefill of everything stored (52 minutes for 1.4M tokens on a CPU
        without fast bf16). Refuses a file made for another target. Returns how many were added."""
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{path} holds answers of target {meta.get('fingerprint')}, not of {fingerprint}: "
                    "its token ids mean nothing for this model; pass the file made for this one or none"
                )
            toks, lens, plens = z["tokens"].astype(np.int64), z["lens"].tolist(), z["prompt_lens"].tolist()
            keys = json.loads(str(z["keys"]))
        done, starts = self.done, np.cumsum([0, *lens])
        todo = [i for i, k in enumerate(keys) if k not in done]
        for s in range(0, len(todo), 1000):  # shards of 1,000 sequences: one prefill checkpoint each later
            part = todo[s : s + 1000]
            self._write_shard([toks[starts[i] : starts[i + 1]].tolist() for i in part], [plens[i] for i in part], None)
            self.meta["done"] += [keys[i] for i in part]
            self._count([(lens[i], plens[i]) for i in part])
        self._save_meta()
        if todo:
            log(f"data: {len(todo)} sequences' token ids from {path} (features made when training needs them)")
        return len(todo)

    def fill_features(
        self,
        stage: Stage,
        answer_tokens: int | None = None,
        progress: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Make the features of the stored sequences that have none (loaded by :meth:`load_tokens`), one
        prefill each, a shard at a time (an interruption keeps the shards done). ``answer_tokens``: only
        the shards needed for the first that many answer tokens in store order (what
        ``first_answer_tokens`` trains on). ``stop`` (a time budget's or a signal's test) is asked before
        every sequence: once true, the shard in progress is split in two, the sequences done with their
        features and the rest as token ids for a later run, so no prefill is lost. Returns how many
        sequences got features."""
        need, filled = self.without_features(answer_tokens), 0
        if not need:
            return 0
        total = sum(n for _, n in need)
        bar = tqdm(total=total, unit="tok", desc="features", file=sys.stderr, disable=not progress)
        t0, made = time.perf_counter(), 0
        for name, _ in need:
            sd = load_file(str(self.root / name))
            t, feats = 0, []
            for n in sd["lens"].tolist():
                if stop is not None and stop():
                    break
                ids = sd["tokens"][t : t + n].tolist()
                feats.append(prefill_features(stage, ids[:-1], stage.new_cache(n)).to(torch.float16))
                t += n
                made += n
                bar.update(n)
            filled += len(feats)
            if len(feats) < len(sd["lens"]):
                if feats:
                    self._split_shard(name, sd, len(feats), torch.cat(feats))
                break
            self._save_shard(name, {**sd, "feats": torch.cat(feats)})
        bar.close()
        took = time.perf_counter() - t0
        left = sum(n for _, n in self.without_features(answer_tokens))
        log(
            f"data: features of {filled} stored sequences by prefill in {took:.0f} s ({made / max(took, 1e-9):.0f} "
            "tokens/s)" + (f"; stopped with {left} tokens still without (a rerun makes them)" if left else "")
        )
        return filled

    def _split_shard(self, name: str, sd: dict[str, torch.Tensor], done: int, feats: torch.Tensor) -> None:
        """Replace token-only shard ``name`` by two: its first ``done`` sequences with ``feats`` (theirs, in
        order) and the rest still token ids. Both are new files, written before the shard list names them
        (one atomic write), so a crash in between leaves at most a file nothing lists."""
        lens, plens = sd["lens"], sd["prompt_lens"]
        cut = int(lens[:done].sum())
        parts = [
            {"tokens": sd["tokens"][:cut], "lens": lens[:done], "prompt_lens": plens[:done], "feats": feats},
            {"tokens": sd["tokens"][cut:], "lens": lens[done:], "prompt_lens": plens[done:]},
        ]
        names = []
        for part in parts:
            self.meta["split_shards"] = self.meta.get("split_shards", 0) + 1
            new = f"shard-split-{self.meta['split_shards']:05d}.safetensors"
            self._save_shard(new, part)
            names.append(new)
        at = self.meta["shards"].index(name)
        self.meta["shards"][at : at + 1] = names
        self._save_meta()
        (self.root / name).unlink()

    def without_features(self, answer_tokens: int | None = None) -> list[tuple[str, int]]:
        """(name, tokens) of the shards :meth:`_prefix_shards` names that hold token ids only."""
        out = []
        for name in self._prefix_shards(answer_tokens):
            with safe_open(str(self.root / name), "pt") as f:
                if "feats" not in set(f.keys()):
                    out.append((name, int(f.get_tensor("lens").sum())))
        return out

    def sequences(
        self, answer_tokens: int | None = None, made_only: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Every stored (tokens, features, prompt_len), or the shards that hold the first ``answer_tokens``
        answer tokens; :meth:`fill_features` first if any were loaded as token ids only, or ``made_only``
        to leave those out (what a run whose prefill was cut short trains on)."""
        out: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        for name in self._prefix_shards(answer_tokens):
            sd = load_file(str(self.root / name))
            if "feats" not in sd and made_only:
                continue
            if "feats" not in sd:
                raise ValueError(
                    f"{self.root / name} holds token ids without features: call fill_features(stage) first"
                )
            t0 = f0 = 0
            for n, p in zip(sd["lens"].tolist(), sd["prompt_lens"].tolist()):
                out.append((sd["tokens"][t0 : t0 + n].long(), sd["feats"][f0 : f0 + n - 1], p))
                t0 += n
                f0 += n - 1
        return out

    def _prefix_shards(self, answer_tokens: int | None) -> list[str]:
        """The shards, in store order, that hold the first ``answer_tokens`` answer tokens (all when None):
        what :meth:`fill_features` fills and :meth:`sequences` reads for ``first_answer_tokens``."""
        names, have = [], 0
        for name in self.meta["shards"]:
            if answer_tokens is not None and have >= answer_tokens:
                break
            names.append(name)
            if answer_tokens is not None:
                with safe_open(str(self.root / name), "pt") as f:
                    have += int((f.get_tensor("lens") - f.get_tensor("prompt_lens")).sum())
        return names


def generate_data(
    stage: Stage,
    tok: PreTrainedTokenizerBase,
    store: DataStore,
    prompts: list[tuple[str, Prompt]],
    *,
    target_tokens: int,
    max_new: int,
    slots: int,
    seed: int,
    eos: Sequence[int],
    chunk: int | None = None,
    max_prompt: int = 1024,
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Answer prompts until ``target_tokens`` answer tokens are stored (resumable); ``stop`` (a time
    budget's test) ends it early, keeping every finished answer. Returns whether ``stop`` cut it short."""
    done = store.done
    todo = []
    for key, text in prompts:
        if key not in done:
            ids = encode_messages(tok, [{"role": "user", "content": text}] if isinstance(text, str) else text)
            if len(ids) <= max_prompt:
                todo.append((key, ids))
    # chunks of similar prompt length keep the padded width tight; their order is shuffled
    todo.sort(key=lambda p: (len(p[1]), p[0]))
    # a chunk's slots drain while its longest answers finish, so a chunk holds several rounds of slots
    chunk = chunk or 6 * slots
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    random.Random(seed).shuffle(chunks)
    have = store.meta["answer_tokens"]
    if have >= target_tokens or not todo:
        log(f"generation: {have} answer tokens stored ({store.meta['sequences']} sequences); nothing to do")
        return False
    log(f"generation: {have} answer tokens stored, target {target_tokens}; {len(todo)} prompts left")
    bar = tqdm(total=target_tokens, initial=have, unit="tok", desc="generate", file=sys.stderr, smoothing=0.05)
    cut = False
    made = [have]  # answer tokens stored or finished in this run, counted as each answer ends
    try:
        for ci, group in enumerate(chunks):
            if store.meta["answer_tokens"] >= target_tokens:
                break
            if stop is not None and stop():
                cut = True
                break
            t0 = time.perf_counter()
            last = [t0]

            def on_done(r: Rollout, last=last) -> None:
                store.add(r)
                made[0] += len(r.tokens) - r.prompt_len
                if time.perf_counter() - last[0] > 120:  # checkpoint every two minutes
                    now = time.perf_counter()
                    store.flush(now - last[0])
                    last[0] = now

            batch_generate(
                stage,
                group,
                max_new=max_new,
                slots=slots,
                seed=seed + ci,
                eos=eos,
                on_done=on_done,
                progress=bar,
                stop=stop,
                enough=lambda: made[0] >= target_tokens,
            )
            store.flush(time.perf_counter() - last[0])
            if stop is not None and stop():
                cut = store.meta["answer_tokens"] < target_tokens
                break
    finally:
        bar.close()
    log(
        f"generation: {store.meta['answer_tokens']} answer + {store.meta['prompt_tokens']} prompt tokens in "
        f"{store.meta['sequences']} sequences ({store.meta['gen_seconds']:.0f} s)"
        + (f"; stopped short of {target_tokens} (a rerun continues)" if cut else "")
    )
    return cut
