"""Names of the weight formats, without torch: the command line and the config file check
``--weights`` against them before anything heavy is imported. What each format does is
:mod:`models.quant`'s."""

from __future__ import annotations

WEIGHT_FORMATS = ("auto", "native", "int8", "int4", "int4a8", "bf16", "fp32")

WEIGHTS_HELP = (
    "how this device holds the weights: auto (the fastest exact-enough format for this CPU: int4a8 on x86-64 with "
    "AVX512-VNNI, native with bf16 activations on other x86-64 with AVX2/AVX512, fp32 elsewhere; an explicit other "
    "--dtype keeps them dense) | "
    "native (the file's own precision: Q8_0 as int8, Q4_0/Q4_1 as int4) | int8 | int4 | int4a8 (the file's "
    "Q4_0/Q4_1 blocks times int8 activations, as llama.cpp; a C kernel built on first use, cheap for trees) | bf16 | "
    "fp32 (dequantized)"
)
