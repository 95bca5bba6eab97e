"""The int4a8 kernel's code paths against rows: ms for the embedded model's 120 layer matrices.

    PYTHONPATH=. python tools/issue11/q4a8_rows.py [--threads N] [--rows 1,2,4,8,16]

Each path (plain C, AVX512-VNNI tiles of 4 rows, AMX tiles of 16; see models/q4a8.c) computes the
same bits; this picks where ``auto`` switches from VNNI to AMX (``AMX_MIN_ROWS``). torch's int4
kernel (``native``) is timed alongside on the same matrices held its way.
"""

from __future__ import annotations

import argparse
import time

import torch

from models import q4a8
from models.stage import Stage


def per_token_ms(stage: Stage, rows: int, fn) -> float:
    xs = {k: torch.randn(rows, k).bfloat16() for k in (stage.cfg.hidden_size, stage.cfg.intermediate_size)}

    def once() -> None:
        for layer in stage.layers:
            for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down):
                fn(xs[w.in_features], w)

    for _ in range(3):
        once()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        once()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,6,8,12,16,32,64")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours = Stage.load(None, weights="int4a8", dtype="bf16")
    torch_int4 = Stage.load(None, weights="native", dtype="bf16")
    print(f"threads {args.threads}; vector path of the build: {q4a8.simd()}; AMX granted: {q4a8.amx()}")
    print("rows | c | simd | amx | auto | torch int4 (native)")
    for rows in (int(r) for r in args.rows.split(",")):
        cells = [
            per_token_ms(ours, rows, lambda x, w, path=path: q4a8.matmul(x, w.data, w.out_features, path=path))
            for path in ("c", "simd", "amx", "auto")
        ]
        cells.append(per_token_ms(torch_int4, rows, lambda x, w: w.matmul(x)))
        print(f"{rows} | " + " | ".join(f"{c:.2f}" for c in cells))


if __name__ == "__main__":
    main()
