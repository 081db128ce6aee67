"""Route handlers: parse → validate → call the service → shape the dialect's response."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from rerankd import __version__
from rerankd.api.body import ModelT, read_json_body
from rerankd.api.documents import document_inputs, input_text, query_input
from rerankd.api.errors import HTTPError, error_response
from rerankd.api.responses import JSONResponse, rerank_results, usage
from rerankd.api.schemas import (
    ErrorResponse,
    RankingRequest,
    RankingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    TEIRerankItem,
    TEIRerankRequest,
)
from rerankd.errors import InvalidRequest
from rerankd.service import RerankService

T = TypeVar("T")
router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)
}


def _service(request: Request) -> RerankService:
    return request.app.state.service


async def read_request(
    request: Request, schema: Callable[[dict[str, Any]], type[ModelT]]
) -> tuple[ModelT, dict[str, Any]]:
    """The body read, parsed and validated under this server's limits (rerankd/api/body.py)."""
    return await read_json_body(request, schema, _service(request).limits.max_documents)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await the work, cancelling it (and its queued pairs) if the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise HTTPError(499, "the client closed the connection; its work was cancelled")


# --- rerank ------------------------------------------------------------------------------


def _rerank_schema(tei: bool) -> Callable[[dict[str, Any]], type[BaseModel]]:
    """POST /rerank also speaks TEI, recognised by its `texts` field."""

    def pick(data: dict[str, Any]) -> type[BaseModel]:
        if tei and "texts" in data and "documents" not in data:
            return TEIRerankRequest
        return RerankRequest

    return pick


def _document_format(request: Request, data: dict[str, Any]) -> str:
    """How `results[].document` is shaped: a string for Infinity's clients (recognised by
    Infinity's own `raw_scores` field, or the server's --rerank-document-format string, for
    litellm's `infinity/` provider, which sends a plain Cohere body), else the object."""
    if "raw_scores" in data:
        return "string"
    return getattr(request.app.state, "document_format", "object")


async def _rerank(request: Request, cohere_v2: bool = False, tei: bool = False) -> JSONResponse:
    req, data = await read_request(request, _rerank_schema(tei))
    if isinstance(req, TEIRerankRequest):
        return await _tei_rerank(request, req)
    assert isinstance(req, RerankRequest)
    # text, or (with images) parts; `sent`: the documents as sent, one per input
    inputs, sent = document_inputs(req.documents, req.rank_fields)
    texts = [input_text(item) for item in inputs]
    ranking = await until_disconnect(
        request,
        _service(request).rank_documents(
            req.model,
            query_input(req.query),
            inputs,
            req.instruction,
            top_n=req.limit,
            activated=req.activated,
            max_chunks_per_doc=req.max_chunks_per_doc,
            **req.long_inputs(),
        ),
    )
    as_string = _document_format(request, data) == "string"
    # Voyage's shape, for its SDK and the LangChain/LlamaIndex/litellm wrappers of it: the
    # document as its text
    voyage = [
        {"index": i, "relevance_score": ranking.scores[i]}
        | ({"document": texts[i]} if req.return_documents else {})
        for i in ranking.order
    ]
    body: dict[str, Any] = {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": ranking.model,
        "usage": usage(ranking),
        "results": rerank_results(ranking, sent, texts, req.return_documents, as_string),
        # Infinity's clients (infinity-client validates the field) want their own object name
        "object": "rerank" if "raw_scores" in data else "list",
        "data": voyage,
    }
    if cohere_v2:
        body["meta"] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    return JSONResponse(body)


async def _tei_rerank(request: Request, req: TEIRerankRequest) -> JSONResponse:
    ranking = await until_disconnect(
        request,
        _service(request).rank_documents(
            req.model,
            req.query,
            req.texts,
            None,
            req.truncate is not False,
            top_n=req.top_n,
            activated=not req.raw_scores,
            truncation_side=req.truncation_direction.lower(),
        ),
    )
    items = []
    for index in ranking.order:
        item: dict[str, Any] = {"index": index, "score": ranking.scores[index]}
        if req.return_text:
            item["text"] = req.texts[index]
        items.append(item)
    return JSONResponse(items)


_RERANK_DOC = {
    "responses": {200: {"model": RerankResponse}, **_ERRORS},
    "openapi_extra": {"x-request-model": "RerankRequest"},
}


@router.post(
    "/v1/rerank",
    summary="Rerank documents (vLLM / Jina / Cohere v1 / Voyage / Infinity shape)",
    **_RERANK_DOC,
)
async def rerank_v1(request: Request) -> JSONResponse:
    return await _rerank(request)


@router.post(
    "/rerank",
    summary="Rerank documents; a body with `texts` is answered in TEI's shape",
    responses={200: {"model": RerankResponse | list[TEIRerankItem]}, **_ERRORS},
    openapi_extra={"x-request-model": "RerankRequest|TEIRerankRequest"},
)
async def rerank_plain(request: Request) -> JSONResponse:
    return await _rerank(request, tei=True)


