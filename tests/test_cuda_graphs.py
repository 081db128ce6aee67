"""CUDA graphs of the packed decoder (engine/cuda_graphs.py), checked on CPU around the
capture: the bucketed forward gives the engine's scores, a graph serves every batch of its
bucket, start-up refuses graphs that disagree or fail, and a failure while serving falls
back without losing the batch. The capture itself is a stand-in that runs the same function
again on the bucket's buffers (a Python value of the capturing batch leaking into the
function would give the next batch wrong scores, as a replay would); tests/gpu/
test_graphs_cuda.py captures real graphs."""

from __future__ import annotations

import logging

import pytest
import torch

from rerankd.engine import cuda_graphs
from rerankd.engine.cuda_graphs import GraphRunner
from rerankd.engine.packed_engine import GraphBatch, PackedEngine, check_modes
from rerankd.ops import attention
from rerankd.ops.static_batch import StaticInputs, row_layout
from rerankd.types import Batch, EncodedPair
from tests.host_syncs import HostSyncs, opaque
from tests.loaded import loaded_fixture
from tests.test_attention import aten_flash_2_11

#: decoders (GQA 4:2 with q/k norms; GQA 4:1 with Gemma's norms), encoders (XLM-R; BERT,
#: whose pairs carry token type ids)
FIXTURES = {"qwen3": 512, "gemma": 128, "xlmr": 128, "bert": 128}
ENCODERS = {"xlmr", "bert"}


def stand_in_capture(fn, pool):
    """A "graph" whose replay runs `fn` again into the output of its first run."""
    output = fn()
    return (lambda: output.copy_(fn())), output


def failing_capture(fn, pool):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(autouse=True)
def flash_stand_in(monkeypatch):
    """PyTorch's flash varlen op as torch 2.11 has it (CUDA only there): a math stand-in."""
    monkeypatch.setattr(attention, "aten_flash_kernel", lambda: aten_flash_2_11)


@pytest.fixture
def _restored():
    """`serve`'s fixtures (cached per process) put back as they were: SDPA, no graphs."""
    engines = []
    yield engines
    for engine in engines:
        engine.graphs = None
        engine.use_kernels("sdpa")


@pytest.fixture
def serve(_restored):
    def load(fixture: str):
        served = loaded_fixture(fixture, FIXTURES[fixture])
        served.scheduler.engine.use_kernels("flash_gqa")
        _restored.append(served.scheduler.engine)
        return served

    return load


def _pairs(served, seed: int = 0) -> tuple[list[EncodedPair], list[int]]:
    documents = ["Beijing is the capital.", "Paris lies on the Seine " * 6, "", "yes no"]
    queries = ["capital of china?", "where is paris"][seed % 2 :] + ["capital of china?"]
    pairs = served.recipe.encode([queries[0]] * 4, documents)
    pairs += served.recipe.encode([queries[1]] * 2, documents[seed % 2 : seed % 2 + 2])
    return pairs, [0, 0, 0, 0, 1, 1]


def _without_graphs(engine: PackedEngine, batch: Batch) -> list[float]:
    graphs, engine.graphs = engine.graphs, None
    try:
        return engine.score(batch)
    finally:
        engine.graphs = graphs


@pytest.mark.parametrize("fixture", FIXTURES)
def test_graph_replays_give_the_engines_scores(serve, fixture):
    served = serve(fixture)
    engine = served.scheduler.engine
    assert engine.enable_graphs(capture=stand_in_capture)
    pairs, groups = _pairs(served)
    for batch in (Batch(pairs, groups), Batch(pairs, None), Batch(pairs[:1], None)):
        expected = _without_graphs(engine, batch)
        assert engine.score(batch) == pytest.approx(expected, abs=1e-5)
        if len(expected) > 1:  # distinct scores, or a constant output would pass
            assert max(expected) - min(expected) > 1e-3
    assert engine.graphs is not None and engine.graphs.captures >= 2
    buckets = engine.graphs.buckets()
    # keys are gathered only where prefixes are shared: never for encoders
    assert any(b.keys for b in buckets) == (fixture not in ENCODERS)
    assert any(b.types for b in buckets) == (fixture == "bert")  # (not the probe's)


