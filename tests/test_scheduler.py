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


# --- one batch ahead (pipelined engines: the packed engine on CUDA) ---------------------------


class PipelinedEngine(FakeEngine):
    """A fake device: `launch` returns at once, the scores appear when `collect` reads them.
    Records every step, so the test sees what was packed before what was read."""

    pipelined = True

    def __init__(self, fail_step: str | None = None) -> None:
        super().__init__()
        self.steps: list[tuple[str, tuple[int, ...]]] = []
        self.fail_step = fail_step
        self.scored_alone: list[tuple[int, ...]] = []

    def _step(self, name: str, batch: Batch) -> None:
        first = batch.pairs[0].input_ids
        self.steps.append((name, first))
        if name == self.fail_step and first[0] == 2:  # the second request's batches fail
            raise RuntimeError(f"injected {name} failure")

    def prepare(self, batch: Batch) -> Batch:
        self._step("prepare", batch)
        return batch

    def launch(self, batch: Batch) -> Batch:
        self._step("launch", batch)
        return batch

    def collect(self, batch: Batch) -> list[float]:
        self._step("collect", batch)
        return [float(sum(p.input_ids)) for p in batch.pairs]

    def score(self, batch: Batch) -> list[float]:
        self.scored_alone.append(batch.pairs[0].input_ids)
        return super().score(batch)


def _pipelined_run(engine: FakeEngine, requests: list[list[EncodedPair]]) -> list[list[float]]:
    async def main():
        scheduler = Scheduler(engine, Metrics(), "fake", max_batch_tokens=10)
        # every request queued before the loop starts, so the batches are known in advance
        tasks = [asyncio.create_task(scheduler.submit(p)) for p in requests]
        await asyncio.sleep(0)
        scheduler.start()
        results = await asyncio.gather(*tasks)
        await scheduler.stop()
        return results

    return run(main())


REQUESTS = [pairs_of(10, base=1), pairs_of(10, base=2), pairs_of(10, base=3)]


def test_the_next_batch_is_packed_before_the_current_ones_scores_are_read():
    engine = PipelinedEngine()
    assert _pipelined_run(engine, REQUESTS) == [expected(p) for p in REQUESTS]
    first, second, third = ((base,) * 10 for base in (1, 2, 3))
    assert engine.steps == [
        ("prepare", first),
        ("launch", first),
        ("prepare", second),  # batch n+1 packed while batch n runs ...
        ("collect", first),  # ... before n's scores are read: one sync per batch, after
        ("launch", second),
        ("prepare", third),
        ("collect", second),
        ("launch", third),
        ("collect", third),
    ]
    assert engine.scored_alone == []  # `score` never ran: every batch went through the pipeline


def test_pipelined_and_plain_scores_are_identical():
    plain, pipelined = FakeEngine(), PipelinedEngine()
    requests = [pairs_of(3, 9, 1, 5), pairs_of(7, 7, base=4), pairs_of(12, 2, 6, base=9)]
    assert _pipelined_run(pipelined, requests) == _pipelined_run(plain, requests)
    assert len({step for step, _ in pipelined.steps}) == 3


@pytest.mark.parametrize("step", ["prepare", "launch", "collect"])
def test_a_failed_pipeline_step_scores_that_batch_through_score(step):
    """The failed batch is scored again by `engine.score` (which splits on OOM); the batches
    around it stay in the pipeline."""
    engine = PipelinedEngine(fail_step=step)
    assert _pipelined_run(engine, REQUESTS) == [expected(p) for p in REQUESTS]
    assert engine.scored_alone == [(2,) * 10]
    assert ("collect", (1,) * 10) in engine.steps and ("collect", (3,) * 10) in engine.steps


def test_the_packed_engine_scores_bit_identically_through_the_pipeline(qwen3_dir, monkeypatch):
    """The real packed engine on CPU, forced through prepare/launch/collect: the same floats
    as its `score` (on CPU `pipelined` is off: checked first)."""
    from rerankd.engine.packed_engine import PackedEngine
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    settings = Settings(model=str(qwen3_dir), device="cpu", dtype="float32", compile="off")
    served = load_model(settings, Metrics())
    engine = served.scheduler.engine
    assert isinstance(engine, PackedEngine) and not engine.pipelined
    docs = ["Beijing is the capital of China.", "Gravity is a force.", "yes no", "北京", ""]
    requests = [served.recipe.encode(["capital of china?"] * len(docs), docs) for _ in range(3)]
    requests[1] = served.recipe.encode(["what is gravity?"] * 2, docs[:2])
    plain = _pipelined_run(engine, requests)
    steps: list[str] = []
    for name in ("prepare", "launch", "collect"):
        method = getattr(PackedEngine, name)
        monkeypatch.setattr(
            PackedEngine,
            name,
            lambda self, arg, _m=method, _n=name: steps.append(_n) or _m(self, arg),
        )
    monkeypatch.setattr(PackedEngine, "pipelined", property(lambda self: True))
    assert _pipelined_run(engine, requests) == plain
    assert steps.count("collect") == steps.count("launch") == steps.count("prepare") >= 3


def test_engines_with_their_own_forward_are_not_pipelined(qwen3_dir):
    import torch

    from rerankd.engine.faults import FaultInjectingEngine, FaultPlan
    from rerankd.engine.layerwise import LayerwiseEngine
    from rerankd.engine.lightweight import LightweightEngine
    from rerankd.engine.packed_engine import PackedEngine
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    served = load_model(Settings(model=str(qwen3_dir), device="cpu", compile="off"), Metrics())
    engine = served.scheduler.engine
    assert type(engine) is PackedEngine and not engine.pipelined  # CPU
    # the device switch alone, on bare instances (no model: only `pipelined` is read)
    cuda = torch.device("cuda")
    for cls, pipelined in ((PackedEngine, True), (LayerwiseEngine, False),
                           (LightweightEngine, False)):  # fmt: skip
        bare = object.__new__(cls)
        bare._device = cuda
        assert bare.pipelined is pipelined, cls
    engine._device = cuda
    try:
        assert engine.pipelined
        wrapped = FaultInjectingEngine(engine, FaultPlan(raise_on=[], oom_above=2))
        assert "forward" in vars(engine) and not engine.pipelined
        assert not getattr(wrapped, "pipelined", False)
    finally:
        engine._device = torch.device("cpu")
