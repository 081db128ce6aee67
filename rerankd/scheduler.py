"""The scheduler: one asyncio task owns the queue and feeds the engine token-budget batches.

Requests arrive already tokenized (`EncodedPair`s). The loop takes pairs round-robin
across waiting requests — longest first within each request — until the batch holds
`max_batch_tokens`, so a 1-document request is never stuck behind a 1,000-document one
and concurrent requests share batches. The engine runs in one worker thread; results are
resolved back on the event loop. Requests whose client went away are skipped before
compute. A full queue refuses new work at once (`Overloaded`) instead of growing.

One batch ahead (engines with `pipelined` true: the packed engine on CUDA): batch n is
launched (`prepare`, `launch`: its kernels queued, nothing waited for), then batch n+1 is
taken from the queue and packed and uploaded (`prepare`) while n runs on the device, and only
then are n's scores read (`collect`, the batch's one host sync). At most one batch is
prepared ahead, so the queue, and cancellations, still decide what runs next. A batch whose
pipelined run fails is scored again through `engine.score` (OOM split and all) with the
usual failure handling. Engines without `pipelined` (every CPU engine) run as before:
`engine.score` per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rerankd.errors import InferenceFailed, Overloaded, ShuttingDown
from rerankd.metrics import Metrics
from rerankd.types import Batch, EncodedPair, Engine

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    """One request's pairs waiting in the queue."""

    pairs: list[EncodedPair]
    future: asyncio.Future
    enqueued_at: float
    scores: list[float | None] = field(init=False)
    #: pair indices not yet batched, longest first
    pending: deque[int] = field(init=False)
    outstanding: int = field(init=False)
    started: bool = False

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.pairs)
        order = sorted(range(len(self.pairs)), key=lambda i: len(self.pairs[i]), reverse=True)
        self.pending = deque(order)
        self.outstanding = len(self.pairs)

    @property
    def pending_tokens(self) -> int:
        return sum(len(self.pairs[i]) for i in self.pending)


@dataclass
class _Flight:
    """A batch taken from the queue, from the moment it is taken until it is resolved."""

    taken: list[tuple[_Entry, int]]
    batch: Batch
    requests: int
    #: pipelined engines: what `prepare` returned, then what `launch` returned; None once a
    #: step failed (`error`, its description), and the batch goes through `engine.score`
    handle: object = None
    error: str | None = None
    started: float = 0.0