def test_one_graph_serves_every_batch_of_its_bucket(serve):
    served = serve("qwen3")
    engine = served.scheduler.engine
    runner = GraphRunner(engine.model, torch.device("cpu"), True, capture=stand_in_capture)
    first, groups = _pairs(served)
    second = [EncodedPair(tuple(t % 97 + 3 for t in p.input_ids)) for p in first]
    layouts = [runner.layout(first, groups), runner.layout(second[::-1], groups[::-1])]
    assert layouts[0].bucket == layouts[1].bucket
    got = [runner.launch(layout).tolist() for layout in layouts]
    assert runner.captures == 1
    assert got[0] == pytest.approx(engine.forward(first, groups), abs=1e-5)
    assert got[1] == pytest.approx(engine.forward(second[::-1], groups[::-1]), abs=1e-5)
    assert got[0] != pytest.approx(got[1][::-1], abs=1e-3)  # other tokens, other scores


def test_a_full_runner_replaces_only_a_stale_graph(serve, monkeypatch):
    """At capacity a new bucket takes the least recently used graph's place only once that
    one has gone `STALE_AFTER` batches unused: shapes that keep changing never recapture
    batch after batch (a capture costs about three forwards)."""
    monkeypatch.setattr(cuda_graphs, "STALE_AFTER", 3)
    served = serve("qwen3")
    engine = served.scheduler.engine
    runner = GraphRunner(engine.model, torch.device("cpu"), True, 2, stand_in_capture)
    pairs, groups = _pairs(served)
    a, b, c = (runner.layout(p, groups[: len(p)]) for p in (pairs[:1], pairs[:3], pairs))
    assert len({a.bucket, b.bucket, c.bucket}) == 3

    def serve_batch(layout) -> bool:  # as the engine does: offer, then replay if admitted
        admitted = runner.offer(layout.bucket)
        if admitted:
            runner.launch(layout)
        return admitted

    assert serve_batch(a) and serve_batch(b)
    assert not serve_batch(c)  # a served two batches ago
    with pytest.raises(RuntimeError, match="ask `admits` first"):
        runner.launch(c)
    assert serve_batch(b)
    assert serve_batch(c)  # a: three batches unused, stale
    assert runner.buckets() == [b.bucket, c.bucket]
    assert runner.captures == 3
    with pytest.raises(ValueError, match="capacity"):
        GraphRunner(engine.model, torch.device("cpu"), True, 0)


def test_graphs_the_traffic_left_grow_stale_even_when_nothing_replays(serve, monkeypatch):
    """Every batch offered counts: a runner filled by early traffic (warm-up, health
    checks) frees its places for the real load, even though that load, not admitted, never
    replays."""
    monkeypatch.setattr(cuda_graphs, "STALE_AFTER", 5)
    served = serve("qwen3")
    engine = served.scheduler.engine
    runner = GraphRunner(engine.model, torch.device("cpu"), True, 1, stand_in_capture)
    pairs, groups = _pairs(served)
    early, load = runner.layout(pairs[:1], groups[:1]), runner.layout(pairs, groups)
    assert runner.offer(early.bucket)
    runner.launch(early)
    admitted = [runner.offer(load.bucket) for _ in range(6)]
    assert admitted == [False, False, False, False, True, True]


def test_a_batch_without_a_graph_place_is_scored_without_capturing(serve):
    served = serve("qwen3")
    engine = served.scheduler.engine
    assert engine.enable_graphs(capture=stand_in_capture, capacity=1)
    captures = engine.graphs.captures
    pairs, _ = _pairs(served)
    batch = Batch(pairs * 3, None)  # another bucket than the start-up probe's
    assert engine.score(batch) == pytest.approx(_without_graphs(engine, batch), abs=1e-6)
    assert engine.graphs is not None and engine.graphs.captures == captures
    prepared = engine.prepare(batch)
    assert not isinstance(prepared, GraphBatch)  # packed as without graphs
    assert engine.collect(engine.launch(prepared)) == pytest.approx(
        _without_graphs(engine, batch), abs=1e-6
    )


