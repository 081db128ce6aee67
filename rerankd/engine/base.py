"""Device/dtype resolution, the split-on-OOM retry every engine shares, and the device side
of the scheduler's one-ahead pipeline (`PendingScores`).

The engine contract itself (`Engine`: `score(batch) -> raw scores`) lives in
`rerankd.types`, torch-free, so that the scheduler and the HTTP layer import without torch.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from rerankd.ops.cpu import cpu_supports_bf16

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


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


#: token budget per batch on a CPU: a few requests' worth, short enough that a batch does
#: not hold up the queue behind it for long
CPU_BATCH_TOKENS = 8192
#: on CUDA: the packed engine holds one whole W-GPU request (100 docs, ~41k tokens) in one
#: batch, its shared prefix computed once (32k split it in two); the padded engines compute
#: their padding too, so they keep half of that
CUDA_BATCH_TOKENS = 65536
CUDA_PADDED_BATCH_TOKENS = 32768


#: held while a CUDA graph is captured (engine/cuda_graphs.py) and while the allocator's
#: cache is emptied: torch forbids emptying it during a capture, from any thread
CUDA_CAPTURE_LOCK = threading.RLock()


def default_batch_tokens(device: torch.device, padded: bool = False) -> int:
    """The token budget per batch an engine offers the scheduler (`Engine.default_batch_tokens`)
    when --max-batch-tokens is not given; `padded`: the engine computes padding rows too."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    return CUDA_PADDED_BATCH_TOKENS if padded else CUDA_BATCH_TOKENS


class PendingScores:
    """Scores of a launched batch, possibly still being computed on the device.

    On CUDA the scores are copied without waiting into a page-locked host tensor and an
    event is recorded after the copy; `result()` waits for that event and reads the host
    copy: the one host sync of a pipelined batch (the packed engine's forward has no other:
    its layout is plain Python lists, its uploads are non-blocking). Until then the engine
    thread is free to pack the next batch. Elsewhere `result()` reads the tensor as `forward`
    does (`.tolist()`), so CPU scores are the same floats."""

    def __init__(self, scores: torch.Tensor) -> None:
        self._event = None
        self._scores = scores
        if scores.device.type == "cuda":
            host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            host.copy_(scores, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._scores = host

    def result(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()  # the batch's single host sync
        return self._scores.tolist()


def padded_chunks(lengths: Sequence[int], max_padded_tokens: int) -> Iterator[list[int]]:
    """Indices of `lengths` in padded sub-batches, longest first: each sub-batch is padded to
    its first (longest) item, and holds as many items as fit `max_padded_tokens` at that
    width (at least one). Sorting wastes little padding; scores go back by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    start = 0
    while start < len(order):
        width = max(lengths[order[start]], 1)
        chunk = order[start : start + max(1, max_padded_tokens // width)]
        yield chunk
        start += len(chunk)


def split_on_oom(
    forward: Callable[[Sequence[T], list[int] | None], R],
    items: Sequence[T],
    groups: list[int] | None,
    device: torch.device,
    join: Callable[[R, R], R] = operator.add,
    unit: str = "pairs",
) -> R:
    """`forward(items, groups)`, halving the batch and retrying while it runs out of memory;
    the halves' results are `join`ed (lists: concatenated).

    Every engine's `forward` runs through here, so a memory cap (or an injected OOM,
    engine/faults.py) splits every engine the same way. A single item that does not fit
    re-raises: its request fails, the server does not. The retries run after the `except`
    block: inside it, the traceback would keep the failed attempt's activations alive through
    every retry (and on a GPU run out again).
    """
    try:
        return forward(items, groups)
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
    log.warning("out of memory on %d %s; splitting the batch and retrying", len(items), unit)
    if device.type == "cuda":
        with CUDA_CAPTURE_LOCK:  # emptying the cache during a capture is an error
            torch.cuda.empty_cache()
    half = len(items) // 2
    left_groups, right_groups = (groups[:half], groups[half:]) if groups else (None, None)
    left = split_on_oom(forward, items[:half], left_groups, device, join, unit)
    return join(left, split_on_oom(forward, items[half:], right_groups, device, join, unit))


def run_padded(
    forward: Callable[[Sequence[T], list[int] | None], Any],
    items: Sequence[T],
    max_padded_tokens: int,
    device: torch.device,
    join: Callable = operator.add,
    unit: str = "pairs",
) -> list:
    """`forward`'s per-item results for `items`, in their order: run in length-sorted padded
    sub-batches (`padded_chunks`), each through `split_on_oom` (`join`, `unit` as there);
    the padded engines (transformers, vision-language, embedding) all score this way."""
    results: list = [None] * len(items)
    for chunk in padded_chunks([len(item) for item in items], max_padded_tokens):
        out = split_on_oom(forward, [items[i] for i in chunk], None, device, join, unit)
        for index, value in zip(chunk, out, strict=True):
            results[index] = value
    return results
