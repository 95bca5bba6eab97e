# ruff: noqa: B023, E501  (one-off measurement scripts for issue 11: loop-bound lambdas are called at once)
import sys
import time

import torch

from models.quant import quantize_int4, quantize_int8

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


def bench(f, n=50):
    for _ in range(5):
        f()
    t0 = time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()
    for _ in range(n):
        f()
    return ((time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()) - t0) / n * 1e6


for N, K in [(960, 576), (3072, 576), (576, 1536), (49152, 576)]:
    w = torch.randn(N, K) * 0.05
    q4 = quantize_int4(w).pack(torch.bfloat16)
    q8 = quantize_int8(w).pack(torch.bfloat16)
    wb = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16().contiguous(), 1)
    row = []
    for M in (1, 4, 8, 16):
        x = torch.randn(M, K).bfloat16()
        row.append(
            f"M{M}: i4 {bench(lambda: q4.matmul(x)):.0f} i8 {bench(lambda: q8.matmul(x)):.0f} bf {bench(lambda: torch.ops.mkldnn._linear_pointwise(x, wb, None, 'none', [], '')):.0f}"
        )
    print(N, K, " | ".join(row), flush=True)
