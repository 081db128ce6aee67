"""Request and response models for every dialect rerankd speaks (vLLM, Cohere, Jina, Voyage,
TEI, Infinity, NVIDIA NIM).

Strict types: a number where a string belongs is a 400, never silently coerced. Unknown
fields are ignored, because real clients send extras.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

#: ints beyond this come from JSON numbers no client means (and orjson turns into floats)
_MAX_INT = 2**53
NonNegativeInt = Annotated[StrictInt, Field(ge=0, le=_MAX_INT)]
PositiveInt = Annotated[StrictInt, Field(ge=1, le=_MAX_INT)]
#: a document is a string or an object with a `text` string (other keys kept and echoed)
Document = StrictStr | dict[str, Any]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _LongInputFields(_Request):
    """How over-long inputs are cut, in every dialect's words (see `long_inputs`), and which
    layer a layerwise model scores with (`cutoff_layers`, passed along with them)."""

    truncate: StrictBool | None = Field(
        None, description="true (default): cut over-long documents at the end; false: 400 instead."
    )
    truncation: Any = Field(
        None,
        description="Voyage's name for `truncate` (a boolean; other values, which other "
        "clients send with other meanings, are ignored).",
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None,
        description="vLLM: `right` (default) cuts an over-long document's end, `left` keeps it.",
    )
    truncate_prompt_tokens: StrictInt | None = Field(
        None,
        ge=-1,
        le=_MAX_INT,
        description="vLLM: cut each pair's prompt to this many tokens by cutting its document "
        "(-1 or null: the model's limit).",
    )
    max_tokens_per_doc: NonNegativeInt | None = Field(
        None,
        description="Cohere v2 / vLLM: cut each document to this many tokens before scoring "
        "(counted in usage.truncated_documents; 0 or null: no cut).",
    )
    max_tokens_per_query: NonNegativeInt | None = Field(
        None, description="vLLM: cut the query to this many tokens (0 or null: no cut)."
    )
    cutoff_layers: StrictInt | list[StrictInt] | None = Field(
        None,
        description="Layerwise rerankers (bge-reranker-v2-minicpm-layerwise; FlagEmbedding's "
        "`cutoff_layers`): the layer whose score head answers, or a list of layers, of which "
        "the deepest answers; no layer past it is computed. Default: the server's "
        "--cutoff-layers, else the last layer. A layer without a head is a 400; other models "
        "refuse the field.",
    )
    compress_ratio: StrictInt | None = Field(
        None,
        description="Token-compressing rerankers (bge-reranker-v2.5-gemma2-lightweight; "
        "FlagEmbedding's `compress_ratio`): passage tokens pooled into one (1: none). "
        "Default: --compress-ratio, else the model card's 2. Other models refuse it.",
    )
    compress_layers: list[StrictInt] | None = Field(
        None,
        description="Token-compressing rerankers: the layers before which the passage is "
        "pooled (FlagEmbedding's `compress_layers`). Default: --compress-layers, else the "
        "model card's [24, 40]. Other models refuse it.",
    )

    def long_inputs(self) -> dict[str, Any]:
        """The service's keyword arguments for long inputs (0 and -1 mean "no cap", as vLLM
        sends them)."""
        voyage = self.truncation if isinstance(self.truncation, bool) else None
        truncate = self.truncate if self.truncate is not None else voyage
        prompt = self.truncate_prompt_tokens
        return {
            "truncate": truncate is not False,
            "truncation_side": self.truncation_side or "right",
            "max_tokens_per_doc": self.max_tokens_per_doc or None,
            "max_tokens_per_query": self.max_tokens_per_query or None,
            "max_prompt_tokens": prompt if prompt is not None and prompt > 0 else None,
            "cutoff_layers": self.cutoff_layers,
            **{
                name: value
                for name, value in (
                    ("compress_ratio", self.compress_ratio),
                    ("compress_layers", self.compress_layers),
                )
                if value is not None
            },
        }


class RerankRequest(_LongInputFields):
    """POST /v1/rerank, /rerank, /v2/rerank (vLLM, Cohere v1/v2, Jina, Voyage)."""

    model: StrictStr | None = Field(
        None, description="Served model name or alias; omit for the default."
    )
    query: StrictStr | dict[str, Any] = Field(
        description='A string; for multimodal models also vLLM\'s {"content": [parts]} or '
        'Jina\'s {"image": url} / {"text": ..., "image": url}.'
    )
    documents: list[Document] | dict[str, Any] = Field(
        description="Strings or objects with a `text` field (other fields are echoed back); "
        'for multimodal models also {"content": [parts]} items and Jina\'s {"image"} '
        'objects, or vLLM\'s {"content": [parts]} object, one document per part.'
    )
    top_n: NonNegativeInt | None = Field(None, description="Return the best N (0/null: all).")
    top_k: NonNegativeInt | None = Field(None, description="Voyage's name for top_n.")
    return_documents: StrictBool = True
    use_activation: StrictBool | None = Field(
        None, description="true (default): probability in [0,1]; false: the raw logit score."
    )
    raw_scores: StrictBool | None = Field(
        None, description="TEI/Infinity: true means use_activation=false."
    )
    instruction: StrictStr | None = Field(
        None, description="Task instruction for instruction-aware models."
    )
    rank_fields: list[StrictStr] | None = Field(
        None, description="Cohere: object fields that form the text, as `key: value` lines."
    )
    max_chunks_per_doc: PositiveInt | None = Field(
        None,
        description="Cohere v1: split a document longer than the model's limit into up to this "
        "many chunks; its score is its best chunk's, and usage counts every chunk's tokens.",
    )

    @property
    def limit(self) -> int | None:
        return self.top_n if self.top_n is not None else self.top_k

    @property
    def activated(self) -> bool:
        if self.use_activation is not None:
            return self.use_activation
        return not self.raw_scores


class TEIRerankRequest(_Request):
    """POST /rerank with `texts`: Hugging Face text-embeddings-inference's dialect."""

    model: StrictStr | None = None
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None
    top_n: NonNegativeInt | None = Field(
        None, description="Not TEI's, but litellm's `huggingface/` provider sends it: the best N."
    )
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right",
        description="Right (default): cut a too-long text at its end, as the model cards do; "
        "Left: keep its end instead (the query and prompt template are never cut).",
    )


