"""Cost curves: how long a forward over T tokens takes on this device, for a given layer range.

:func:`forward_times` is the one measurement; the tree budget's curve (:func:`stage_cost_curve`,
wall time, cached on disk because the budget needs it at every start-up and measuring takes a
few seconds on a slow board) and the simulator's device profiles (CPU time, one thread) both
come from it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from models import q4a8
from models.cache import cache_dir
from models.layers import causal_mask, dense, float_mask
from models.ranges import LayerRange
from models.source import ModelSource
from models.stage import Stage

SIZES = (1, 2, 4, 8, 16, 32, 64)

WALK_ROWS = 2
"""Rows of a tree whose logits a verification walk computes, for the cost curve of a stage whose
quantized LM head works row by row (:meth:`models.stage.Stage.logits_by_row`): the accepted path
plus the bonus, ~2 at today's acceptance. Charging all T rows made the budget pick trees of 1-3 nodes."""

Clock = Literal["wall", "cpu"]
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
"""``wall``: what a user waits for. ``cpu``: this thread's CPU time, which other jobs on a shared
machine only delay without adding to it (meaningful with one torch thread)."""


def _median_seconds(
    run: Callable[[], object], repeats: int, clock: Clock, setup: Callable[[], object] | None = None
) -> float:
    """Median time of ``run`` over ``repeats`` calls, after one untimed warm-up; ``setup`` runs untimed before each."""
    now = CLOCKS[clock]
    times = []
    for _ in range(repeats + 1):
        if setup is not None:
            setup()
        t0 = now()
        run()
        times.append(now() - t0)
    return statistics.median(times[1:])


@torch.inference_mode()
def forward_times(
    stage: Stage,
    sizes: Sequence[int] = SIZES,
    *,
    context: int = 128,
    repeats: int = 3,
    clock: Clock = "wall",
    layers: bool = True,
    lm_head: bool = False,
    lm_rows: int | None = None,
) -> dict[int, float]:
    """Seconds of one forward over T new rows after ``context`` cached ones, for each T in ``sizes``.

    ``layers``: through the stage's decoder layers; ``lm_head``: then final norm + LM head over the
    T rows (needs the vocabulary ends; alone, ``layers=False``, it is the originator's share), or
    over at most ``lm_rows`` of them (what a verification walk reads, see :data:`WALK_ROWS`).
    Inputs are random hidden states at the scale of real ones.
    """
    if lm_head and not stage.has_vocab:
        raise ValueError("measuring the LM head needs a stage loaded with its vocabulary ends")
    hidden = stage.cfg.hidden_size
    cache = stage.new_cache(context + max(sizes))
    if layers:
        stage.forward_one(torch.randn(context, hidden, dtype=stage.dtype) * 0.1, cache, torch.arange(context))
    out: dict[int, float] = {}
    for t in sizes:
        x = torch.randn(t, hidden, dtype=stage.dtype) * 0.1
        pos = torch.arange(context, context + t)

        def run(x: torch.Tensor = x, pos: torch.Tensor = pos) -> None:
            y = stage.forward_one(x, cache, pos) if layers else x
            if lm_head:
                stage.logits(y if lm_rows is None else y[:lm_rows])

        out[t] = _median_seconds(run, repeats, clock, setup=(lambda: cache.truncate(context)) if layers else None)
    return out


@torch.inference_mode()
def compare_forward_times(
    stages: Mapping[str, Stage],
    sizes: Sequence[int] = SIZES,
    *,
    context: int = 128,
    repeats: int = 5,
    lm_head: bool = True,
) -> dict[str, dict[int, float]]:
    """:func:`forward_times` of several stages (one model in several weight formats, say), measured
    round-robin: every round times each size on each stage in turn, so that the drift of a shared
    machine hits all of them alike. Median of ``repeats`` rounds after one warm-up round."""
    caches = {}
    for name, stage in stages.items():
        caches[name] = stage.new_cache(context + max(sizes))
        x = torch.randn(context, stage.cfg.hidden_size, dtype=stage.dtype) * 0.1
        stage.forward_one(x, caches[name], torch.arange(context))
    times: dict[str, dict[int, list[float]]] = {n: {t: [] for t in sizes} for n in stages}
    for _ in range(repeats + 1):
        for t in sizes:
            pos = torch.arange(context, context + t)
            for name, stage in stages.items():
                x = torch.randn(t, stage.cfg.hidden_size, dtype=stage.dtype) * 0.1
                t0 = time.perf_counter()
                y = stage.forward_one(x, caches[name], pos)
                if lm_head:
                    stage.logits(y)
                times[name][t].append(time.perf_counter() - t0)
                caches[name].truncate(context)
    return {n: {t: statistics.median(v[1:]) for t, v in per.items()} for n, per in times.items()}


