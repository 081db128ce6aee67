"""The service: plain request values → recipe-encoded pairs → scheduler → scored results.

It knows models (names and aliases), recipes, limits and the scheduler, but neither HTTP
nor tensors. Tokenization runs in worker threads (the Rust tokenizers drop the GIL), so the
event loop only routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from rerankd.errors import InvalidRequest, ModelNotFound, Overloaded, RequestTimeout, ShuttingDown
from rerankd.metrics import Metrics
from rerankd.recipes import Recipe
from rerankd.scheduler import Scheduler
from rerankd.types import EncodedPair, ScoredPairs


@dataclass
class ServedModel:
    """One model this server answers for, with every name a client may use for it."""

    name: str
    recipe: Recipe
    scheduler: Scheduler
    aliases: list[str] = field(default_factory=list)
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_length(self) -> int:
        return self.recipe.max_length


@dataclass(frozen=True)
class _LongInputs:
    """What a request asked for about documents that do not fit (see `score_pairs`)."""

    truncate: bool = True
    side: str = "right"
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None

    def encode(self, recipe: Recipe, queries, documents, instruction) -> list[list[EncodedPair]]:
        if self.max_chunks_per_doc is not None:
            return recipe.encode_chunks(
                queries,
                documents,
                instruction,
                self.truncate,
                max_chunks=self.max_chunks_per_doc,
                max_document_tokens=self.max_tokens_per_doc,
            )
        pairs = recipe.encode(
            queries,
            documents,
            instruction,
            self.truncate,
            side=self.side,
            max_document_tokens=self.max_tokens_per_doc,
        )
        return [[pair] for pair in pairs]


@dataclass(frozen=True)
class Limits:
    """Per-request limits; see Settings for what each protects against."""

    max_documents: int = 10_000
    max_query_tokens: int | None = None
    max_concurrent_requests: int = 512
    request_timeout: float = 300.0


def aliases_for(source: str, served_names: Sequence[str]) -> list[str]:
    """The names a model answers to: served names, the hub id/path, and its last part."""
    names = list(served_names)
    stripped = source.rstrip("/")
    for candidate in (stripped, stripped.rsplit("/", 1)[-1]):
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
    ) -> ScoredPairs:
        """Score aligned pairs; raw scores and activated scores in input order.

        Long documents (DESIGN §1 and the dialect extras): `truncation_side="left"` keeps a
        too-long document's end (TEI); `max_tokens_per_doc` cuts each document to that many
        tokens first (Cohere v2); `max_chunks_per_doc` scores up to that many chunks of a long
        document and keeps the best chunk's score (Cohere v1; usage counts every chunk).
        """
        self._admit(len(documents))
        self.in_flight += 1
        options = _LongInputs(truncate, truncation_side, max_tokens_per_doc, max_chunks_per_doc)
        try:
            return await asyncio.wait_for(
                self._score(model, queries, documents, instruction, options),
                self.limits.request_timeout,
            )
        except TimeoutError as exc:
            self.metrics.failures.labels("timeout").inc()
            raise RequestTimeout(
                f"the request took longer than {self.limits.request_timeout:g}s and was cancelled; "
                "send fewer or shorter documents, or raise --request-timeout"
            ) from exc
        finally:
            self.in_flight -= 1

    def _admit(self, num_documents: int) -> None:
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

    async def _score(self, model, queries, documents, instruction, options) -> ScoredPairs:
        started = time.perf_counter()
        groups = await asyncio.to_thread(
            self._encode, model.recipe, queries, documents, instruction, options
        )
        self.metrics.tokenize_time.labels(model.name).observe(time.perf_counter() - started)
        pairs = [pair for group in groups for pair in group]
        flat = await model.scheduler.submit(pairs)
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

    def _encode(
        self, recipe: Recipe, queries, documents, instruction, options: _LongInputs
    ) -> list[list[EncodedPair]]:
        """Tokenize (per document: its pairs, more than one only when chunked); a tokenizer
        failure is a 400 naming the first document that fails."""
        max_query = self.limits.max_query_tokens
        if max_query is not None:
            for query in dict.fromkeys(queries):
                if len(recipe.encode_text(query)) > max_query:
                    raise InvalidRequest(
                        f"the query is longer than {max_query} tokens (--max-query-tokens)",
                        param="query",
                    )
        try:
            return options.encode(recipe, queries, documents, instruction)
        except InvalidRequest:
            raise
        except Exception as exc:
            lenient = replace(options, truncate=True)
            for index, (query, document) in enumerate(zip(queries, documents, strict=True)):
                try:
                    lenient.encode(recipe, [query], [document], instruction)
                except Exception as single:
                    raise InvalidRequest(
                        f"document {index} could not be tokenized: {type(single).__name__}: {single}",
                        param=f"documents[{index}]",
                    ) from single
            raise InvalidRequest(f"the request could not be tokenized: {exc}") from exc

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


def rank(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices sorted by score descending (ties: lower index first), cut to `top_n`."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if not top_n else order[:top_n]
