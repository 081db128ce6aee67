"""Small dataclasses that cross layer boundaries (api → service → scheduler → engine).

Nothing here imports torch or knows about HTTP: these are the only shapes the layers
share, so each layer can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class EncodedPair:
    """One (query, document) pair as the recipe tokenized it, ready for the engine.

    `token_type_ids` is only set for encoders that use segment embeddings (BERT).
    `cut_tokens` counts the tokens the recipe had to cut (document tail, or an over-long
    query where the official recipe cuts it) to fit the model's limit.
    """

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None = None
    cut_tokens: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.cut_tokens > 0


@dataclass(frozen=True)
class EncodedTwin(EncodedPair):
    """A bi-encoder pair (recipes/bi_encoder.py): `input_ids[:split]` is the query's sequence (with its special
    tokens), `input_ids[split:]` the document's. `cut_tokens` counts both sides' cuts."""

    split: int = 0
    #: of `cut_tokens`, those cut from the query
    query_cut: int = 0

    @property
    def query_ids(self) -> tuple[int, ...]:
        return self.input_ids[: self.split]

    @property
    def document_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.split :]


@dataclass(frozen=True)
class LayerwisePair(EncodedPair):
    """A pair for a model with one score head per layer (recipes/bge_layerwise.py): `layer` is
    the layer whose head scores it (the request's `cutoff_layers`, else the server's default);
    None: the model's own default, its last layer."""

    layer: int | None = None


@dataclass(frozen=True)
class ScoreHead:
    """Which output of the model is the raw score.

    - ``lm_rows``: a causal LM; raw = h_last · (W[positive] − W[negative]) where W is the LM
      head. Only those rows are ever used, never the full vocabulary.
    - ``classifier``: the checkpoint's own one-label classification head (logit 0).
    - ``layers``: one (1, hidden) head per layer, read after the layer each pair asks for
      (`LayerwisePair.layer`; bge-reranker-v2-minicpm-layerwise).
    - ``cosine``: a bi-encoder; raw = cosine of the query's and the document's mean-pooled
      embeddings, each sequence encoded on its own (see `recipes/bi_encoder.py`).
    """

    kind: str
    positive_token_id: int | None = None
    negative_token_id: int | None = None


@dataclass
class Batch:
    """Pairs the engine scores together; scores come back in `pairs` order.

    `groups[i]` identifies the request pair i came from: pairs of one request may share a
    token prefix, which the engine then computes once. None: no grouping known.
    """

    pairs: list[EncodedPair] = field(default_factory=list)
    groups: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.pairs)


@dataclass(frozen=True)
class ScoredPairs:
    """What the service hands back to the API layer for one request."""

    raw_scores: list[float]
    scores: list[float]
    prompt_tokens: int
    truncated_documents: int


@dataclass(frozen=True)
class Ranking:
    """One rerank request's answer from the service, ready for any API shape: the document
    indices best first (cut to top_n), each document's score (activated or raw, as asked)."""

    model: str
    order: list[int]
    scores: list[float]
    prompt_tokens: int
    truncated_documents: int


class Engine(Protocol):
    """What the scheduler needs from an engine (defined here, torch-free, so that the HTTP
    layer and the scheduler import without loading torch)."""

    #: human-readable engine name, device and dtype, for /v1/models and logs
    name: str
    device: str
    dtype: str
    #: a sensible default token budget per batch on this device
    default_batch_tokens: int

    def score(self, batch: Batch) -> list[float]:
        """Raw scores for `batch.pairs`, in order. Blocking; called from one worker thread."""
        ...