def test_a_graph_gone_between_prepare_and_launch_runs_the_batch_without_it(serve):
    """The one-ahead pipeline prepares batch n+1 before batch n is collected (and maybe
    scored again through `score`): if by launch its graph place is gone, or graphs are
    off, the batch runs without a graph, and graphs are not turned off for it."""
    served = serve("qwen3")
    engine = served.scheduler.engine
    assert engine.enable_graphs(capture=stand_in_capture)
    pairs, groups = _pairs(served)
    batch = Batch(pairs, groups)
    expected = _without_graphs(engine, batch)
    prepared = engine.prepare(batch)
    assert isinstance(prepared, GraphBatch)
    engine.graphs.refuse(prepared.layout.bucket)  # its place gone meanwhile
    assert engine.collect(engine.launch(prepared)) == pytest.approx(expected, abs=1e-6)
    assert engine.graphs is not None
    prepared = engine.prepare(Batch(pairs[::-1], groups[::-1]))
    graphs, engine.graphs = engine.graphs, None  # turned off meanwhile
    assert engine.collect(engine.launch(prepared)) == pytest.approx(expected[::-1], abs=1e-6)
    engine.graphs = graphs


def test_a_capture_out_of_memory_splits_the_batch_and_keeps_graphs_on(serve, caplog):
    """Out of memory while capturing refuses that bucket only: `split_on_oom` halves the
    batch, the halves (other buckets) replay graphs, and later batches of the refused
    shape run without one."""
    served = serve("qwen3")
    engine = served.scheduler.engine
    assert engine.enable_graphs(capture=stand_in_capture)
    pairs, _ = _pairs(served)
    batch = Batch(pairs * 4, None)
    expected = _without_graphs(engine, batch)
    failures = []

    def out_of_memory_once(fn, pool):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return stand_in_capture(fn, pool)

    engine.graphs._capture = out_of_memory_once
    with caplog.at_level(logging.WARNING):
        assert engine.score(batch) == pytest.approx(expected, abs=1e-5)
    assert "batches of that shape run without a graph" in caplog.text
    assert "splitting the batch" in caplog.text
    assert engine.graphs is not None
    refused = engine.graphs.layout(batch.pairs, batch.groups).bucket
    assert not engine.graphs.admits(refused)
    assert engine.score(batch) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_bucketed_forward_never_syncs_the_host(serve, monkeypatch, fixture):
    """A capture fails on a host sync: the forward a graph records must have none."""
    served = serve(fixture)
    model = served.scheduler.engine.model
    pairs, groups = _pairs(served)
    layout = row_layout(pairs, groups)
    inputs = StaticInputs(layout.bucket, torch.device("cpu"))
    inputs.fill(layout)
    monkeypatch.setattr(attention, "aten_flash_kernel", lambda: opaque(aten_flash_2_11))
    with torch.inference_mode(), HostSyncs() as syncs:
        model.forward_rows(inputs)
    assert syncs.found == [], syncs.report()


def test_start_up_refuses_graphs_that_disagree(serve, monkeypatch, caplog):
    served = serve("qwen3")
    engine = served.scheduler.engine
    rows = engine.model.forward_rows
    monkeypatch.setattr(engine.model, "forward_rows", lambda inputs: rows(inputs) + 1.0)
    with caplog.at_level(logging.WARNING):
        assert not engine.enable_graphs(capture=stand_in_capture)
    assert engine.graphs is None
    assert "disagree with the forward by 1" in caplog.text


def test_start_up_refuses_graphs_that_cannot_be_captured(serve, caplog):
    served = serve("qwen3")
    engine = served.scheduler.engine
    with caplog.at_level(logging.WARNING):
        assert not engine.enable_graphs(capture=failing_capture)
    assert engine.graphs is None
    assert "CUDA graphs unavailable (RuntimeError: operation not permitted" in caplog.text


