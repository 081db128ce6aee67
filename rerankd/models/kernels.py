"""The kernels a packed model runs: one value, chosen by the engine at start-up.

"Kernel" in rerankd means an implementation the engine picks for this device and dtype:
the attention kernel (SDPA, varlen flash attention, rerankd's AMX or AVX512-BF16 kernel: a
key of `ops.attention.ATTENTION`) and whether the per-token work around it (norms,
projections, RoPE, MLP, residuals) runs eager or `torch.compile`d. The engine hands a model
the whole choice through its one `set_kernels`, after checking each candidate against SDPA
and eager on a probe batch (engine/packed_engine.py); the model resolves it to functions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernels:
    #: the attention kernel: a key of `ops.attention.ATTENTION`
    attention: str = "sdpa"
    #: per-token work compiled (one graph per function, oneDNN GEMMs as custom ops) or eager
    compiled: bool = False
