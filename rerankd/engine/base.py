"""The engine contract and device/dtype resolution.

An engine is anything with `score(batch) -> raw scores`: the transformers engine today,
the packed engine later, a fake one in tests. The scheduler depends on nothing else.
"""

from __future__ import annotations

import logging
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


def cpu_flags() -> set[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where it cannot be read)."""
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

    A single pair that does not fit re-raises: its request fails, the server does not.
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
