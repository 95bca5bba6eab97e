"""Cost curves: how long a forward over T tokens takes on this device, for a given layer slice.

Measured once per (model, slice, dtype, threads) and cached, because the tree budget needs
the curve at every start-up and measuring takes a few seconds on a slow board.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from models.source import ModelSource
from models.stage import Stage, causal_mask, dense

SIZES = (1, 2, 4, 8, 16, 32, 64)


def _cache_file(source: ModelSource, stage: Stage, with_head: bool) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dt = str(stage.dtype).removeprefix("torch.")
    kernels = "packed" if stage.packed else "plain"  # packed weights change the curve by a third
    name = (
        f"{source.fingerprint}-{stage.first}-{stage.last}-{int(with_head)}-{dt}-{kernels}"
        f"-t{torch.get_num_threads()}.json"
    )
    return Path(base) / "meshd" / "profiles" / name


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
    with_head: bool = True,
    refresh: bool = False,
    sizes: Sequence[int] = SIZES,
    repeats: int = 5,
) -> dict[int, float]:
    """The stage's cost curve, from the on-disk cache unless ``refresh``."""
    path = _cache_file(source, stage, with_head)
    if not refresh and path.is_file():
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, OSError):
            pass
    curve = monotone(stage.cost_curve(sizes, repeats=repeats, with_head=with_head))
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
    from transformers import AutoModelForCausalLM, DynamicCache

    if stage.first != 0 or stage.last != stage.cfg.n_layers or not stage.has_head:
        raise ValueError("the transformers comparison needs the whole model with its head")
    cfg = stage.cfg
    model = AutoModelForCausalLM.from_config(cfg.to_hf(), dtype=stage.dtype).eval()
    sd = {"model.embed_tokens.weight": stage.embed_w, "model.norm.weight": stage.norm_w}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = stage.lm_head_w
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
        times = []
        for _ in range(repeats + 1):
            cache = DynamicCache(config=model.config)
            model(ids[:, :context], past_key_values=cache, use_cache=True)
            mask = torch.zeros(1, 1, t, context + t, dtype=stage.dtype)
            mask.masked_fill_(~causal_mask(context, t)[None, None], torch.finfo(stage.dtype).min)
            pos = torch.arange(context, context + t)[None]
            t0 = time.perf_counter()
            model(
                ids[:, context : context + t],
                past_key_values=cache,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
            )
            times.append(time.perf_counter() - t0)
        out[t] = sorted(times[1:])[len(times[1:]) // 2]
    return out
