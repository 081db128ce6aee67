"""Opt-in dynamic int8 quantization of the linear layers (`--quantize int8`, CPU).

Weights int8 per output channel, activations quantized per batch on the fly, through
PyTorch's fbgemm/oneDNN kernels (VNNI / AMX-INT8 where the CPU has them). Scores move by
a small, measured amount (see docs/benchmarks.md); float32 or bf16 remain the exact paths.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZE_MODES = ("none", "int8")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a float32 CPU model by a dynamic int8 one."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    # oneDNN first: on the Qwen3-0.6B shape (2-core EPYC, AVX512-VNNI) its per-channel
    # dynamic linear ran the whole model ~10% faster than fbgemm/x86, same fidelity
    for engine in ("onednn", "x86", "fbgemm"):
        if engine in engines:
            torch.backends.quantized.engine = engine
            break
    with warnings.catch_warnings():
        # torch.ao's eager quantization API is deprecated in favour of torchao, but it is
        # the one shipped with torch itself and runs fbgemm's kernels.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
