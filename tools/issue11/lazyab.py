# ruff: noqa: B018  (a one-off measurement script for issue 11: `lm.curve` is read to measure it before the runs)
"""Same process, same model: spec with per-row verification (new) against all rows batched (old), alternated."""

import time

import torch

from meshd.serve.local import LocalModel
from models.stage import Stage

torch.set_num_threads(1)
lm = LocalModel("default", None, "native")
lm.curve
lazy = Stage.logits_by_row


def batched(self, normed):
    every = self.logits(normed, normed=True)
    return every.__getitem__


prompts = [
    "Explain how a bicycle stays upright.",
    "Write a short story about a lighthouse keeper.",
    "What is 17 times 23? Show the steps.",
]
res = {"lazy": [], "batched": []}
for r in range(3):
    for name, fn in (("batched", batched), ("lazy", lazy)):
        Stage.logits_by_row = fn
        tok, cpu, wall, nodes, rounds = 0, 0.0, 0.0, 0, 0
        outs = []
        for p in prompts:
            c0, w0 = time.thread_time(), time.perf_counter()
            s = lm.run(p, mode="spec", drafter="auto", max_tokens=64, temperature=0.0, seed=0, stages=1)
            cpu += time.thread_time() - c0
            wall += time.perf_counter() - w0
            tok += s["new_tokens"]
            rounds += s["rounds"]
            nodes += s["verified_nodes"]
        res[name].append(round(tok / cpu, 2))
        print(
            r,
            name,
            "tok/cpu-s",
            round(tok / cpu, 2),
            "tok/wall-s",
            round(tok / wall, 2),
            "tokens/round",
            round(tok / rounds, 2),
            "nodes/round",
            round(nodes / rounds, 2),
            flush=True,
        )
print(res)
