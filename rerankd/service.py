"""The service: plain request values → recipe-encoded pairs → scheduler → scored results.

It knows models (names and aliases), recipes, limits and the scheduler, but neither HTTP
nor tensors. Tokenization runs in worker threads (the Rust tokenizers drop the GIL), so the
event loop only routes.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from rerankd.errors import (
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
)
from rerankd.metrics import Metrics
from rerankd.recipes import Recipe
from rerankd.recipes.chunking import encode_chunks
from rerankd.recipes.media import DecodedImage, MediaError, MediaPolicy, load_image
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
    max_tokens_per_query: int | None = None
    max_prompt_tokens: int | None = None
    #: the layer a layerwise model scores after (the request's `cutoff_layers`; None: default),
    #: or a lightweight model's `Compression` (layer, head and compression; recipe-made)
    layer: int | None = None

    def encode(self, recipe: Recipe, queries, documents, instruction) -> list[list[EncodedPair]]:
        if self.max_tokens_per_query is not None:
            unique = [q for q in dict.fromkeys(queries) if isinstance(q, str)]
            cut, _ = recipe.cap_texts(unique, self.max_tokens_per_query, "right")
            as_cut = dict(zip(unique, cut, strict=True))
            queries = [as_cut.get(q, q) if isinstance(q, str) else q for q in queries]
        if self.max_prompt_tokens is None:
            return self._encode(recipe, queries, documents, instruction, self.max_tokens_per_doc)
        # vLLM's truncate_prompt_tokens: each query's documents get what its prompt leaves
        groups: list[list[EncodedPair] | None] = [None] * len(documents)
        for query in dict.fromkeys(queries):
            at = [i for i, q in enumerate(queries) if q == query]
            encoded = self._encode(
                recipe,
                [query] * len(at),
                [documents[i] for i in at],
                instruction,
                self._document_room(recipe, query, instruction),
            )
            for i, group in zip(at, encoded, strict=True):
                groups[i] = group
        return groups  # type: ignore[return-value]

    def _document_room(self, recipe: Recipe, query: str, instruction) -> int:
        """Document tokens that fit in `max_prompt_tokens` beside this query's prompt."""
        assert self.max_prompt_tokens is not None
        prompt = len(recipe.encode([query], [""], instruction)[0])
        room = self.max_prompt_tokens - prompt
        if room < 1:
            raise InvalidRequest(
                f"truncate_prompt_tokens={self.max_prompt_tokens} leaves no room for a "
                f"document: the prompt without one is already {prompt} tokens",
                param="truncate_prompt_tokens",
            )
        return min(room, self.max_tokens_per_doc or room)

    def _encode(
        self, recipe: Recipe, queries, documents, instruction, max_document_tokens: int | None
    ) -> list[list[EncodedPair]]:
        if self.max_chunks_per_doc is not None:
            return encode_chunks(
                recipe,
                queries,
                documents,
                instruction,
                self.truncate,
                max_chunks=self.max_chunks_per_doc,
                max_document_tokens=max_document_tokens,
            )
        pairs = recipe.encode(
            queries,
            documents,
            instruction,
            self.truncate,
            side=self.side,
            max_document_tokens=max_document_tokens,
        )
        return [[pair] for pair in pairs]


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
#: characters per token assumed when estimating a request's size before tokenizing it
#: (English BPE averages ~4; a low estimate only admits a request the queue then refuses)
CHARS_PER_TOKEN_ESTIMATE = 4
#: tokens assumed per image before it is decoded (a 512x512 image is 256 merged patches)
TOKENS_PER_IMAGE_ESTIMATE = 256


def _chars(item) -> int:
    """Characters of a query or document (a string, or text and image parts), an image
    counted as `TOKENS_PER_IMAGE_ESTIMATE` tokens' worth."""
    if isinstance(item, str):
        return len(item)
    images = sum(1 for kind, _ in item if kind == "image")
    text = sum(len(value) for kind, value in item if kind == "text")
    return text + images * TOKENS_PER_IMAGE_ESTIMATE * CHARS_PER_TOKEN_ESTIMATE


