"""The service: plain request values → recipe-encoded pairs → scheduler → scored results.

It knows models (names and aliases), recipes, limits and the scheduler, but neither HTTP
nor tensors. Tokenization runs in worker threads (the Rust tokenizers drop the GIL), so the
event loop only routes.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rerankd.errors import (
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
)
from rerankd.inputs import (
    LongInputs,
    check_images,
    encode_request,
    estimate_tokens,
    score_layer,
)
from rerankd.metrics import Metrics
from rerankd.recipes import Recipe
from rerankd.recipes.media import MediaPolicy
from rerankd.scheduler import Scheduler
from rerankd.types import EncodedPair, Ranking, ScoredPairs


@dataclass
class ServedModel:
    """One model this server answers for, with every name a client may use for it."""

    name: str
    recipe: Recipe
    scheduler: Scheduler
    aliases: list[str] = field(default_factory=list)
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    #: the attention kernel the engine chose at start-up (None where it has no choice)
    attention: str | None = None
    #: how the engine runs, as chosen at start-up (None where not known, e.g. a Ray ingress)
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    compiled: bool | None = None
    #: whether the engine replays CUDA graphs now, read live (they turn off, logged, if a
    #: capture fails while serving); None where not known
    cuda_graphs: Callable[[], bool] | None = None

    @property
    def max_length(self) -> int:
        return self.recipe.max_length


@dataclass(frozen=True)
class Limits:
    """Per-request limits; see Settings for what each protects against."""

    max_documents: int = 10_000
    max_query_tokens: int | None = None
    max_concurrent_requests: int = 512
    request_timeout: float = 300.0
    #: estimated tokens of admitted, unanswered requests; beyond it new ones get 429 at once
    max_queued_tokens: int = 2_000_000
    #: which images a request may make the server fetch and decode (recipes/media.py)
    media: MediaPolicy = MediaPolicy()


#: after a failed inference, and then while degraded, a known-good probe pair is scored at
#: most this often; /health is "degraded" (503) while the probe fails or scores non-finite.
#: A probe, not a failure count: a client repeating a poison input must not take healthy
#: instances out of rotation, while a broken checkpoint fails the probe too.
PROBE_EVERY_S = 10.0
PROBE_QUERY, PROBE_DOCUMENT = "warm-up query", "warm-up document"


def aliases_for(source: str, served_names: Sequence[str]) -> list[str]:
    """The names a model answers to: served names, the hub id/path, and the last path part
    of each (`--served-model-name Qwen/Qwen3-Reranker-4B` also answers `Qwen3-Reranker-4B`)."""
    names = list(served_names)
    stripped = source.rstrip("/")
    candidates = [stripped, *(n.rstrip("/") for n in served_names)]
    candidates += [c.rsplit("/", 1)[-1] for c in candidates]
    for candidate in candidates:
        if candidate and candidate not in names:
            names.append(candidate)
    return names


class RerankService:
    """Scores pairs for the API layer; one instance per server process."""

    def __init__(
        self, models: list[ServedModel], metrics: Metrics, limits: Limits | None = None
    ) -> None:
        if not models:
            raise ValueError("a service needs at least one model")
        self.models = models
        self.metrics = metrics
        self.limits = limits or Limits()
        self._by_name: dict[str, ServedModel] = {}
        for model in models:
            for name in [model.name, *model.aliases]:
                self._by_name.setdefault(name, model)
        self.ready = False
        self.draining = False
        #: requests between admission and their answer (drain waits for this to reach 0)
        self.in_flight = 0
        #: estimated tokens of those requests (admission control before tokenizing)
        self.admitted_tokens = 0
        #: models whose last health probe failed, and when each model was last probed
        self._degraded: set[str] = set()
        self._probed_at: dict[str, float] = {}
        self._probes: set[asyncio.Task] = set()
        # tokenization is CPU work: a bounded pool, so a flood cannot starve the engine
        self._tokenizers = ThreadPoolExecutor(
            max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="rerankd-tok"
        )

    @property
    def state(self) -> str:
        """ok, loading, draining or degraded (what /health reports). While degraded, each
        call may start a new probe (at most every PROBE_EVERY_S), so an instance taken out
        of rotation comes back by itself once its engine scores again."""
        if self.draining:
            return "draining"
        if not self.ready:
            return "loading"
        for model in self.models:
            if model.name in self._degraded:
                self._probe_soon(model)
        return "degraded" if self._degraded else "ok"

    def _probe_soon(self, model: ServedModel) -> None:
        """Score the known-good probe pair in the background (rate-limited)."""
        now = time.monotonic()
        if now - self._probed_at.get(model.name, -PROBE_EVERY_S) < PROBE_EVERY_S:
            return
        self._probed_at[model.name] = now
        task = asyncio.get_running_loop().create_task(self._probe(model))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, model: ServedModel) -> None:
        try:
            pairs = await asyncio.get_running_loop().run_in_executor(
                self._tokenizers, model.recipe.encode, [PROBE_QUERY], [PROBE_DOCUMENT]
            )
            scores = await model.scheduler.submit(pairs)
            healthy = all(math.isfinite(s) for s in scores)
        except (ShuttingDown, Overloaded):
            return  # says nothing about the engine
        except Exception:
            healthy = False
        if healthy:
            self._degraded.discard(model.name)
        else:
            self.metrics.failures.labels("health_probe").inc()
            self._degraded.add(model.name)

    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names (None/empty → the default, i.e. first, model)."""
        if not name:
            return self.models[0]
        model = self._by_name.get(name)
        if model is None:
            served = ", ".join(m.name for m in self.models)
            raise ModelNotFound(
                f"model {name!r} is not served here; available: {served}", param="model"
            )
        return model

    async def score_pairs(
        self,
        model: ServedModel,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None = None,
        truncate: bool = True,
        *,
        truncation_side: str = "right",
        max_tokens_per_doc: int | None = None,
        max_chunks_per_doc: int | None = None,
        max_tokens_per_query: int | None = None,
        max_prompt_tokens: int | None = None,
        cutoff_layers: int | Sequence[int] | None = None,
        compress_ratio: int | None = None,
        compress_layers: Sequence[int] | None = None,
    ) -> ScoredPairs:
        """Score aligned pairs; raw scores and activated scores in input order.

        Long documents (DESIGN §1 and the dialect extras): `truncation_side="left"` keeps a
        too-long document's end (TEI); `max_tokens_per_doc` cuts each document to that many
        tokens first (Cohere v2); `max_chunks_per_doc` scores up to that many chunks of a long
        document and keeps the best chunk's score (Cohere v1; usage counts every chunk);
        `max_tokens_per_query` cuts the query, `max_prompt_tokens` each pair (vLLM's
        `truncate_prompt_tokens`: by cutting the document). `cutoff_layers`: the layer a
        layerwise model scores after (see recipes/bge_layerwise.py); a 400 for other models.
        `compress_ratio`/`compress_layers`: a token-compressing model's passage compression
        (recipes/bge_lightweight.py); a 400 for other models.

        Admission comes before any work: the request's tokens are estimated from its length
        and it gets a 429 at once when the estimate does not fit beside what is admitted.
        """
        layer = score_layer(model.recipe, cutoff_layers, compress_ratio, compress_layers)
        queries, documents = check_images(
            model.recipe, model.name, queries, documents, max_chunks_per_doc
        )
        estimate = estimate_tokens(model.max_length, queries, documents, instruction)
        self._admit(model, len(documents), estimate)
        self.in_flight += 1
        self.admitted_tokens += estimate
        options = LongInputs(
            truncate,
            truncation_side,
            max_tokens_per_doc,
            max_chunks_per_doc,
            max_tokens_per_query,
            max_prompt_tokens,
            layer,
        )
        try:
            return await self._score_in_time(model, queries, documents, instruction, options)
        finally:
            self.in_flight -= 1
            self.admitted_tokens -= estimate

    async def _score_in_time(self, model, queries, documents, instruction, options) -> ScoredPairs:
        """`_score` within --request-timeout; a failed inference starts a health probe."""
        try:
            scored = await asyncio.wait_for(
                self._score(model, queries, documents, instruction, options),
                self.limits.request_timeout,
            )
        except TimeoutError as exc:
            self.metrics.failures.labels("timeout").inc()
            raise RequestTimeout(
                f"the request took longer than {self.limits.request_timeout:g}s and was cancelled; "
                "send fewer or shorter documents, or raise --request-timeout"
            ) from exc
        except InferenceFailed:
            self._probe_soon(model)  # this input, or the engine? the probe tells
            raise
        self._degraded.discard(model.name)  # the engine just scored: it works
        return scored

    def _admit(self, model: ServedModel, num_documents: int, estimate: int) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        if num_documents > self.limits.max_documents:
            raise InvalidRequest(
                f"{num_documents} documents in one request; this server accepts at most "
                f"{self.limits.max_documents} (--max-documents): split the request",
                param="documents",
            )
        if self.in_flight >= self.limits.max_concurrent_requests:
            self.metrics.failures.labels("overloaded").inc()
            raise Overloaded(
                f"{self.in_flight} requests are already being served (limit "
                f"{self.limits.max_concurrent_requests}); retry shortly"
            )
        budget = self.limits.max_queued_tokens
        if self.admitted_tokens and self.admitted_tokens + estimate > budget:
            self.metrics.rejected.labels(model.name).inc()
            raise Overloaded(
                f"the server is busy (~{self.admitted_tokens} tokens queued or being scored, "
                f"this request ~{estimate}, limit {budget}, --max-queued-tokens); retry shortly"
            )

    async def _score(self, model, queries, documents, instruction, options) -> ScoredPairs:
        started = time.perf_counter()
        encode = functools.partial(
            encode_request,
            max_query_tokens=self.limits.max_query_tokens,
            media=self.limits.media,
        )
        groups = await asyncio.get_running_loop().run_in_executor(
            self._tokenizers, encode, model.recipe, queries, documents, instruction, options
        )
        self.metrics.tokenize_time.labels(model.name).observe(time.perf_counter() - started)
        pairs = [pair for group in groups for pair in group]
        flat = await model.scheduler.submit(pairs)
        self._check_finite(flat, groups)
        # a document's score is its best chunk's (one chunk unless max_chunks_per_doc split it)
        raw, at = [], 0
        for group in groups:
            raw.append(max(flat[at : at + len(group)]))
            at += len(group)
        tokens = sum(len(p) for p in pairs)
        truncated = sum(1 for group in groups if any(p.truncated for p in group))
        self.metrics.documents.labels(model.name).inc(len(groups))
        self.metrics.tokens.labels(model.name).inc(tokens)
        self.metrics.truncated.labels(model.name).inc(truncated)
        activate = model.recipe.activate
        return ScoredPairs(raw, [activate(r) for r in raw], tokens, truncated)

    def _check_finite(self, flat: list[float], groups: list[list[EncodedPair]]) -> None:
        """A NaN or infinite score is a failed inference, never an answer."""
        bad = next((i for i, value in enumerate(flat) if not math.isfinite(value)), None)
        if bad is None:
            return
        document = [d for d, group in enumerate(groups) for _ in group][bad]
        self.metrics.failures.labels("non_finite").inc()
        raise InferenceFailed(
            f"the model produced a non-finite score ({flat[bad]}) for document {document}: "
            "its weights or activations overflow (on float16, serve with --dtype bfloat16 or "
            "float32); no scores were returned"
        )

    async def rerank(
        self,
        model: ServedModel,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        truncate: bool = True,
        **long_inputs,
    ) -> ScoredPairs:
        """One query against many documents (`long_inputs`: see `score_pairs`)."""
        return await self.score_pairs(
            model, [query] * len(documents), documents, instruction, truncate, **long_inputs
        )

    async def rank_documents(
        self,
        model_name: str | None,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        truncate: bool = True,
        *,
        top_n: int | None = None,
        activated: bool = True,
        **long_inputs,
    ) -> Ranking:
        """A whole rerank request in one call: the model resolved, every document scored
        (`long_inputs`: see `score_pairs`), sorted and cut to `top_n` (None or 0: all)."""
        model = self.resolve(model_name)
        scored = await self.rerank(model, query, documents, instruction, truncate, **long_inputs)
        scores = scored.scores if activated else scored.raw_scores
        return Ranking(
            model.name,
            rank(scores, top_n),
            scores,
            scored.prompt_tokens,
            scored.truncated_documents,
        )

    async def start(self) -> None:
        for model in self.models:
            model.scheduler.start()
        self.ready = True

    def begin_drain(self) -> None:
        """Stop admitting requests (health turns 503); in-flight ones go on."""
        self.draining = True

    def abort_in_flight(self) -> int:
        """Answer every request still in flight with ShuttingDown (503) now: called when
        the drain timeout runs out, so no client gets a dropped connection or a bare 500.
        Returns how many requests were aborted."""
        self.draining = True
        error = ShuttingDown(
            "the server is shutting down and its drain timeout ran out before this request "
            "finished; retry on another instance"
        )
        return sum(model.scheduler.abort(error) for model in self.models)

    async def stop(self) -> None:
        """Refuse new work, finish queued work, stop the schedulers."""
        self.draining = True
        self.ready = False
        for model in self.models:
            await model.scheduler.stop()
        self._tokenizers.shutdown(wait=False, cancel_futures=True)


def rank(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices sorted by score descending (ties: lower index first), cut to `top_n`."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if not top_n else order[:top_n]
