"""Builds and loads rerankd's AMX attention kernel for bf16 on Intel CPUs (``csrc/amx_attention.cpp``;
the attention function that calls it is `rerankd.engine.attention.amx_attention`).

Why: PyTorch's CPU flash attention uses AMX only for fp16; for bf16 it issues small oneDNN
GEMMs per block (~0.3 TFLOP/s on the 2-core Xeon of docs/benchmarks.md) and attention was
~17-20 % of a forward. The kernel packs each sequence's keys/values once per kv head and runs
Q.Kᵀ and P.V of the query heads sharing them as AMX brgemm calls (ATen's cpublas).

It is compiled on first use with the C++ compiler PyTorch's extension builder finds (~35 s,
then cached under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Without AMX-BF16,
a compiler or a working build, `load_kernel` returns None and the engine keeps SDPA; the
engine also checks the kernel against SDPA on a probe batch before using it.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from types import ModuleType

import torch

from rerankd.engine.base import cpu_has_amx
from rerankd.engine.batch import PackedBatch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "amx_attention.cpp"
#: AVX-512 for ATen's vector helpers (every AMX CPU has it); fbgemm's transpose is in libtorch
_CFLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mfma",
    "-fopenmp",
    "-DCPU_CAPABILITY=AVX512",
    "-DCPU_CAPABILITY_AVX512",
    "-DUSE_FBGEMM",
]


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled kernel module, or None (logged once) where it cannot run here."""
    if not cpu_has_amx():
        return None
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="rerankd_amx_attention",
            sources=[str(SOURCE)],
            extra_cflags=_CFLAGS,
            verbose=False,
        )
    except Exception as exc:  # no compiler, missing headers, link errors, ...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        log.warning(
            "AMX attention kernel could not be built (%s: %s); using SDPA attention",
            type(exc).__name__,
            first_line,
        )
        return None
    if not module.available():
        log.info("bf16 brgemm packing unsupported by this PyTorch build; using SDPA attention")
        return None
    log.info("AMX attention kernel ready in %.1fs", time.perf_counter() - started)
    return module


def sequence_table(batch: PackedBatch, with_prefix: bool) -> torch.Tensor:
    """(S, 4) int64: start, length, prefix start, prefix length of each sequence (cached)."""
    cache = batch.__dict__.setdefault("_amx_tables", {})
    if with_prefix not in cache:
        rows = []
        for i, (start, length) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
            span = batch.prefix_span(i) if with_prefix else None
            rows.append((start, length, *(span or (0, 0))))
        cache[with_prefix] = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
    return cache[with_prefix]