Side = StrictStr | list[Document] | dict[str, Any] | None


class ScoreRequest(_LongInputFields):
    """POST /v1/score, /score (vLLM): aligned pairs, or one query against N documents.

    Each side has had several names across vLLM releases; all are accepted.
    """

    model: StrictStr | None = None
    queries: Side = None
    documents: Side = None
    items: Side = Field(None, description="vLLM's current name for documents.")
    text_1: Side = Field(None, description="vLLM's older name for queries.")
    text_2: Side = Field(None, description="vLLM's older name for documents.")
    data_1: Side = Field(None, description="vLLM's name for queries in some releases.")
    data_2: Side = Field(None, description="vLLM's name for documents in some releases.")
    use_activation: StrictBool | None = None
    instruction: StrictStr | None = None

    @property
    def left(self) -> str | list[Document] | dict[str, Any]:
        return next(v for v in (self.queries, self.text_1, self.data_1) if v is not None)

    @property
    def right(self) -> str | list[Document] | dict[str, Any]:
        sides = (self.documents, self.items, self.text_2, self.data_2)
        return next(v for v in sides if v is not None)

    @model_validator(mode="after")
    def _both_sides(self) -> ScoreRequest:
        if (self.queries, self.text_1, self.data_1) == (None, None, None):
            raise ValueError("`queries` (or `text_1`, `data_1`) is required")
        if (self.documents, self.items, self.text_2, self.data_2) == (None, None, None, None):
            raise ValueError("`documents` (or `items`, `text_2`, `data_2`) is required")
        return self


class _Passage(_Request):
    text: StrictStr


class RankingRequest(_Request):
    """POST /v1/ranking: NVIDIA NIM's reranking API (LangChain/LlamaIndex NVIDIARerank)."""

    model: StrictStr | None = None
    query: _Passage
    passages: list[_Passage]
    truncate: Literal["NONE", "END"] | None = Field(
        None, description="END (default): cut over-long passages at the end; NONE: 400 instead."
    )


# --- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    truncated_documents: int = 0


class RerankResult(BaseModel):
    index: int
    document: dict[str, Any] | None = None
    relevance_score: float


class VoyageResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[RerankResult]
    object: str = "list"
    data: list[VoyageResult] = Field(description="The results in Voyage's shape.")
    meta: dict[str, Any] | None = None


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class TEIRerankItem(BaseModel):
    index: int
    score: float
    text: str | None = None


class Ranking(BaseModel):
    index: int
    logit: float


class RankingResponse(BaseModel):
    rankings: list[Ranking]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: str = Field(description="The message again, where Jina's clients look for it.")
