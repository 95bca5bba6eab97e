"""Time the int8 vocabulary product (``q8a8_matmul``) at the embedded model's LM head shape.

49,152 x 576 int8 rows (random: the kernel's time does not depend on the values) times 1-16 activation
rows, best of 15 calls each, at ``--threads`` threads. Run it from two checkouts alternately to A/B a
kernel change: ``PYTHONPATH=. python tools/issue11/lm_head_rows.py --label new``.
"""

import argparse
import time

import torch

from models import q4a8

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--label", default="")
args = p.parse_args()
torch.set_num_threads(args.threads)
q4a8.library().q4a8_set_threads(args.threads)
torch.manual_seed(0)
w = torch.randint(-128, 128, (49152, 576), dtype=torch.int8)
scales = torch.rand(49152) * 0.02
cells = []
for rows in (1, 2, 4, 8, 16):
    x = torch.randn(rows, 576)
    best = float("inf")
    for _ in range(15):
        t0 = time.perf_counter()
        q4a8.q8a8_matmul(x, w, scales)
        best = min(best, time.perf_counter() - t0)
    cells.append(f"{rows}: {best * 1e3:.2f}")
print(args.label, "ms by rows:", "  ".join(cells), flush=True)
