"""Issue 13: what one draft of the shipped EAGLE head costs, by tree size, on the embedded model.

Feeds the head the target's features of a real answer, then times ``draft`` (thread CPU time, best of 7)
for trees of 4 to 32 nodes and the head catching up on 16 committed positions (what follows a stretch of
plain rounds). ``--torch-layer``: the head's decoder layer on the torch ops of ``decoder_layer`` instead of
the C call (the rest as is), to compare. ``--drafter eagle:DIR``: another head (e.g. one with a wider draft
vocabulary) instead of the shipped one.

    PYTHONPATH=. python tools/issue13/draft_cost.py [--threads 1] [--torch-layer] [--drafter eagle:DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from meshd.serve.local import LocalModel
from models import engine

PROMPT = "Why does bread go stale faster in the fridge than on the counter?"


def best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torch-layer", action="store_true")
    ap.add_argument("--drafter", default="eagle", help="an EAGLE head as --drafter takes it (default: the shipped one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    local = LocalModel("default", "auto", "auto")
    drafter, target = local.drafter(a.drafter), local.target
    if a.torch_layer:
        drafter.head._fused = None
    print(
        f"weights {target.weights}, the head's layer in C: {drafter.head._fused is not None}, "
        f"draft vocabulary {len(drafter.vocab)}"
    )
    prompt = local.encode(PROMPT)
    answer = engine.generate(target, prompt, max_new_tokens=40, mode="ar", eos_ids=local.eos).token_ids
    context = prompt + answer
    cache = target.new_cache(len(context) + 64)
    with torch.inference_mode():
        hidden = target.forward_one(target.embed(torch.tensor(context)), cache, torch.arange(len(context)))
    drafter.accept(context, target.final_norm(hidden)[: len(context) - 1])
    for nodes, depth in ((4, 3), (8, 4), (16, 6), (32, 8)):
        s = best_of(7, lambda n=nodes, d=depth: drafter.draft(context, top_k=4, depth=d, max_nodes=n))
        print(f"draft of {nodes:2d} nodes (depth {depth}): {s * 1e3:6.2f} ms")

    def catch_up() -> None:
        drafter._rows = len(context) - 17
        drafter.cache.truncate(drafter._rows)
        drafter._last_out = None
        drafter._sync(context)

    print(f"catching up on 16 positions: {best_of(5, catch_up) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
