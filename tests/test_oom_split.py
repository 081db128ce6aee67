"""Out-of-memory split-and-retry (engine/base.py `split_on_oom`)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from rerankd.engine.base import split_on_oom
from rerankd.types import EncodedPair


def test_retries_run_after_the_failed_attempts_memory_is_released():
    """The traceback of a failed attempt holds its activations; a retry inside the `except`
    block would keep them alive and, on a GPU, run out of memory again."""
    alive_during_retries: list[bool] = []
    failed: list[weakref.ref] = []

    def forward(pairs, groups):
        activations = torch.empty(1024)
        if len(pairs) > 1:
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("too big")
        gc.collect()
        alive_during_retries.append(any(ref() is not None for ref in failed))
        return [float(len(p)) for p in pairs]

    pairs = [EncodedPair((1,) * n) for n in (1, 2, 3, 4)]
    assert split_on_oom(forward, pairs, None, torch.device("cpu")) == [1.0, 2.0, 3.0, 4.0]
    assert alive_during_retries == [False] * 4


def test_a_single_pair_that_does_not_fit_reraises():
    def forward(pairs, groups):
        raise torch.OutOfMemoryError("too big")

    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(forward, [EncodedPair((1, 2))], None, torch.device("cpu"))