@router.post("/v2/rerank", summary="Rerank documents (Cohere v2 shape, with `meta`)", **_RERANK_DOC)
async def rerank_v2(request: Request) -> JSONResponse:
    return await _rerank(request, cohere_v2=True)


@router.post(
    "/v1/ranking",
    summary="Rank passages (NVIDIA NIM shape: `rankings` of `{index, logit}`)",
    responses={200: {"model": RankingResponse}, **_ERRORS},
    openapi_extra={"x-request-model": "RankingRequest"},
)
async def ranking(request: Request) -> JSONResponse:
    req, _ = await read_request(request, lambda _: RankingRequest)
    texts = [passage.text for passage in req.passages]
    ranking = await until_disconnect(
        request,
        _service(request).rank_documents(
            req.model, req.query.text, texts, None, req.truncate != "NONE", activated=False
        ),
    )
    rankings = [{"index": i, "logit": ranking.scores[i]} for i in ranking.order]
    return JSONResponse({"rankings": rankings})


# --- score -------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def _query_inputs(side: Any) -> list:
    """/v1/score's queries: a string, a list, or one query object ({"content": [...]} or
    Jina's {"image": ...}, all its parts one query)."""
    if isinstance(side, dict):
        return [query_input(side, "queries")]
    items = _as_list(side)
    return [query_input(item, f"queries[{i}]", text_object=True) for i, item in enumerate(items)]


async def _score(request: Request) -> JSONResponse:
    req, _ = await read_request(request, lambda _: ScoreRequest)
    service = _service(request)
    model = service.resolve(req.model)
    queries = _query_inputs(req.left)
    right = req.right
    documents, _ = document_inputs(right if isinstance(right, dict) else _as_list(right))
    if len(queries) == 1 and len(documents) != 1:
        queries = queries * len(documents)
    elif len(queries) != len(documents):
        raise InvalidRequest(
            f"got {len(queries)} queries and {len(documents)} documents; send equal numbers "
            "(scored pair by pair) or one query (scored against every document)",
            param="queries",
        )
    scored = await until_disconnect(
        request,
        service.score_pairs(model, queries, documents, req.instruction, **req.long_inputs()),
    )
    scores = scored.raw_scores if req.use_activation is False else scored.scores
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model.name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": usage(scored),
        }
    )


_SCORE_DOC = {
    "responses": {200: {"model": ScoreResponse}, **_ERRORS},
    "openapi_extra": {"x-request-model": "ScoreRequest"},
}


@router.post("/v1/score", summary="Score aligned query/document pairs (vLLM shape)", **_SCORE_DOC)
async def score_v1(request: Request) -> JSONResponse:
    return await _score(request)


@router.post("/score", summary="Score aligned query/document pairs (vLLM shape)", **_SCORE_DOC)
async def score_plain(request: Request) -> JSONResponse:
    return await _score(request)


# --- service routes ----------------------------------------------------------------------


_HEALTH_SUMMARY = (
    "200 when the model is loaded and warmed; 503 while loading, draining or degraded "
    "(a failed inference was followed by a failed known-good probe)"
)


# GET and HEAD as two routes, not one api_route: one route with two methods gives both
# operations the same OpenAPI id (FastAPI warns); two get health_health_get/_head.
@router.get("/health", summary=_HEALTH_SUMMARY)
@router.head("/health", summary=_HEALTH_SUMMARY)
async def health(request: Request) -> JSONResponse:
    state = _service(request).state
    if state == "ok":
        return JSONResponse({"status": "ok"})
    message = {
        "loading": "the server is loading",
        "draining": "the server is draining",
        "degraded": "the server is degraded: its engine fails even on a known-good probe",
    }[state]
    return error_response(503, message, headers={"Retry-After": "5"})


@router.get("/v1/models", summary="Served models (OpenAI list shape)")
async def models(request: Request) -> JSONResponse:
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "rerankd",
            "root": m.source,
            "aliases": m.aliases,
            "max_model_len": m.max_length,
            "recipe": m.recipe.name,
            "supports_instruction": m.recipe.supports_instruction,
            "input_modalities": ["text", "image"]
            if getattr(m.recipe, "supports_images", False)
            else ["text"],
            "attention": m.attention,
            "device": m.device,
            "dtype": m.dtype,
            "quantization": m.quantization,
            "compiled": m.compiled,
            "cuda_graphs": m.cuda_graphs() if m.cuda_graphs is not None else None,
        }
        for m in _service(request).models
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/version", summary="rerankd's version")
@router.head("/version", summary="rerankd's version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> PlainTextResponse:
    export = getattr(request.app.state, "metrics_export", None)
    payload = await export() if export else generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(payload, media_type=CONTENT_TYPE_LATEST)
