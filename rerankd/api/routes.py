"""Route handlers: parse → validate → call the service → shape the dialect's response."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rerankd import __version__
from rerankd.api.documents import document_texts, echo
from rerankd.api.errors import HTTPError, error_response
from rerankd.api.responses import JSONResponse
from rerankd.api.schemas import (
    ErrorResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    TEIRerankItem,
    TEIRerankRequest,
)
from rerankd.errors import InvalidRequest
from rerankd.service import RerankService, rank
from rerankd.types import ScoredPairs

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


def _service(request: Request) -> RerankService:
    return request.app.state.service


async def read_json(request: Request) -> dict[str, Any]:
    """Strict JSON: no NaN/Infinity, valid UTF-8, no lone surrogates, an object at the top."""
    body = await request.body()
    if not body.strip():
        raise HTTPError(400, "the request body is empty; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HTTPError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    if _depth(data) > MAX_JSON_DEPTH:
        raise HTTPError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return data


#: documents are echoed back one level deeper than sent, and orjson writes at most 255
MAX_JSON_DEPTH = 250


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[ScoredPairs]) -> ScoredPairs:
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


def _usage(scored: ScoredPairs) -> dict[str, int]:
    return {
        "prompt_tokens": scored.prompt_tokens,
        "total_tokens": scored.prompt_tokens,
        "truncated_documents": scored.truncated_documents,
    }


# --- rerank ------------------------------------------------------------------------------


async def _rerank(request: Request, cohere_v2: bool = False, tei: bool = False) -> JSONResponse:
    """`tei`: this route (POST /rerank) also speaks TEI, recognised by its `texts` field."""
    data = await read_json(request)
    if tei and "texts" in data and "documents" not in data:
        return await _tei_rerank(request, data)
    req = RerankRequest.model_validate(data)
    service = _service(request)
    model = service.resolve(req.model)
    texts = document_texts(req.documents, req.rank_fields)
    scored = await until_disconnect(
        request,
        service.rerank(
            model,
            req.query,
            texts,
            req.instruction,
            req.truncate is not False,
            max_tokens_per_doc=req.max_tokens_per_doc,
            max_chunks_per_doc=req.max_chunks_per_doc,
        ),
    )
    scores = scored.scores if req.activated else scored.raw_scores
    results = []
    for index in rank(scores, req.limit):
        item: dict[str, Any] = {"index": index}
        if req.return_documents:
            item["document"] = echo(req.documents[index])
        item["relevance_score"] = scores[index]
        results.append(item)
    body: dict[str, Any] = {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model.name,
        "usage": _usage(scored),
        "results": results,
    }
    if cohere_v2:
        body["meta"] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    return JSONResponse(body)


async def _tei_rerank(request: Request, data: dict[str, Any]) -> JSONResponse:
    req = TEIRerankRequest.model_validate(data)
    service = _service(request)
    model = service.resolve(req.model)
    scored = await until_disconnect(
        request,
        service.rerank(
            model,
            req.query,
            req.texts,
            None,
            req.truncate is not False,
            truncation_side=req.truncation_direction.lower(),
        ),
    )
    scores = scored.raw_scores if req.raw_scores else scored.scores
    items = []
    for index in rank(scores, None):
        item: dict[str, Any] = {"index": index, "score": scores[index]}
        if req.return_text:
            item["text"] = req.texts[index]
        items.append(item)
    return JSONResponse(items)


_RERANK_DOC = {
    "responses": {200: {"model": RerankResponse}, **_ERRORS},
    "openapi_extra": {"x-request-model": "RerankRequest"},
}


@router.post(
    "/v1/rerank", summary="Rerank documents (vLLM / Jina / Cohere v1 shape)", **_RERANK_DOC
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


# --- score -------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


async def _score(request: Request) -> JSONResponse:
    req = ScoreRequest.model_validate(await read_json(request))
    service = _service(request)
    model = service.resolve(req.model)
    queries = document_texts(_as_list(req.queries if req.queries is not None else req.text_1))
    documents = document_texts(_as_list(req.documents if req.documents is not None else req.text_2))
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
        service.score_pairs(model, queries, documents, req.instruction, req.truncate is not False),
    )
    scores = scored.raw_scores if req.use_activation is False else scored.scores
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model.name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": _usage(scored),
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


@router.get("/health", summary="200 when the model is loaded and warmed; 503 otherwise")
async def health(request: Request) -> JSONResponse:
    service = _service(request)
    if service.ready and not service.draining:
        return JSONResponse({"status": "ok"})
    state = "draining" if service.draining else "loading"
    return error_response(503, f"the server is {state}", headers={"Retry-After": "5"})


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
        }
        for m in _service(request).models
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/version", summary="rerankd's version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> PlainTextResponse:
    export = getattr(request.app.state, "metrics_export", None)
    payload = await export() if export else generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(payload, media_type=CONTENT_TYPE_LATEST)