def kernels_key(stage: Stage) -> str:
    """What a stage's measured times depend on besides its model, layers and dtype, for the names of cached
    measurements: its weights' kernels (packed weights change a curve by a third, quantized ones its slope),
    and for our own int4a8 kernel its build (a new build may change the curve)."""
    kernels = stage.kernels
    if kernels == "int4a8":
        kernels += "-" + q4a8.build_key()[:8]
    return kernels


def _cache_file(source: ModelSource, stage: Stage, with_lm_head: bool) -> Path:
    dt = str(stage.dtype).removeprefix("torch.")
    kernels = kernels_key(stage)
    span = stage.layer_range
    name = (
        f"{source.fingerprint}-{span.first}-{span.stop}-{int(with_lm_head)}-{dt}-{kernels}-walk{WALK_ROWS}"
        f"-t{torch.get_num_threads()}.json"
    )
    return cache_dir("profiles", name)


def monotone(curve: dict[int, float]) -> dict[int, float]:
    """A non-decreasing curve for the budget search: cost(T) = min over T' >= T of the measured cost.

    Noise (another process, a page fault) only ever makes a run slower, and a forward over more
    tokens bounds one over fewer from above, so the suffix minimum discards spikes instead of
    spreading them to every larger T as a running maximum would.
    """
    out, best = {}, float("inf")
    for t in sorted(curve, reverse=True):
        best = min(best, curve[t])
        out[t] = best
    return dict(sorted(out.items()))


def stage_cost_curve(
    source: ModelSource,
    stage: Stage,
    *,
    with_lm_head: bool = True,
    refresh: bool = False,
    sizes: Sequence[int] = SIZES,
    repeats: int = 5,
) -> dict[int, float]:
    """The stage's cost curve (wall time; with the LM head where the stage computes logits), from the
    on-disk cache unless ``refresh``.

    The tree budget is chosen from this curve: on a flat (GPU) curve big trees are free, on a
    steep (CPU) curve every node must earn its cost.
    """
    path = _cache_file(source, stage, with_lm_head)
    if not refresh and path.is_file():
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, OSError):
            pass
    lm_rows = WALK_ROWS if with_lm_head and stage.logits_per_row else None
    curve = monotone(forward_times(stage, sizes, repeats=repeats, lm_head=with_lm_head, lm_rows=lm_rows))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(curve))
    except OSError:
        pass
    return curve


@torch.inference_mode()
def transformers_cost_curve(
    stage: Stage, sizes: Sequence[int] = SIZES, context: int = 128, repeats: int = 5
) -> dict[int, float]:
    """The same measurement through transformers' own model with ``stage``'s weights (whole model only).

    This is the comparison the engine's own forward has to win; it is never used for serving.
    """
    # lazy: transformers' model code is only this comparison's (and takes seconds to import)
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = stage.cfg
    if stage.layer_range != LayerRange.whole(cfg.n_layers) or not stage.has_vocab:
        raise ValueError("the transformers comparison needs the whole model with its vocabulary ends")
    model = AutoModelForCausalLM.from_config(cfg.to_hf(), dtype=stage.dtype).eval()
    sd = {"model.embed_tokens.weight": dense(stage.embed_w), "model.norm.weight": stage.norm_w}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = dense(stage.lm_head_w)
    q, kv = cfg.q_size, cfg.kv_size
    for i, layer in enumerate(stage.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = dense(layer.wqkv).split([q, kv, kv])
        gate, up = dense(layer.w_gate_up).chunk(2)
        sd.update(
            {
                p + "self_attn.q_proj.weight": wq,
                p + "self_attn.k_proj.weight": wk,
                p + "self_attn.v_proj.weight": wv,
                p + "self_attn.o_proj.weight": dense(layer.wo),
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": dense(layer.w_down),
                p + "input_layernorm.weight": layer.attn_norm,
                p + "post_attention_layernorm.weight": layer.ffn_norm,
            }
        )
        if layer.bqkv is not None:
            bq, bk, bv = layer.bqkv.split([q, kv, kv])
            sd.update(
                {p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk, p + "self_attn.v_proj.bias": bv}
            )
    model.load_state_dict(sd, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (1, context + max(sizes)))
    out: dict[int, float] = {}
    for t in sizes:
        state: dict[str, DynamicCache] = {}
        mask = float_mask(causal_mask(context, t), stage.dtype)[None, None]
        pos = torch.arange(context, context + t)[None]

        def setup(state: dict = state) -> None:
            state["cache"] = DynamicCache(config=model.config)
            model(ids[:, :context], past_key_values=state["cache"], use_cache=True)

        def run(state: dict = state, mask: torch.Tensor = mask, pos: torch.Tensor = pos, t: int = t) -> None:
            model(
                ids[:, context : context + t],
                past_key_values=state["cache"],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
            )

        out[t] = _median_seconds(run, repeats, "wall", setup)
    return out