class Scheduler:
    """Single owner of the pair queue for one model/engine."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        model_name: str,
        max_batch_tokens: int | None = None,
        max_queued_tokens: int = 2_000_000,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.max_batch_tokens = max_batch_tokens or engine.default_batch_tokens
        self.max_queued_tokens = max_queued_tokens
        self._queue: deque[_Entry] = deque()
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerankd-engine")
        self._task: asyncio.Task | None = None
        self._accepting = True
        #: futures of every request not yet answered (queued or in a running batch)
        self._waiting: set[asyncio.Future] = set()

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def loop_ended(self) -> bool:
        """Whether the batching loop was started and has ended without `stop()` clearing it:
        it crashed, or `stop()` is cancelling it right now (a health probe asks this)."""
        return self._task is not None and self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="rerankd-scheduler"
            )

    async def stop(self) -> None:
        """Stop taking work, finish what is queued, then stop the loop."""
        self._accepting = False
        # wait for queued work only while the loop is alive to do it (a forced exit cancels it)
        while self._queue and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def abort(self, exc: Exception) -> int:
        """Fail every unanswered request with `exc` (a drain that ran out of time answers
        them with an error instead of dropping their connections); returns how many."""
        self._accepting = False
        aborted = 0
        for future in list(self._waiting):
            if not future.done():
                future.set_exception(exc)
                aborted += 1
        for entry in self._queue:
            entry.pending.clear()
        self._queue.clear()
        self._add_queued(-self._queued_tokens)
        return aborted

    # --- submission --------------------------------------------------------------------

    async def submit(self, pairs: list[EncodedPair]) -> list[float]:
        """Queue pairs and wait for their raw scores (in the same order)."""
        if not pairs:
            return []
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        tokens = sum(len(p) for p in pairs)
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queued_tokens:
            self.metrics.rejected.labels(self.model_name).inc()
            raise Overloaded(
                f"the server is busy ({self._queued_tokens} tokens queued, limit "
                f"{self.max_queued_tokens}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        entry = _Entry(pairs, loop.create_future(), time.perf_counter())
        self._queue.append(entry)
        self._add_queued(tokens)
        self._waiting.add(entry.future)
        self._wakeup.set()
        try:
            return await entry.future
        finally:
            self._waiting.discard(entry.future)
            if not entry.future.done():
                entry.future.cancel()  # client went away: the loop drops the rest of its pairs

    def _add_queued(self, tokens: int) -> None:
        self._queued_tokens += tokens
        self.metrics.queued_tokens.labels(self.model_name).set(self._queued_tokens)

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if getattr(self.engine, "pipelined", False):
            await self._run_pipelined(loop)
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            flight = self._take_flight()
            await self._finish(loop, flight, None)

    async def _run_pipelined(self, loop) -> None:
        """The one-ahead loop (module docstring): launch n, prepare n+1, collect n, launch
        n+1, prepare n+2, ... Never returns (cancelled by `stop`)."""
        current: _Flight | None = None
        while True:
            if current is None:
                self._drop_cancelled()
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                current = self._take_flight()
                await self._engine_step(loop, current, "prepare")
                await self._engine_step(loop, current, "launch")
            # batch n runs on the device: take and pack batch n+1 meanwhile (one ahead)
            self._drop_cancelled()
            following = self._take_flight() if self._queue else None
            if following is not None:
                await self._engine_step(loop, following, "prepare")
            raw = await self._engine_step(loop, current, "collect")
            await self._finish(loop, current, raw)
            if following is not None:
                await self._engine_step(loop, following, "launch")
            current = following

    async def _engine_step(self, loop, flight: _Flight, step: str) -> list[float] | None:
        """Run `engine.<step>(flight's batch or handle)` on the engine thread; on failure keep
        the error on the flight (`_finish` then scores it through `engine.score`). Returns
        the scores for `collect` (None after a failure)."""
        if flight.error is not None:
            return None
        if step == "launch":
            flight.started = time.perf_counter()
        argument = flight.batch if step == "prepare" else flight.handle
        try:
            result = await loop.run_in_executor(
                self._executor, getattr(self.engine, step), argument
            )
        except Exception as exc:
            log.warning(
                "pipelined %s failed on a batch of %d pairs (%s: %s); scoring it again",
                step,
                len(flight.taken),
                type(exc).__name__,
                exc,
            )
            # a description, not the exception: its traceback would keep the failed attempt's
            # device memory alive through the retry (split_on_oom's reason, engine/base.py)
            flight.error, flight.handle = f"{type(exc).__name__}: {exc}", None
            return None
        if step != "collect":
            flight.handle = result
            return None
        if len(result) != len(flight.taken):  # a bug: `engine.score` will say so, and fail it
            log.warning(
                "pipelined collect returned %d scores for %d pairs", len(result), len(flight.taken)
            )
            flight.error, flight.handle = "wrong number of scores", None
            return None
        return result

    def _take_flight(self) -> _Flight:
        """The next batch from the queue, its requests' pairs grouped, its start recorded."""
        taken = self._next_batch()
        # pairs of one request form a group: the engine may share their token prefix
        group_of: dict[int, int] = {}
        for entry, _ in taken:
            group_of.setdefault(id(entry), len(group_of))
        batch = Batch([entry.pairs[i] for entry, i in taken], [group_of[id(e)] for e, _ in taken])
        self._record_batch_start(taken, batch)
        return _Flight(taken, batch, len(group_of), started=time.perf_counter())

    async def _finish(self, loop, flight: _Flight, raw: list[float] | None) -> None:
        """Resolve the flight's requests with `raw`; without scores (not pipelined, or its
        pipelined run failed) score it through `engine.score` first. A failed batch fails its
        requests, never the server."""
        taken = flight.taken
        if raw is None:
            if flight.error is not None:
                flight.started = time.perf_counter()
            try:
                raw = await self._score(loop, flight.batch, len(taken))
            except Exception as exc:
                log.exception("engine failed on a batch of %d pairs", len(taken))
                if flight.requests == 1:
                    self.metrics.failures.labels("inference").inc()
                    self._fail(taken, exc)
                    return
                # several requests shared the batch: retry each alone, so only the request
                # that really fails gets the error
                raw = await self._score_requests_alone(loop, taken)
                if raw is None:
                    return
        self.metrics.inference_time.labels(self.model_name).observe(
            time.perf_counter() - flight.started
        )
        self._resolve(taken, raw)

    async def _score(self, loop, batch: Batch, expected: int) -> list[float]:
        raw = await loop.run_in_executor(self._executor, self.engine.score, batch)
        if len(raw) != expected:
            raise RuntimeError(f"engine returned {len(raw)} scores for {expected} pairs")
        return raw

    async def _score_requests_alone(
        self, loop, taken: list[tuple[_Entry, int]]
    ) -> list[float] | None:
        """Re-run a failed shared batch request by request; fail only those that fail again.

        Returns the scores of all pairs if every request succeeded alone, else resolves the
        survivors itself and returns None.
        """
        by_entry: dict[int, list[int]] = {}
        for position, (entry, _) in enumerate(taken):
            by_entry.setdefault(id(entry), []).append(position)
        raw: list[float | None] = [None] * len(taken)
        failed = []
        for positions in by_entry.values():
            part = [taken[p] for p in positions]
            batch = Batch([entry.pairs[i] for entry, i in part], [0] * len(part))
            try:
                scores = await self._score(loop, batch, len(part))
            except Exception as exc:
                self.metrics.failures.labels("inference").inc()
                self._fail(part, exc)
                failed.append(part[0][0])
                continue
            for p, value in zip(positions, scores, strict=True):
                raw[p] = value
        if not failed:
            return raw
        self._resolve(
            [t for t, r in zip(taken, raw, strict=True) if r is not None],
            [r for r in raw if r is not None],
        )
        return None

    def _next_batch(self) -> list[tuple[_Entry, int]]:
        """Round-robin over waiting requests, longest pair first in each, up to the budget."""
        taken: list[tuple[_Entry, int]] = []
        tokens = 0
        progress = True
        while progress:
            progress = False
            for entry in self._queue:
                if not entry.pending:
                    continue
                size = len(entry.pairs[entry.pending[0]])
                if taken and tokens + size > self.max_batch_tokens:
                    continue
                taken.append((entry, entry.pending.popleft()))
                tokens += size
                progress = True
        self._add_queued(-tokens)
        # fully batched entries leave the queue; their futures resolve when results come back
        self._queue = deque(entry for entry in self._queue if entry.pending)
        return taken

    def _drop_cancelled(self) -> None:
        kept = deque()
        for entry in self._queue:
            if entry.future.done():
                self._add_queued(-entry.pending_tokens)
                entry.pending.clear()
            else:
                kept.append(entry)
        self._queue = kept

    def _record_batch_start(self, taken: list[tuple[_Entry, int]], batch: Batch) -> None:
        now = time.perf_counter()
        for entry, _ in taken:
            if not entry.started:
                entry.started = True
                self.metrics.queue_time.labels(self.model_name).observe(now - entry.enqueued_at)
        self.metrics.batch_pairs.labels(self.model_name).observe(len(batch.pairs))
        self.metrics.batch_tokens.labels(self.model_name).observe(batch.num_tokens)

    def _resolve(self, taken: list[tuple[_Entry, int]], raw: list[float]) -> None:
        for (entry, index), value in zip(taken, raw, strict=True):
            entry.scores[index] = float(value)
            entry.outstanding -= 1
            if entry.outstanding == 0 and not entry.future.done():
                entry.future.set_result(entry.scores)

    def _fail(self, taken: list[tuple[_Entry, int]], exc: Exception) -> None:
        failed = {id(entry): entry for entry, _ in taken}
        for entry in failed.values():
            if not entry.future.done():
                entry.future.set_exception(
                    InferenceFailed(
                        f"inference failed for this request: {type(exc).__name__}: {exc}"
                    )
                )
            if entry.pending:
                self._add_queued(-entry.pending_tokens)
                entry.pending.clear()
        self._queue = deque(e for e in self._queue if e.pending)
