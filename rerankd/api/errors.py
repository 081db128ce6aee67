"""Every error leaves as `{"error": {message, type, param, code}, "detail": message}`.

`error` is the documented shape (OpenAI/vLLM style); `detail` repeats the message as a
top-level string because Jina's client wrappers (LangChain, LlamaIndex, Haystack) raise
`resp["detail"]` and would otherwise lose the server's message in a KeyError.

Domain errors (rerankd.errors) map to statuses here and only here; a request can never
produce a bare traceback or an HTML page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rerankd.api.responses import JSONResponse
from rerankd.errors import (
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestTimeout,
    RerankdError,
    ShuttingDown,
)

log = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}

_STATUS = {
    InvalidRequest: 400,
    ModelNotFound: 404,
    Overloaded: 429,
    ShuttingDown: 503,
    RequestTimeout: 504,
    InferenceFailed: 500,
}


def error_type(exc: RerankdError) -> str:
    """The `type` a domain error is answered with (as its status's; the class name for an
    error no status is mapped to), for callers that report errors without HTTP (offline)."""
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), None)
    return _TYPES[status] if status is not None else type(exc).__name__


class HTTPError(Exception):
    """An error raised inside the HTTP layer itself (auth, body parsing)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "Error"),
            "param": param,
            "code": status,
        },
        "detail": message,
    }
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "bool", "float", "dict", "list", "none"}


def format_location(loc: tuple) -> str:
    """pydantic's ('documents', 3, 'text') → 'documents[3].text'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "body" and not out:
            continue
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            continue  # pydantic names union branches by type; they mean nothing to a client
        else:
            out += f".{part}" if out else part
    return out


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence naming the field at fault (the first error)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = format_location(tuple(first.get("loc", ()))) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "field required"
    message = message.removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RerankdError)
    async def _domain(_: Request, exc: RerankdError) -> JSONResponse:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
        if isinstance(exc, ShuttingDown):
            headers = {"Retry-After": "5"}
        return error_response(status, exc.message, exc.param, headers)

    @app.exception_handler(HTTPError)
    async def _http(_: Request, exc: HTTPError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}")
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error; this is a bug")
        return error_response(
            500, f"internal error ({type(exc).__name__}); this is a bug in rerankd"
        )
