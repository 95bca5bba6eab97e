# ruff: noqa: E402, B018  (one-off measurement scripts for issue 11: loop-bound lambdas are called at once)
import time

import torch

torch.set_num_threads(1)
import models.engine as eng
from meshd.serve.local import LocalModel

lm = LocalModel("default", None, "native")
lm.curve
orig = eng.generate


def gen(*a, **k):
    r = orig(*a, **k)
    s = r.stats
    print(
        "rounds",
        s.rounds,
        "tokens",
        s.new_tokens,
        "seconds",
        round(s.seconds, 3),
        "prefill",
        round(s.prefill_seconds, 3),
        "draft",
        round(s.draft_seconds, 3),
        "verified nodes",
        s.verified_nodes,
        flush=True,
    )
    return r


import meshd.serve.local as loc

loc.generate = gen
for p in ["Explain how a bicycle stays upright.", "What is 17 times 23? Show the steps."]:
    c0 = time.thread_time()
    lm.run(p, mode="spec", drafter="auto", max_tokens=64, temperature=0.0, seed=0, stages=1)
    print("cpu s", round(time.thread_time() - c0, 3))
