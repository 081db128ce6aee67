"""Route handlers: parse → validate → call the service → shape the dialect's response."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from rerankd import __version__
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

ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")
router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)
}


def _service(request: Request) -> RerankService:
    return request.app.state.service


#: documents are echoed back one level deeper than sent, and orjson writes at most 255
MAX_JSON_DEPTH = 250
#: bodies above this are parsed and validated in a worker thread, off the event loop
_PARSE_INLINE_BYTES = 256 * 1024
#: orjson reads integers beyond 64 bits as floats, which would echo a changed value
_BIG_INT = 2.0**64
#: ... told apart from a float literal (1e22 is a float, and echoes as one) by its digits:
#: 20 or more of them, not preceded by [0-9.eE+-] (after an optional minus sign), nor
#: followed by [.eE]. Digit runs are found in a mask of the body (digits b"0", other bytes
#: b"1") with bytes.find, at native speed: a regex over the body takes ~3 s for 60 MB,
#: holding the GIL, so stalling the event loop
_DIGIT_MASK = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x31 for byte in range(256))
_TWENTY_DIGITS = b"0" * 20
_NOT_BEFORE_AN_INT = frozenset(b"0123456789.eE+-")
_NOT_AFTER_AN_INT = frozenset(b".eE")
_LEADING_ZEROS = re.compile(rb"0*")


async def read_request(
    request: Request, schema: Callable[[dict[str, Any]], type[ModelT]]
) -> tuple[ModelT, dict[str, Any]]:
    """The body parsed, checked and validated (as the schema `schema(data)` picks); and the
    raw object. Strict JSON: no NaN/Infinity, valid UTF-8, no lone surrogates.

    Large bodies are parsed and validated off the event loop, after a native-speed bound on
    the number of JSON values (commas and brackets) that refuses a body of millions of tiny
    values before parsing it: such a body costs far more memory and CPU than its size.
    """
    chunks = [chunk async for chunk in request.stream()]
    size = sum(len(chunk) for chunk in chunks)
    max_values = _max_json_values(request)
    max_documents = _service(request).limits.max_documents

    def parse() -> tuple[ModelT, dict[str, Any]]:
        body = b"".join(chunks) if size <= _PARSE_INLINE_BYTES else _gather(chunks)
        data, big = parse_json(body, max_values)
        request_model = validate(schema(data), data, max_documents)
        # after validation, so a huge number where a field wants a small int names that field
        if big is not None and _has_big_int_literal(body):
            raise HTTPError(
                400,
                f"the request body holds an integer beyond 64 bits (~{big:.6g}), which this "
                "server cannot echo back exactly; send it as a string",
            )
        return request_model, data

    if size <= _PARSE_INLINE_BYTES:
        return parse()
    return await asyncio.to_thread(parse)


def _gather(chunks: list[bytes]) -> bytearray:
    """A large body in one buffer, grown a chunk at a time in the worker thread: one
    b"".join of 60 MB on the event loop (starlette's request.body()) blocks it for ~50 ms,
    most of it page faults, and holds the GIL as long anywhere."""
    body = bytearray()
    for chunk in chunks:
        body += chunk
    return body


def _max_json_values(request: Request) -> int:
    """At most ~20 JSON values per allowed document, and never fewer than 200,000: a Cohere
    document object with a dozen fields fits, while the worst body under the bound (one
    object of that many keys) holds the GIL for ~130 ms in orjson, not the ~650 ms a
    million keys took."""
    return max(200_000, 20 * _service(request).limits.max_documents)


def parse_json(
    body: bytes | bytearray, max_values: int = 1_000_000
) -> tuple[dict[str, Any], float | None]:
    """Parse and check a request body (see `read_request`); raises HTTPError(400). Returns
    the object and the first float that may be an integer beyond 64 bits (orjson reads those
    as floats), for the caller to check once the request is validated."""
    if not body or body.isspace():  # (strip() would copy the body)
        raise HTTPError(400, "the request body is empty; send a JSON object")
    if _values_exceed(body, max_values):
        raise HTTPError(
            400,
            f"the request body holds more than {max_values} JSON values (counting its commas "
            "and brackets); split the request",
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HTTPError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    depth, big = _inspect(data)
    if depth > MAX_JSON_DEPTH:
        raise HTTPError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return data, big


#: bytes counted per call: bytes.count holds the GIL, ~75 ms for 60 MB in one call, which
#: would stall the event loop while a worker thread counts; 1 MiB windows take ~1 ms each
_COUNT_WINDOW = 1 << 20


def _values_exceed(body: bytes | bytearray, max_values: int) -> bool:
    """Whether the body has more than `max_values` commas and brackets (an upper bound on
    its JSON values, save one), counted window by window so that other threads (the event
    loop) get the GIL in between, and stopping as soon as the bound is passed."""
    total = 0
    for start in range(0, len(body), _COUNT_WINDOW):
        end = start + _COUNT_WINDOW
        total += body.count(b",", start, end) + body.count(b"[", start, end)
        total += body.count(b"{", start, end)
        if total > max_values:
            return True
    return False


def _has_big_int_literal(body: bytes | bytearray) -> bool:
    """Whether the body spells an integer outside [-2**63, 2**64) (orjson's exact range).

    The digit mask is built a 1 MiB window at a time (see `_COUNT_WINDOW`) so the event
    loop gets the GIL in between; int() sees at most ~20 digits (it refuses over 4,300)."""
    mask = b"".join(
        body[start : start + _COUNT_WINDOW].translate(_DIGIT_MASK)
        for start in range(0, len(body), _COUNT_WINDOW)
    )
    at = mask.find(_TWENTY_DIGITS)
    while at != -1:
        end = mask.find(b"1", at)
        end = len(body) if end == -1 else end
        start = at - 1 if at and body[at - 1] == ord("-") else at
        is_int = (start == 0 or body[start - 1] not in _NOT_BEFORE_AN_INT) and (
            end == len(body) or body[end] not in _NOT_AFTER_AN_INT
        )
        if is_int:
            first = _LEADING_ZEROS.match(body, at, end).end()
            if end - first > 20:  # (no copy of a long run: it may be the whole body)
                return True
            value = int(body[first:end] or b"0")
            if value > 2**63 if start != at else value >= 2**64:
                return True
        at = mask.find(_TWENTY_DIGITS, end)
    return False


def _inspect(value: Any) -> tuple[int, float | None]:
    """Nesting depth of a parsed JSON value, and the first integer that orjson had to read
    as a float (>= 2**64), if any. Iterative (no recursion limit to hit), and only containers
    go on the stack, so a list of millions of scalars costs no extra memory."""
    deepest, big = 0, None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif type(child) is float and big is None and abs(child) >= _BIG_INT:
                big = child if child.is_integer() else None
    return deepest, big


def validate(model: type[ModelT], data: dict[str, Any], max_documents: int) -> ModelT:
    """Pydantic validation, after the cheap check that the request is not too many documents
    (validating a million-item list first would be the expensive part)."""
    for key in ("documents", "texts", "passages", "items", "text_2", "data_2"):
        items = data.get(key)
        if isinstance(items, list) and len(items) > max_documents:
            raise InvalidRequest(
                f"{len(items)} documents in one request; this server accepts at most "
                f"{max_documents} (--max-documents): split the request",
                param=key,
            )
    return model.model_validate(data)


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


@router.api_route(
    "/health",
    methods=["GET", "HEAD"],
    summary="200 when the model is loaded and warmed; 503 while loading, draining or degraded "
    "(a failed inference was followed by a failed known-good probe)",
)
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
        }
        for m in _service(request).models
    ]
    return JSONResponse({"object": "list", "data": data})


@router.api_route("/version", methods=["GET", "HEAD"], summary="rerankd's version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> PlainTextResponse:
    export = getattr(request.app.state, "metrics_export", None)
    payload = await export() if export else generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(payload, media_type=CONTENT_TYPE_LATEST)
