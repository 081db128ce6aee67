"""Captured CUDA graphs of a packed model's forward, one per bucket of batch shapes.

Measured on an H200 (docs/benchmarks.md, "GPU (W-GPU)"): with the per-token work compiled,
a W-GPU request kept the GPU busy only 68 % of its wall time. The host, issuing ~16
kernels per layer (434 per request) through Python, dynamo's guards and Inductor's
launchers, was the limit. A captured graph replays all of a forward's kernels in one launch.

A graph replays fixed shapes on fixed memory, so a batch is first laid out as a bucketed
stream (`ops.static_batch`), copied into that bucket's input buffers and replayed. The
first batch of a bucket captures it: two warm-up runs (compiled kernels and the allocator
settle), then the capture, both on the runner's own stream. The graphs share one memory
pool (one replay at a time, each one's scores copied out right after it), and at most
`capacity` are kept.

A capture costs about three forwards, so traffic whose shapes keep changing must not
recapture batch after batch. When all places are taken, a new bucket replaces the least
recently used graph only if that one has served none of the last `STALE_AFTER` batches
(every batch counts, replayed or not: `offer`); otherwise the batch runs without a graph
(`admits` says which, before it is packed). A bucket whose capture ran out of memory runs
without a graph from then on (`refuse`).

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

from rerankd.engine.base import CUDA_CAPTURE_LOCK
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


class CudaCapture:
    """Captures CUDA graphs on a stream of its own (one per runner: engines of several
    models on one GPU never share a capture stream), warm-up runs first on that stream.

    Torch's graph context empties the allocator's cache on entry, which must not happen
    while another thread captures (nor may `split_on_oom`'s `empty_cache`): captures hold
    `CUDA_CAPTURE_LOCK`, which `split_on_oom` takes too. The capture is thread-local:
    another engine thread may allocate or wait meanwhile. If a capture fails, the context
    leaves the allocator routing this thread's allocations to the graph's pool and the
    capture stream current: both are undone here (`_abandon`), so the process goes on
    without that graph."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()

    def __call__(
        self, fn: Callable[[], torch.Tensor], pool: object
    ) -> tuple[Callable[[], None], torch.Tensor]:
        previous = torch.cuda.current_stream()
        graph = torch.cuda.CUDAGraph()
        with CUDA_CAPTURE_LOCK:
            self.stream.wait_stream(previous)
            began = False
            try:
                with torch.cuda.stream(self.stream):
                    for _ in range(WARMUP_RUNS):
                        fn()
                began = True
                with torch.cuda.graph(
                    graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"
                ):
                    output = fn()
            except BaseException:
                if began:
                    _abandon(graph)
                raise
            finally:
                torch.cuda.set_stream(previous)
            previous.wait_stream(self.stream)
        return graph.replay, output


def _abandon(graph: torch.cuda.CUDAGraph) -> None:
    """What torch's graph context leaves undone when `capture_end` raises: this thread's
    allocations still go to the graph's pool. Best effort, through torch's private call
    (its name varies across versions); a torch without it keeps the state (logged)."""
    device = torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"):
        end = getattr(torch._C, name, None)
        if end is None:
            continue
        try:
            end(device, graph.pool())
            return
        except Exception:  # never began, or another signature: nothing more to undo here
            continue
    log.warning("a failed CUDA graph capture may leave the allocator routing to its pool")


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
    `forward_rows`: `DecoderReranker`, `Encoder`), one graph per bucket. `capture`: how
    (default: a `CudaCapture` of its own; CPU tests pass a stand-in)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        share_prefix: bool,
        capacity: int = DEFAULT_CAPACITY,
        capture: Capture | None = None,
        pool: object | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"graph capacity must be >= 1, got {capacity}")
        self.model = model
        self.device = device
        self.share_prefix = share_prefix
        self.capacity = capacity
        self._capture = capture  # made on the first capture when None
        self._pool = pool
        self._graphs: collections.OrderedDict[Bucket, _Graph] = collections.OrderedDict()
        #: buckets whose capture ran out of memory: their batches run without a graph
        self._refused: set[Bucket] = set()
        #: graphs captured since start (a bucket dropped and seen again counts twice)
        self.captures = 0
        #: batches offered since start (`offer`), replayed or not: the staleness clock
        self.seen = 0

    def layout(self, pairs: Sequence[EncodedPair], groups: Sequence[int] | None) -> RowLayout:
        """The batch as a bucketed stream (host only: safe while a replay runs)."""
        return row_layout(pairs, groups, self.share_prefix)

    def offer(self, bucket: Bucket) -> bool:
        """Count one batch of `bucket` and say whether it replays a graph (`admits`): every
        batch is offered once, so graphs the traffic no longer uses grow stale even while
        no batch replays."""
        self.seen += 1
        return self.admits(bucket)

    def admits(self, bucket: Bucket) -> bool:
        """Whether a batch of `bucket` replays a graph: one is kept for it, or a place is
        free, or the least recently used graph is stale (module docstring); never for a
        bucket whose capture ran out of memory."""
        if bucket in self._graphs:
            return True
        if bucket in self._refused:
            return False
        if len(self._graphs) < self.capacity:
            return True
        oldest = next(iter(self._graphs.values()))
        return self.seen - oldest.used >= STALE_AFTER

    def refuse(self, bucket: Bucket) -> None:
        """Run `bucket`'s batches without a graph from now on (its capture ran out of
        memory: smaller batches, e.g. `split_on_oom`'s halves, have their own buckets)."""
        self._refused.add(bucket)

    @torch.inference_mode()
    def launch(self, layout: RowLayout) -> torch.Tensor:
        """Queue the batch's forward (capturing its bucket first if new, where `admits`
        it); its raw scores (N,), a copy out of the graph's memory, not yet waited for."""
        if not self.admits(layout.bucket):
            raise RuntimeError(f"no graph place for {layout.bucket}: ask `admits` first")
        graph = self._graph(layout)
        graph.inputs.fill(layout)
        graph.replay()
        graph.used = self.seen
        return graph.output[: layout.documents].clone()

    def buckets(self) -> list[Bucket]:
        """The buckets captured and kept, least recently used first."""
        return list(self._graphs)

    def _graph(self, layout: RowLayout) -> _Graph:
        """The graph of `layout`'s bucket, captured now if new (its warm-up runs on
        `layout`: real lengths, as served); the least recently used graph is dropped only
        once the new one is captured."""
        bucket = layout.bucket
        graph = self._graphs.get(bucket)
        if graph is not None:
            self._graphs.move_to_end(bucket)
            return graph
        started = time.perf_counter()
        inputs = StaticInputs(bucket, self.device)
        inputs.fill(layout)
        if self._capture is None:
            self._capture = CudaCapture()
        if self._pool is None and self.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        replay, output = self._capture(lambda: self.model.forward_rows(inputs), self._pool)
        while len(self._graphs) >= self.capacity:
            self._graphs.popitem(last=False)
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
