"""CUDA graphs of the packed decoders and encoders captured for real
(engine/cuda_graphs.py), bf16 on the tiny fixtures: `--cuda-graphs on` turns them on and they give the scores of the same engine
without them, one graph serves every batch of its bucket, the scheduler's one-ahead path
replays them, and a replay never waits for the device. tests/test_cuda_graphs.py checks
the same around a stand-in capture on CPU; benchmarks/bench_gpu.py --cuda-graphs on
measures them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rerankd.engine.cuda_graphs import GraphRunner
from rerankd.types import Batch, EncodedPair
from tests.gpu.test_host_syncs_cuda import no_host_sync
from tests.loaded import loaded_fixture
from tests.test_cuda_graphs import FIXTURES, _pairs, _without_graphs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
#: |Δ raw score| allowed between the graphs and the forward without them: bf16 noise
#: (other row counts, so other GEMM kernels), far below a wrong offset or a stale buffer
TOLERANCE = 2e-2


def _served(fixture: str = "qwen3", compile: str = "off"):
    """The fixture as `serve --device cuda --dtype bfloat16 --cuda-graphs on` loads it
    (eager unless `compile`: `--compile auto` compiles the decoders on CUDA)."""
    return loaded_fixture(
        fixture,
        FIXTURES[fixture],
        device="cuda",
        dtype="bfloat16",
        attention="auto",
        cuda_graphs="on",
        compile=compile,
    )


def _engine(served):
    engine = served.scheduler.engine
    assert engine.graphs is not None, f"graphs off (attention {engine.kernel}; see the log)"
    return engine


@pytest.mark.parametrize(("fixture", "compile"), [*((f, "off") for f in FIXTURES), ("qwen3", "on")])
def test_graphs_turn_on_and_give_the_scores_without_them(fixture, compile):
    """Every family eager, and the decoder as served by default on CUDA: Inductor's
    compiled per-token kernels inside the captured graph."""
    served = _served(fixture, compile)
    assert served.scheduler.engine.compiled == (compile == "on")
    engine = _engine(served)
    assert engine.graphs.captures >= 1  # the start-up probe's bucket
    pairs, groups = _pairs(served)
    for batch in (Batch(pairs, groups), Batch(pairs, None), Batch(pairs[:1], None)):
        expected = _without_graphs(engine, batch)
        assert engine.score(batch) == pytest.approx(expected, abs=TOLERANCE)
        if len(expected) > 1:  # distinct scores, or a constant output would pass
            assert max(expected) - min(expected) > 0.1
    assert engine.graphs is not None  # no replay failed and turned them off


def test_one_graph_serves_two_batches_of_its_bucket():
    served = _served()
    engine = _engine(served)
    runner = GraphRunner(engine.model, CUDA, engine.share_prefix)
    first, groups = _pairs(served)
    second = [EncodedPair(tuple(t % 97 + 3 for t in p.input_ids)) for p in first][::-1]
    layouts = [runner.layout(first, groups), runner.layout(second, groups[::-1])]
    assert layouts[0].bucket == layouts[1].bucket
    got = [runner.launch(layout).tolist() for layout in layouts]
    assert runner.captures == 1
    for scores, pairs, g in ((got[0], first, groups), (got[1], second, groups[::-1])):
        assert scores == pytest.approx(_without_graphs(engine, Batch(pairs, g)), abs=TOLERANCE)
    assert got[0] != pytest.approx(got[1][::-1], abs=0.05)  # other tokens, other scores


def test_pipelined_batches_replay_graphs_and_give_the_scores_of_score():
    """Two batches of one bucket launched back to back before either is collected (the
    second refills the buffers the first replayed from), then the scheduler itself with a
    small token budget, so that one request spans several batches run one ahead."""
    from rerankd.metrics import Metrics
    from rerankd.scheduler import Scheduler

    served = _served()
    engine = _engine(served)
    assert engine.pipelined
    pairs, groups = _pairs(served)
    batches = [Batch(pairs, groups), Batch(pairs[::-1], groups[::-1])]
    expected = [engine.score(batch) for batch in batches]
    launched = [engine.launch(engine.prepare(batch)) for batch in batches]
    assert [engine.collect(p) for p in launched] == expected  # the same graph, same inputs

    async def main():
        scheduler = Scheduler(engine, Metrics(), "qwen3", max_batch_tokens=64)
        scheduler.start()
        try:
            return await asyncio.gather(*(scheduler.submit(pairs) for _ in range(3)))
        finally:
            await scheduler.stop()

    for got in asyncio.run(main()):  # other batches than `score`'s: other buckets
        assert got == pytest.approx(expected[0], abs=TOLERANCE)
    assert engine.graphs is not None


def test_a_replay_of_a_captured_bucket_never_syncs():
    served = _served()
    engine = _engine(served)
    pairs, groups = _pairs(served)
    batch = Batch(pairs, groups)
    expected = engine.collect(engine.launch(engine.prepare(batch)))  # captured, if new
    captures = engine.graphs.captures
    with no_host_sync():
        pending = engine.launch(engine.prepare(batch))
    assert engine.collect(pending) == expected
    assert engine.graphs.captures == captures
