"""The engine contract and device/dtype resolution.

An engine is anything with `score(batch) -> raw scores`: the transformers engine today,
the packed engine later, a fake one in tests. The scheduler depends on nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch

from rerankd.types import Batch, EncodedPair

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the scheduler needs from an engine."""

    #: human-readable engine name, device and dtype, for /v1/models and logs
    name: str
    device: str
    dtype: str
    #: a sensible default token budget per batch on this device
    default_batch_tokens: int

    def score(self, batch: Batch) -> list[float]:
        """Raw scores for `batch.pairs`, in order. Blocking; called from one worker thread."""
        ...


#: environment variable replacing /proc/cpuinfo's flag list in `cpu_flags` (comma or space
#: separated, e.g. "avx512f avx512_bf16 avx512_vnni" for an AMD EPYC Zen 4), so that tests and
#: benchmarks run rerankd's CPU-dependent choices (AMX attention kernel, bf16 by default,
#: `--compile auto`) as on another CPU class. It only steers rerankd's own choices; cap the
#: libraries too (`CPU_CLASSES`) to emulate a class. Unset or empty: /proc/cpuinfo.
CPU_FLAGS_ENV = "RERANKD_CPU_FLAGS"

#: environment that makes a process on an AMX Xeon behave like each CPU class as far as
#: rerankd, oneDNN (`ONEDNN_MAX_CPU_ISA`), ATen (`ATEN_CPU_CAPABILITY`), MKL and fbgemm can
#: tell: an emulation of the class's instruction sets, not of its chips (caches, clocks and
#: port counts stay the Xeon's). Used by tests/test_cpu_classes.py and docs/benchmarks.md.
CPU_CLASSES: dict[str, dict[str, str]] = {
    "amx": {},  # the machine itself (an AMX Xeon where this table was measured)
    "zen4": {  # AMD EPYC Zen 4/5, Intel Cooper Lake: AVX512-BF16 and VNNI, no AMX
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1",
        CPU_FLAGS_ENV: "avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16",
    },
    "avx512-vnni": {  # Intel Cascade Lake / Ice Lake server: VNNI, no BF16
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1",
        CPU_FLAGS_ENV: "avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni",
    },
    "avx2": {  # AVX2-only x86 (Haswell-Skylake client, older EPYC)
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        CPU_FLAGS_ENV: "avx2 fma",
    },
}


def cpu_flags() -> set[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where it cannot be read), or those of
    `RERANKD_CPU_FLAGS` when it is set (`CPU_FLAGS_ENV`)."""
    override = os.environ.get(CPU_FLAGS_ENV, "").replace(",", " ").split()
    if override:
        return set(override)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 pays off."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx() -> bool:
    """True on CPUs with AMX bf16 tiles (Xeon Sapphire Rapids and later)."""
    return "amx_bf16" in cpu_flags()


def resolve_device(device: str) -> torch.device:
    """`auto` → cuda when available, else cpu; explicit names are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on CUDA and on bf16-capable CPUs, float32 otherwise."""
    if dtype == "float32":
        return torch.float32
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype == "float16":
        return torch.float16
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def split_on_oom(
    forward: Callable[[list[EncodedPair], list[int] | None], list[float]],
    pairs: list[EncodedPair],
    groups: list[int] | None,
    device: torch.device,
) -> list[float]:
    """`forward(pairs, groups)`, halving the batch and retrying while it runs out of memory.

    A single pair that does not fit re-raises: its request fails, the server does not. The
    retries run after the `except` block: inside it, the traceback would keep the failed
    attempt's activations alive through every retry (and on a GPU run out again).
    """
    try:
        return forward(pairs, groups)
    except torch.OutOfMemoryError:
        if len(pairs) == 1:
            raise
    log.warning("out of memory on %d pairs; splitting the batch and retrying", len(pairs))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(pairs) // 2
    left = split_on_oom(forward, pairs[:half], groups[:half] if groups else None, device)
    return left + split_on_oom(forward, pairs[half:], groups[half:] if groups else None, device)
