"""The service: plain request values → recipe-encoded pairs → scheduler → scored results.

It knows models (names and aliases), recipes and the scheduler, but neither HTTP nor
tensors. Tokenization runs in worker threads (the Rust tokenizers drop the GIL), so the
event loop only routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rerankd.errors import ModelNotFound
from rerankd.metrics import Metrics
from rerankd.recipes import Recipe
from rerankd.scheduler import Scheduler
from rerankd.types import ScoredPairs


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

    def __init__(self, models: list[ServedModel], metrics: Metrics) -> None:
        if not models:
            raise ValueError("a service needs at least one model")
        self.models = models
        self.metrics = metrics
        self._by_name: dict[str, ServedModel] = {}
        for model in models:
            for name in [model.name, *model.aliases]:
                self._by_name.setdefault(name, model)
        self.ready = False
        self.draining = False

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
    ) -> ScoredPairs:
        """Score aligned pairs; raw scores and activated scores in input order."""
        started = time.perf_counter()
        pairs = await asyncio.to_thread(
            model.recipe.encode, queries, documents, instruction, truncate
        )
        self.metrics.tokenize_time.labels(model.name).observe(time.perf_counter() - started)
        raw = await model.scheduler.submit(pairs)
        tokens = sum(len(p) for p in pairs)
        truncated = sum(1 for p in pairs if p.truncated)
        self.metrics.documents.labels(model.name).inc(len(pairs))
        self.metrics.tokens.labels(model.name).inc(tokens)
        self.metrics.truncated.labels(model.name).inc(truncated)
        activate = model.recipe.activate
        return ScoredPairs(raw, [activate(r) for r in raw], tokens, truncated)

    async def rerank(
        self,
        model: ServedModel,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        truncate: bool = True,
    ) -> ScoredPairs:
        """One query against many documents."""
        return await self.score_pairs(
            model, [query] * len(documents), documents, instruction, truncate
        )

    async def start(self) -> None:
        for model in self.models:
            model.scheduler.start()
        self.ready = True

    async def stop(self) -> None:
        """Drain: refuse new work, finish queued work."""
        self.draining = True
        self.ready = False
        for model in self.models:
            await model.scheduler.stop()


def rank(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices sorted by score descending (ties: lower index first), cut to `top_n`."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if not top_n else order[:top_n]
