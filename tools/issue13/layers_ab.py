"""Two builds of the int4a8 library against each other: ms of one forward of the embedded model's 30
layers over T new rows after C cached ones, the builds alternated in one process (the drift of a shared
machine hits both alike), median of the repeats.

    PYTHONPATH=. python tools/issue13/layers_ab.py OLD.so [--threads 2] [--rows 1,2,4,8,16] \\
        [--context 64,256,512,1024] [--repeats 9]

OLD.so: an earlier build from the kernel cache (``~/.cache/meshd/kernels/q4a8-KEY.so``; a checkout of the
earlier commit builds it on first use); the other side is this checkout's. Both must compute the same
bits for the comparison to mean "the same work, faster": check with the tests first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models import q4a8
from models.stage import Stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the other build's .so")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--context", default="64,256,512,1024")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    libs = {"old": q4a8.open_library(args.old), "new": q4a8.library()}
    stage = Stage.load("default", weights="auto", dtype="auto")
    if stage.fused is None:
        raise SystemExit("the embedded model did not load as int4a8 layers in C on this machine: nothing to compare")
    hidden, rows = stage.cfg.hidden_size, [int(r) for r in args.rows.split(",")]
    times: dict[tuple[int, int, str], list[float]] = {}
    for ctx in (int(c) for c in args.context.split(",")):
        cache = stage.new_cache(ctx + max(rows))
        if ctx:
            stage.forward_one(torch.randn(ctx, hidden, dtype=stage.dtype) * 0.1, cache, torch.arange(ctx))
        for rep in range(args.repeats + 1):  # the first round warms up
            for t in rows:
                x, pos = torch.randn(t, hidden, dtype=stage.dtype) * 0.1, torch.arange(ctx, ctx + t)
                for side in ("old", "new") if rep % 2 else ("new", "old"):
                    q4a8.library = lambda side=side: libs[side]  # what q4a8._team() hands the layers
                    cache.truncate(ctx)
                    t0 = time.perf_counter()
                    stage.forward_one(x, cache, pos)
                    if rep:
                        times.setdefault((ctx, t, side), []).append(time.perf_counter() - t0)
        line = []
        for t in rows:
            old, new = (statistics.median(times[ctx, t, s]) for s in ("old", "new"))
            line.append(f"{t} rows {1e3 * old:.2f} -> {1e3 * new:.2f} ({old / new:.2f}x)")
        print(f"{args.threads} threads, {ctx:5d} cached: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main()
