"""Request and response models for every dialect rerankd speaks (vLLM, Cohere, Jina, TEI).

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


class RerankRequest(_Request):
    """POST /v1/rerank, /rerank, /v2/rerank (vLLM, Cohere v1/v2, Jina, Voyage)."""

    model: StrictStr | None = Field(
        None, description="Served model name or alias; omit for the default."
    )
    query: StrictStr
    documents: list[Document] = Field(
        description="Strings or objects with a `text` field (other fields are echoed back)."
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
    truncate: StrictBool | None = Field(
        None, description="true (default): cut over-long documents at the end; false: 400 instead."
    )
    rank_fields: list[StrictStr] | None = Field(
        None, description="Cohere: object fields that form the text, as `key: value` lines."
    )
    max_tokens_per_doc: PositiveInt | None = Field(
        None,
        description="Cohere v2: cut each document to this many tokens before scoring "
        "(counted in usage.truncated_documents).",
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
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right",
        description="Right (default): cut a too-long text at its end, as the model cards do; "
        "Left: keep its end instead (the query and prompt template are never cut).",
    )


class ScoreRequest(_Request):
    """POST /v1/score, /score (vLLM): aligned pairs, or one query against N documents."""

    model: StrictStr | None = None
    queries: StrictStr | list[Document] | None = None
    documents: StrictStr | list[Document] | None = None
    text_1: StrictStr | list[Document] | None = Field(
        None, description="vLLM's older name for queries."
    )
    text_2: StrictStr | list[Document] | None = Field(
        None, description="vLLM's older name for documents."
    )
    use_activation: StrictBool | None = None
    instruction: StrictStr | None = None
    truncate: StrictBool | None = None

    @model_validator(mode="after")
    def _both_sides(self) -> ScoreRequest:
        if self.queries is None and self.text_1 is None:
            raise ValueError("`queries` (or `text_1`) is required")
        if self.documents is None and self.text_2 is None:
            raise ValueError("`documents` (or `text_2`) is required")
        return self


# --- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    truncated_documents: int = 0


class RerankResult(BaseModel):
    index: int
    document: dict[str, Any] | None = None
    relevance_score: float


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[RerankResult]
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


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
