"""Overlap on CUDA: pinned non-blocking uploads, the one-ahead pipeline, one host sync per
batch. `torch.cuda.set_sync_debug_mode("error")` turns any synchronizing call inside
`prepare` and `launch` into an error, so the audit of the forward path is checked, not just
written down."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from tests.fixtures.paths import fixture_dir

pytestmark = pytest.mark.gpu

QUERY = "what is the capital of china?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。",
    "The capital of France is Paris, a city on the Seine.",
    "yes no yes no maybe",
]


@functools.cache
def _served():
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    settings = Settings(
        model=str(fixture_dir("qwen3")), device="cuda", dtype="bfloat16", compile="off"
    )
    return load_model(settings, Metrics())


def _batch():
    from rerankd.types import Batch

    served = _served()
    pairs = served.recipe.encode([QUERY] * len(DOCUMENTS), DOCUMENTS)
    return Batch(pairs, [0] * len(pairs))


def test_uploads_are_pinned_and_give_the_blocking_uploads_values():
    from rerankd.ops.batch import pack

    batch = _batch()
    device = torch.device("cuda")
    blocking = pack(batch.pairs, batch.groups, device, pin=False).with_varlen_layout(pin=False)
    pinned = pack(batch.pairs, batch.groups, device).with_varlen_layout()
    torch.cuda.synchronize()
    assert torch.equal(blocking.input_ids, pinned.input_ids)
    assert torch.equal(blocking.positions, pinned.positions)
    assert torch.equal(blocking.varlen.gather, pinned.varlen.gather)
    assert torch.equal(blocking.varlen.cu_seq_k, pinned.varlen.cu_seq_k)


def test_prepare_and_launch_never_sync_and_collect_gives_the_scores_of_score():
    engine = _served().scheduler.engine
    assert engine.pipelined
    batch = _batch()
    expected = engine.score(batch)
    engine.launch(engine.prepare(batch))  # warm-up: first calls may load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = engine.launch(engine.prepare(batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.collect(pending) == expected  # the one sync, and bit-identical scores


def test_the_scheduler_pipeline_gives_the_scores_of_score():
    from rerankd.metrics import Metrics
    from rerankd.scheduler import Scheduler

    served = _served()
    engine = served.scheduler.engine
    batch = _batch()
    expected = engine.score(batch)

    async def main():
        # a small budget: one request spans several batches, so the pipeline runs ahead
        scheduler = Scheduler(engine, Metrics(), "qwen3", max_batch_tokens=64)
        scheduler.start()
        try:
            return await asyncio.gather(*(scheduler.submit(batch.pairs) for _ in range(3)))
        finally:
            await scheduler.stop()

    for got in asyncio.run(main()):
        # batches differ from the single `score` call: bf16 kernels over other row counts
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 0.1
