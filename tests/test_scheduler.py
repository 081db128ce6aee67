"""Scheduler behaviour with a fake engine: batching, fairness, cancellation, faults, overload."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rerankd.errors import InferenceFailed, Overloaded, ShuttingDown
from rerankd.metrics import Metrics
from rerankd.scheduler import Scheduler
from rerankd.types import Batch, EncodedPair


class FakeEngine:
    """Scores a pair as the sum of its ids; records batches; can be slowed or made to fail."""

    device = "fake"
    dtype = "float32"
    default_batch_tokens = 64

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[tuple[int, ...]]] = []
        self.fail_when = lambda batch: False
        self.gate = threading.Event()
        self.gate.set()

    def score(self, batch: Batch) -> list[float]:
        self.gate.wait(10)
        self.batches.append([p.input_ids for p in batch.pairs])
        if self.fail_when(batch):
            raise RuntimeError("injected failure")
        time.sleep(self.delay_s)
        return [float(sum(p.input_ids)) for p in batch.pairs]


def pairs_of(*lengths: int, base: int = 1) -> list[EncodedPair]:
    return [EncodedPair(tuple([base + i] * n)) for i, n in enumerate(lengths)]


def expected(pairs: list[EncodedPair]) -> list[float]:
    return [float(sum(p.input_ids)) for p in pairs]


def run(coro):
    return asyncio.run(coro)


async def _started(engine: FakeEngine, **kwargs) -> Scheduler:
    scheduler = Scheduler(engine, Metrics(), "fake", **kwargs)
    scheduler.start()
    return scheduler


def test_scores_come_back_in_request_order():
    async def main():
        scheduler = await _started(FakeEngine())
        pairs = pairs_of(3, 9, 1, 5)
        assert await scheduler.submit(pairs) == expected(pairs)
        await scheduler.stop()

    run(main())


def test_batches_respect_token_budget_and_go_longest_first():
    async def main():
        engine = FakeEngine()
        scheduler = await _started(engine, max_batch_tokens=20)
        pairs = pairs_of(5, 12, 7, 3, 9, 30)  # 30 exceeds the budget alone: batched by itself
        assert await scheduler.submit(pairs) == expected(pairs)
        await scheduler.stop()
        for batch in engine.batches:
            assert len(batch) == 1 or sum(len(ids) for ids in batch) <= 20
        assert len(engine.batches[0][0]) == 30  # longest first

    run(main())


def test_concurrent_requests_share_batches():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()  # hold the engine so both requests are queued together
        scheduler = await _started(engine, max_batch_tokens=1000)
        warm = asyncio.create_task(scheduler.submit(pairs_of(1, base=90)))
        await asyncio.sleep(0.05)
        a_pairs, b_pairs = pairs_of(4, 4, base=10), pairs_of(4, base=20)
        a = asyncio.create_task(scheduler.submit(a_pairs))
        b = asyncio.create_task(scheduler.submit(b_pairs))
        await asyncio.sleep(0.05)
        engine.gate.set()
        assert await a == expected(a_pairs) and await b == expected(b_pairs)
        await warm
        await scheduler.stop()
        mixed = [batch for batch in engine.batches if {ids[0] for ids in batch} >= {10, 11, 20}]
        assert mixed, f"requests were not batched together: {engine.batches}"

    run(main())


def test_small_request_is_not_stuck_behind_a_large_one():
    async def main():
        engine = FakeEngine(delay_s=0.01)
        scheduler = await _started(engine, max_batch_tokens=40)
        big = asyncio.create_task(scheduler.submit(pairs_of(*[10] * 200)))
        await asyncio.sleep(0.03)
        small = await scheduler.submit(pairs_of(10, base=500))
        assert small == [5000.0]
        assert not big.done(), "the small request should finish long before the large one"
        await big
        await scheduler.stop()

    run(main())


def test_cancelled_request_stops_consuming_compute():
    async def main():
        engine = FakeEngine(delay_s=0.01)
        scheduler = await _started(engine, max_batch_tokens=10)
        task = asyncio.create_task(scheduler.submit(pairs_of(*[10] * 100)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        computed = len(engine.batches)
        await asyncio.sleep(0.1)
        assert len(engine.batches) <= computed + 1  # at most the batch already running
        assert computed < 100
        assert scheduler._queued_tokens == 0
        await scheduler.stop()

    run(main())


def test_engine_failure_fails_only_affected_requests():
    async def main():
        engine = FakeEngine()
        engine.fail_when = lambda batch: any(p.input_ids[0] == 666 for p in batch.pairs)
        scheduler = await _started(engine, max_batch_tokens=4)
        with pytest.raises(InferenceFailed, match="injected failure"):
            await scheduler.submit(pairs_of(4, base=666))
        pairs = pairs_of(4, 4)
        assert await scheduler.submit(pairs) == expected(pairs)
        await scheduler.stop()

    run(main())


def test_full_queue_rejects_new_requests_at_once():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()
        scheduler = await _started(engine, max_batch_tokens=10, max_queued_tokens=50)
        running = asyncio.create_task(scheduler.submit(pairs_of(10)))  # taken by the engine
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(scheduler.submit(pairs_of(*[10] * 4)))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            await scheduler.submit(pairs_of(*[10] * 2))
        assert time.perf_counter() - started < 0.5
        engine.gate.set()
        await running, await queued
        await scheduler.stop()

    run(main())


def test_stopped_scheduler_refuses_new_work():
    async def main():
        scheduler = await _started(FakeEngine())
        await scheduler.stop()
        with pytest.raises(ShuttingDown):
            await scheduler.submit(pairs_of(1))

    run(main())
