"""spec: batched LM head with the default curve (old) against per-row verification with a curve whose
LM-head share is one row (what per-row verification costs), alternated in one process, CPU clock."""

import time

import torch

from meshd.serve.local import LocalModel
from models.profile import forward_times, monotone
from models.stage import Stage

torch.set_num_threads(1)
lm = LocalModel("default", None, "native")
old_curve = dict(lm.curve)
layers = forward_times(lm.target, repeats=5, clock="cpu")
lm1 = forward_times(lm.target, (1,), repeats=9, clock="cpu", layers=False, lm_head=True)[1]
new_curve = monotone({t: v + lm1 for t, v in layers.items()})
print("old curve", {k: round(v * 1e3, 1) for k, v in old_curve.items()})
print("per-row curve", {k: round(v * 1e3, 1) for k, v in new_curve.items()}, flush=True)
lazy = Stage.logits_by_row


def batched(self, normed):
    return self.logits(normed, normed=True).__getitem__


prompts = [
    "Explain how a bicycle stays upright.",
    "Write a short story about a lighthouse keeper.",
    "What is 17 times 23? Show the steps.",
]
for r in range(2):
    for name, fn, curve in (("batched+old curve", batched, old_curve), ("per-row+per-row curve", lazy, new_curve)):
        Stage.logits_by_row = fn
        lm._curve = curve
        tok = rounds = nodes = 0
        cpu = 0.0
        for p in prompts:
            c0 = time.thread_time()
            s = lm.run(p, mode="spec", drafter="auto", max_tokens=64, temperature=0.0, seed=0, stages=1)
            cpu += time.thread_time() - c0
            tok += s["new_tokens"]
            rounds += s["rounds"]
            nodes += s["verified_nodes"]
        print(
            r,
            name,
            "tok/cpu-s",
            round(tok / cpu, 2),
            "tokens/round",
            round(tok / rounds, 2),
            "nodes/round",
            round(nodes / rounds, 2),
            flush=True,
        )
    Stage.logits_by_row = lazy
    tok = 0
    cpu = 0.0
    for p in prompts:
        c0 = time.thread_time()
        s = lm.run(p, mode="ar", drafter="auto", max_tokens=64, temperature=0.0, seed=0, stages=1)
        cpu += time.thread_time() - c0
        tok += s["new_tokens"]
    print(r, "ar tok/cpu-s", round(tok / cpu, 2), flush=True)
