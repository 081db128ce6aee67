"""Out of memory on CUDA: the batch is halved and retried, the request still answered."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from rerankd.engine.base import split_on_oom
from rerankd.types import EncodedPair

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
MiB = 1 << 20


@pytest.fixture
def memory_cap():
    """Set a per-process memory cap in bytes above what is reserved now; lifted afterwards."""
    # an index, not torch.device("cuda"): torch 2.11 refuses a device without one here
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory

    def cap(extra_bytes: int) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        limit = torch.cuda.memory_reserved(index) + extra_bytes
        torch.cuda.set_per_process_memory_fraction(limit / total, index)

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    torch.cuda.empty_cache()


def test_split_on_oom_halves_until_it_fits(memory_cap, caplog):
    """A forward needing 64 MiB per pair under a 300 MiB cap: 8 pairs fail, 4 fit."""
    sizes: list[int] = []

    def forward(pairs, groups):
        sizes.append(len(pairs))
        block = torch.ones(len(pairs), 64 * MiB // 4, device=CUDA)  # float32
        return block.sum(dim=1).div(64 * MiB // 4).tolist()

    pairs = [EncodedPair((i,)) for i in range(8)]
    memory_cap(300 * MiB)
    with caplog.at_level(logging.WARNING, logger="rerankd.engine.base"):
        scores = split_on_oom(forward, pairs, [0] * 8, CUDA)
    assert scores == [1.0] * 8
    assert sizes[0] == 8 and 4 in sizes
    assert "out of memory on 8 pairs" in caplog.text


def test_engine_splits_a_batch_that_does_not_fit(memory_cap, caplog):
    """The tiny Qwen3 fixture on CUDA, capped between what half the batch and the whole one
    take at their peak: the whole batch runs out of memory, the scores still come back."""
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings
    from rerankd.types import Batch
    from tests.fixtures.paths import fixture_dir

    served = load_model(
        Settings(model=str(fixture_dir("qwen3")), device="cuda", dtype="bfloat16", compile="off"),
        Metrics(),
    )
    engine = served.scheduler.engine
    rng = random.Random(0)
    pairs = [EncodedPair(tuple(rng.randrange(10, 1000) for _ in range(2048))) for _ in range(32)]

    def peak(batch_pairs) -> tuple[int, list[float]]:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(CUDA)
        base = torch.cuda.memory_reserved(CUDA)
        scores = engine.forward(batch_pairs, None)
        return torch.cuda.max_memory_reserved(CUDA) - base, scores

    half, _ = peak(pairs[:16])
    whole, expected = peak(pairs)
    assert whole > 1.5 * half, (whole, half)
    memory_cap((half + whole) // 2)
    with caplog.at_level(logging.WARNING, logger="rerankd.engine.base"):
        got = engine.score(Batch(pairs))
    assert "out of memory on 32 pairs" in caplog.text
    assert got == pytest.approx(expected, abs=5e-2)