def test_a_capture_failing_while_serving_loses_no_batch(serve, caplog):
    """A new bucket whose capture fails (e.g. out of memory) is scored without the graph,
    and graphs stay off from then on."""
    served = serve("qwen3")
    engine = served.scheduler.engine
    assert engine.enable_graphs(capture=stand_in_capture)
    engine.graphs._capture = failing_capture
    pairs, _ = _pairs(served)
    batch = Batch(pairs * 4, None)  # a new bucket
    with caplog.at_level(logging.WARNING):
        got = engine.score(batch)
    assert engine.graphs is None
    assert "running without graphs from now on" in caplog.text
    assert got == pytest.approx(engine.score(batch), abs=1e-6)


def test_pipelined_batches_replay_graphs(serve):
    """The scheduler's one-ahead path (prepare on the host, launch, collect) gives `score`'s
    scores through the graphs."""
    served = serve("qwen3")
    engine = served.scheduler.engine
    assert engine.enable_graphs(capture=stand_in_capture)
    pairs, groups = _pairs(served)
    batches = [Batch(pairs, groups), Batch(pairs[::-1], None)]
    prepared = [engine.prepare(b) for b in batches]
    assert all(isinstance(p, GraphBatch) for p in prepared)  # host layouts, not packed
    got = [engine.collect(engine.launch(p)) for p in prepared]
    for scores, batch in zip(got, batches, strict=True):
        assert scores == pytest.approx(_without_graphs(engine, batch), abs=1e-5)


@pytest.mark.parametrize(("mode", "warns"), [("on", True), ("auto", False), ("off", False)])
def test_graphs_stay_off_on_cpu(mode, warns, caplog):
    with caplog.at_level(logging.WARNING):
        served = loaded_fixture("qwen3", 512, cuda_graphs=mode)
    assert served.scheduler.engine.graphs is None
    assert ("--cuda-graphs on: they run on CUDA only" in caplog.text) == warns


def test_an_engine_without_graphs_says_so_under_graphs_on(caplog):
    with caplog.at_level(logging.WARNING):
        loaded_fixture("qwen3", 512, engine="transformers", cuda_graphs="on")
    assert "--cuda-graphs on: the transformers engine has no CUDA graphs" in caplog.text


def test_unknown_graph_mode_names_the_flag():
    with pytest.raises(ValueError, match="unknown --cuda-graphs 'yes'; use auto, on or off"):
        check_modes("none", "auto", "auto", "yes")


def test_the_scheduler_one_ahead_with_graphs_scores_diverse_traffic_exactly(serve, monkeypatch):
    """Many requests of many shapes through the real scheduler, one batch ahead (forced
    on CPU), graphs on with few places and a short staleness window: batches replay,
    capture, replace stale graphs or run without one, prepared one ahead of the collect
    that may change the places; every request gets the scores the engine gives without
    graphs."""
    import asyncio
    import random

    from rerankd.metrics import Metrics
    from rerankd.scheduler import Scheduler

    monkeypatch.setattr(cuda_graphs, "STALE_AFTER", 2)
    monkeypatch.setattr(PackedEngine, "pipelined", property(lambda self: True))
    served = serve("qwen3")
    engine = served.scheduler.engine
    rng = random.Random(0)
    words = ["capital", "china", "paris", "seine", "gravity", "force", "yes", "no", "the"]
    requests = []
    for _ in range(24):
        documents = [" ".join(rng.choices(words, k=rng.randint(0, 30))) for _ in range(4)]
        documents = documents[: rng.randint(1, 4)]
        query = " ".join(rng.choices(words, k=rng.randint(1, 6)))
        requests.append(served.recipe.encode([query] * len(documents), documents))
    expected = [engine.score(Batch(pairs, [0] * len(pairs))) for pairs in requests]
    assert engine.enable_graphs(capture=stand_in_capture, capacity=2)

    async def main():
        scheduler = Scheduler(engine, Metrics(), "qwen3", max_batch_tokens=300)
        tasks = [asyncio.create_task(scheduler.submit(p)) for p in requests]
        await asyncio.sleep(0)
        scheduler.start()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await scheduler.stop()

    got = asyncio.run(main())
    for scores, want in zip(got, expected, strict=True):
        assert scores == pytest.approx(want, abs=1e-5)
    runner = engine.graphs
    assert runner is not None and runner.captures > 2  # places were taken over
    assert runner.seen > runner.captures  # and some batches replayed or ran without one
