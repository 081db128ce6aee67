"""Builds and loads rerankd's AVX512-BF16 attention kernel (``csrc/avx512_attention.cpp``;
the attention function that calls it is `rerankd.ops.attention.avx512_attention`).

Why: on CPUs with AVX512-BF16 but no AMX (AMD EPYC Zen 4/5, Intel Cooper Lake) the AMX kernel
cannot run, and PyTorch's CPU flash attention reaches ~0.1 TFLOP/s at head dim 128 for bf16.
This kernel runs Q.Kᵀ and P.V as `vdpbf16ps` micro-kernels over keys and values packed once
per (sequence, kv head), with an online softmax in float.

Built like the AMX kernel (`rerankd.ops.amx_kernel.build_kernel`: the same flags, the same
cache directory keyed on the torch version and a hash of the source and flags). On a CPU
without AVX512-BF16 (or AVX-512 itself) `load_kernel` returns None without building; a
failed build returns None with a WARNING; the engine checks the kernel against SDPA on a
probe batch before using it. Where the CPU has AMX the engine prefers the AMX kernel.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from types import ModuleType

from rerankd.ops.amx_kernel import build_kernel
from rerankd.ops.cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "avx512_attention.cpp"
#: CPU flags the kernel's instructions need (every CPU with AVX512-BF16 also has AVX512BW,
#: VL and DQ, which the build flags enable too)
REQUIRED_FLAGS = frozenset({"avx512f", "avx512_bf16"})


def missing_flags() -> list[str]:
    """The `REQUIRED_FLAGS` this CPU (or `RERANKD_CPU_FLAGS`) lacks, sorted."""
    return sorted(REQUIRED_FLAGS - cpu_flags())


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled kernel module, or None (a build failure logged once) where it cannot run
    here."""
    if missing_flags():
        return None
    started = time.perf_counter()
    module = build_kernel("rerankd_avx512_attention", SOURCE, "AVX512-BF16")
    if module is not None:
        log.info("AVX512-BF16 attention kernel ready in %.1fs", time.perf_counter() - started)
    return module