def _has_image(item) -> bool:
    return not isinstance(item, str) and any(kind == "image" for kind, _ in item)


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
        layer = _score_layer(model.recipe, cutoff_layers, compress_ratio, compress_layers)
        queries, documents = _check_images(model, queries, documents, max_chunks_per_doc)
        estimate = self._estimate_tokens(model, queries, documents, instruction)
        self._admit(model, len(documents), estimate)
        self.in_flight += 1
        self.admitted_tokens += estimate
        options = _LongInputs(
            truncate,
            truncation_side,
            max_tokens_per_doc,
            max_chunks_per_doc,
            max_tokens_per_query,
            max_prompt_tokens,
            layer,
        )
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
        finally:
            self.in_flight -= 1
            self.admitted_tokens -= estimate
        self._degraded.discard(model.name)  # the engine just scored: it works
        return scored

    @staticmethod
    def _estimate_tokens(model: ServedModel, queries, documents, instruction) -> int:
        """Tokens the request will take, from character counts alone (no tokenizing): each
        pair counted up to the model's limit, plus a little for the prompt template."""
        limit = model.max_length
        extra = len(instruction or "")
        total = 0
        for query, document in zip(queries, documents, strict=True):
            chars = _chars(query) + _chars(document) + extra
            total += min(limit, chars // CHARS_PER_TOKEN_ESTIMATE + 8)
        return total

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
        groups = await asyncio.get_running_loop().run_in_executor(
            self._tokenizers, self._encode, model.recipe, queries, documents, instruction, options
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

    def _encode(
        self, recipe: Recipe, queries, documents, instruction, options: _LongInputs
    ) -> list[list[EncodedPair]]:
        """Tokenize (per document: its pairs, more than one only when chunked); a tokenizer
        failure is a 400 naming the first document that fails.

        Texts that can never fit (an instruction or query longer than the model's limit, or
        than --max-query-tokens) are refused with bounded work, before full tokenization.
        Images are fetched and decoded first, here in the worker thread (never on the event
        loop); a bad one is a 400 naming its document."""
        queries, documents = self._load_images(queries, documents)
        if instruction and recipe.count_tokens_upto(instruction, recipe.max_length) is None:
            raise InvalidRequest(
                f"the instruction is longer than this model's limit of {recipe.max_length} "
                "tokens; shorten it",
                param="instruction",
            )
        max_query = self.limits.max_query_tokens
        if max_query is not None:
            for query in dict.fromkeys(queries):
                if isinstance(query, str) and recipe.count_tokens_upto(query, max_query) is None:
                    raise InvalidRequest(
                        f"the query is longer than {max_query} tokens (--max-query-tokens)",
                        param="query",
                    )
        try:
            groups = options.encode(recipe, queries, documents, instruction)
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
        if options.layer is not None:  # a layerwise model's pairs, scored at another layer
            groups = [recipe.at_layer(group, options.layer) for group in groups]
        return groups

    def _load_images(self, queries, documents) -> tuple[list, list]:
        """Queries and documents with each image part's URL replaced by the decoded image
        (`DecodedImage`), each distinct URL decoded once per request."""
        if not any(map(_has_image, queries)) and not any(map(_has_image, documents)):
            return list(queries), list(documents)
        decoded: dict[str, DecodedImage] = {}
        policy = self.limits.media
        pixels_left = policy.max_request_pixels

        def load(item, param: str):
            nonlocal pixels_left
            if isinstance(item, str):
                return item
            parts = []
            for kind, value in item:
                if kind == "image" and isinstance(value, str):
                    if value not in decoded:
                        try:
                            image = load_image(value, policy, pixels_left)
                        except MediaError as exc:
                            raise InvalidRequest(f"{param}: {exc}", param=param) from exc
                        pixels_left -= image.width * image.height
                        decoded[value] = DecodedImage(image)
                    value = decoded[value]
                parts.append((kind, value))
            return tuple(parts)

        one_query = len({id(q) for q in queries}) == 1
        seen: dict[int, object] = {}
        loaded_queries = []
        for index, query in enumerate(queries):
            if id(query) not in seen:
                seen[id(query)] = load(query, "query" if one_query else f"queries[{index}]")
            loaded_queries.append(seen[id(query)])
        loaded = [load(d, f"documents[{i}]") for i, d in enumerate(documents)]
        return loaded_queries, loaded

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


def _score_layer(
    recipe: Recipe,
    cutoff_layers: int | Sequence[int] | None,
    compress_ratio: int | None = None,
    compress_layers: Sequence[int] | None = None,
):
    """The layer a request's `cutoff_layers` asks a layerwise model to score after (None: the
    recipe's default), with compression options the recipe's options object; a 400 naming
    the field when it is invalid or the model has no per-layer heads or no compression."""
    compression = {
        name: value
        for name, value in (
            ("compress_ratio", compress_ratio),
            ("compress_layers", compress_layers),
        )
        if value is not None
    }
    if compression and not getattr(recipe, "compresses", False):
        name = next(iter(compression))
        raise InvalidRequest(
            f"{name} applies to token-compressing rerankers "
            "(bge-reranker-v2.5-gemma2-lightweight); this model does not compress",
            param=name,
        )
    if compression:
        return recipe.layer_of(cutoff_layers, **compression)
    if cutoff_layers is None:
        return None
    layer_of = getattr(recipe, "layer_of", None)
    if layer_of is None:
        raise InvalidRequest(
            "cutoff_layers applies to layerwise rerankers (bge-reranker-v2-minicpm-layerwise); "
            "this model has a single score head",
            param="cutoff_layers",
        )
    return layer_of(cutoff_layers)


def rank(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices sorted by score descending (ties: lower index first), cut to `top_n`."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if not top_n else order[:top_n]


def _check_images(model: ServedModel, queries, documents, max_chunks_per_doc) -> tuple[list, list]:
    """A model that reads text only refuses image inputs (a 400 naming the first one); its
    image-free part tuples become their joined text. Chunking splits text only."""
    if getattr(model.recipe, "supports_images", False):
        if max_chunks_per_doc is not None:
            for index, document in enumerate(documents):
                if _has_image(document):
                    raise InvalidRequest(
                        f"documents[{index}] holds an image; max_chunks_per_doc splits text "
                        "documents only",
                        param="max_chunks_per_doc",
                    )
        return list(queries), list(documents)

    def text_only(item, param: str):
        if isinstance(item, str):
            return item
        if _has_image(item):
            raise InvalidRequest(
                f"{param} holds an image, but model {model.name!r} ({model.recipe.name}) "
                "reads text only; send text, or serve a multimodal reranker "
                "(e.g. Qwen/Qwen3-VL-Reranker-2B)",
                param=param,
            )
        return "".join(value for _, value in item)

    one_query = len({id(q) for q in queries}) == 1
    checked_queries = [
        text_only(q, "query" if one_query else f"queries[{i}]") for i, q in enumerate(queries)
    ]
    return checked_queries, [text_only(d, f"documents[{i}]") for i, d in enumerate(documents)]
