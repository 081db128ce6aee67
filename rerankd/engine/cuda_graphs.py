"""Captured CUDA graphs of a packed model's forward, one per bucket of batch shapes.

Measured on an H200 (docs/benchmarks.md, "GPU (W-GPU)"): with the per-token work compiled,
a W-GPU request kept the GPU busy only 68 % of its wall time. The host, issuing ~16
kernels per layer (434 per request) through Python, dynamo's guards and Inductor's
launchers, was the limit. A captured graph replays all of a forward's kernels in one launch.

A graph replays fixed shapes on fixed memory, so a batch is first laid out as a bucketed
stream (`ops.static_batch`), copied into that bucket's input buffers and replayed. The
first batch of a bucket captures it: two warm-up runs on a side stream (compiled kernels
and the allocator settle), then the capture. The graphs share one memory pool (one replay
at a time, each one's scores copied out right after it), and at most `capacity` are kept.

A capture costs about three forwards, so traffic whose shapes keep changing must not
recapture batch after batch. When all places are taken, a new bucket replaces the least
recently used graph only if that one has served none of the last `STALE_AFTER` batches;
otherwise the batch runs without a graph (`admits` says which, before it is packed).

`capture` is a parameter so that CPU tests can check everything around the capture with
a stand-in that runs the same function again (a Python value of the first batch leaking
into the function would give wrong scores for the next one, exactly as a replay would).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rerankd.ops.static_batch import Bucket, RowLayout, StaticInputs, row_layout
from rerankd.types import EncodedPair

log = logging.getLogger(__name__)

#: graphs kept at most (each holds its bucket's input buffers and its place in the pool)
DEFAULT_CAPACITY = 16
#: runs before a capture: the first may compile kernels or grow the allocator's pool
WARMUP_RUNS = 2
#: batches a graph must have gone unused before a new bucket may take its place
STALE_AFTER = 64

#: `capture(fn, pool) -> (replay, output)`: after `replay()`, `output` holds `fn()`'s result
#: for the input buffers' current contents
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor]]


def cuda_capture(
    fn: Callable[[], torch.Tensor], pool: object
) -> tuple[Callable[[], None], torch.Tensor]:
    """`fn` captured as a CUDA graph in memory pool `pool` (warm-up runs first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread-local: another engine thread on this GPU (`--models`) may allocate or wait
    # meanwhile; only this thread's calls are barred from the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph.replay, output


def cuda_pool() -> object:
    return torch.cuda.graph_pool_handle()


class _Graph:
    """One bucket's input buffers, its captured forward and that forward's output."""

    def __init__(self, inputs: StaticInputs, replay: Callable[[], None], output: torch.Tensor):
        self.inputs = inputs
        self.replay = replay
        self.output = output
        #: the runner's batch count when this graph last served
        self.used = 0


class GraphRunner:
    """Scores batches by replaying captured forwards of `model` (a model with
    `forward_rows`: `DecoderReranker`, `Encoder`), one graph per bucket."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        share_prefix: bool,
        capacity: int = DEFAULT_CAPACITY,
        capture: Capture = cuda_capture,
        pool: object | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"graph capacity must be >= 1, got {capacity}")
        self.model = model
        self.device = device
        self.share_prefix = share_prefix
        self.capacity = capacity
        self._capture = capture
        self._pool = pool
        self._graphs: collections.OrderedDict[Bucket, _Graph] = collections.OrderedDict()
        #: graphs captured since start (a bucket dropped and seen again counts twice)
        self.captures = 0
        #: batches replayed since start
        self.batches = 0

    def layout(self, pairs: Sequence[EncodedPair], groups: Sequence[int] | None) -> RowLayout:
        """The batch as a bucketed stream (host only: safe while a replay runs)."""
        return row_layout(pairs, groups, self.share_prefix)

    def admits(self, bucket: Bucket) -> bool:
        """Whether a batch of `bucket` replays a graph: one is kept for it, a place is free,
        or the least recently used graph is stale (module docstring)."""
        if bucket in self._graphs or len(self._graphs) < self.capacity:
            return True
        oldest = next(iter(self._graphs.values()))
        return self.batches - oldest.used >= STALE_AFTER

    @torch.inference_mode()
    def launch(self, layout: RowLayout) -> torch.Tensor:
        """Queue the batch's forward (capturing its bucket first if new, where `admits`
        it); its raw scores (N,), a copy out of the graph's memory, not yet waited for."""
        if not self.admits(layout.bucket):
            raise RuntimeError(f"no graph place for {layout.bucket}: ask `admits` first")
        graph = self._graph(layout)
        graph.inputs.fill(layout)
        graph.replay()
        self.batches += 1
        graph.used = self.batches
        return graph.output[: layout.documents].clone()

    def buckets(self) -> list[Bucket]:
        """The buckets captured and kept, least recently used first."""
        return list(self._graphs)

    def _graph(self, layout: RowLayout) -> _Graph:
        """The graph of `layout`'s bucket, captured now if new (its warm-up runs on
        `layout`: real lengths, as served)."""
        bucket = layout.bucket
        graph = self._graphs.get(bucket)
        if graph is not None:
            self._graphs.move_to_end(bucket)
            return graph
        while len(self._graphs) >= self.capacity:
            self._graphs.popitem(last=False)
        started = time.perf_counter()
        inputs = StaticInputs(bucket, self.device)
        inputs.fill(layout)
        if self._pool is None and self.device.type == "cuda":
            self._pool = cuda_pool()
        replay, output = self._capture(lambda: self.model.forward_rows(inputs), self._pool)
        graph = self._graphs[bucket] = _Graph(inputs, replay, output)
        self.captures += 1
        log.info(
            "captured a CUDA graph for %d rows, %d sequences, %d keys (max lengths %d/%d) "
            "in %.2fs (%d kept)",
            bucket.rows,
            bucket.sequences,
            bucket.keys,
            bucket.max_q,
            bucket.max_k,
            time.perf_counter() - started,
            len(self._graphs),
        )
        return graph
