"""Python client for a rerankd server (or any server speaking its API): sync and async.

    from rerankd.client import Client

    with Client("http://localhost:8000", api_key="…") as client:
        for r in client.rerank("capital of China", ["Beijing.", "Paris."]).results:
            print(r.index, r.relevance_score, r.text)

Answers come back as small frozen dataclasses. A non-2xx answer raises an `APIError`
subclass carrying the server's error JSON (`status`, `type`, `message`, `param`). 429 and
503 (overloaded, draining) and failed connections are retried with exponential backoff,
honouring `Retry-After`, a bounded number of times. The client needs httpx only: it
imports neither torch nor the server.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "InternalServerError",
    "ModelInfo",
    "NotFoundError",
    "RateLimitError",
    "RequestTooLargeError",
    "RerankResponse",
    "RerankResult",
    "ScoreResponse",
    "ServiceUnavailableError",
    "Usage",
]

DEFAULT_URL = "http://localhost:8000"
#: statuses that mean "try again later" (overloaded queue, draining or loading server)
RETRY_STATUSES = frozenset({429, 503})

Document = str | Mapping[str, Any]

# module-level so tests can replace them and retry without waiting
_sleep = time.sleep
_async_sleep = asyncio.sleep


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    total_tokens: int = 0
    truncated_documents: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Usage:
        data = data or {}
        return cls(
            int(data.get("prompt_tokens", 0)),
            int(data.get("total_tokens", 0)),
            int(data.get("truncated_documents", 0)),
        )


@dataclass(frozen=True)
class RerankResult:
    """One ranked document: its position in the request, its score, and (unless
    `return_documents=False`) the document as sent — strings come back as `{"text": …}`."""

    index: int
    relevance_score: float
    document: dict[str, Any] | None = None

    @property
    def text(self) -> str | None:
        return None if self.document is None else self.document.get("text")


@dataclass(frozen=True)
class RerankResponse:
    """Results best first, cut to `top_n`."""

    id: str
    model: str
    results: list[RerankResult]
    usage: Usage = field(default_factory=Usage)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RerankResponse:
        results = [
            RerankResult(int(r["index"]), float(r["relevance_score"]), r.get("document"))
            for r in data["results"]
        ]
        return cls(
            str(data.get("id", "")),
            str(data.get("model", "")),
            results,
            Usage.from_json(data.get("usage")),
            dict(data),
        )


@dataclass(frozen=True)
class ScoreResponse:
    """One score per pair, in input order."""

    id: str
    model: str
    scores: list[float]
    usage: Usage = field(default_factory=Usage)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreResponse:
        items = sorted(data["data"], key=lambda d: d["index"])
        return cls(
            str(data.get("id", "")),
            str(data.get("model", "")),
            [float(d["score"]) for d in items],
            Usage.from_json(data.get("usage")),
            dict(data),
        )


@dataclass(frozen=True)
class ModelInfo:
    """An entry of GET /v1/models."""

    id: str
    aliases: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    recipe: str | None = None
    root: str | None = None
    created: int | None = None
    owned_by: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(
            str(data["id"]),
            list(data.get("aliases") or []),
            data.get("max_model_len"),
            data.get("recipe"),
            data.get("root"),
            data.get("created"),
            data.get("owned_by"),
        )


# --- errors ------------------------------------------------------------------------------


class APIError(Exception):
    """The server answered with an error; fields come from its `{"error": {…}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {type or 'Error'}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.body = body
        self.headers = dict(headers or {})

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked us to wait (`Retry-After`), if it said."""
        return _parse_retry_after(self.headers.get("retry-after"))


class BadRequestError(APIError):
    """400: the request is invalid; `param` names the field (e.g. `documents[3]`)."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class NotFoundError(APIError):
    """404: unknown model or route."""


class RequestTooLargeError(APIError):
    """413: the request body is over the server's limit."""


class RateLimitError(APIError):
    """429: the server's queue is full (retried before this is raised)."""


class InternalServerError(APIError):
    """500: a bug in the server."""


class ServiceUnavailableError(APIError):
    """503: the server is loading or draining (retried before this is raised)."""


class APIConnectionError(Exception):
    """The server could not be reached (after retries)."""


class APITimeoutError(APIConnectionError):
    """The request timed out (not retried: the server may still be working on it)."""


_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: RequestTooLargeError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
}


def _error_from_response(response: httpx.Response) -> APIError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    message, kind, param = response.text[:500] or response.reason_phrase, None, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", message))
        kind, param = error.get("type"), error.get("param")
    elif isinstance(error, str):  # other servers' flat {"error": "…"}
        message = error
    cls = _ERRORS.get(status, APIError)
    return cls(status, message, kind, param, body, response.headers)


def _parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- shared: options, retries, request bodies, answers ---------------------------------


class _Base:
    """What the sync and async clients share; they differ only in how a request is sent
    and how a retry waits (`_http_class`, `_request`)."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | None = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self._http = self._http_class(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,  # type: ignore[arg-type]
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before retry `attempt` (0-based): the server's Retry-After when it gave one,
        else backoff · 2^attempt with ±25% jitter; never more than max_backoff."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        base = self.backoff * (2**attempt)
        return min(base * random.uniform(0.75, 1.25), self.max_backoff)

    def _attempts(self, retry: bool) -> range:
        return range(self.max_retries + 1 if retry else 1)

    def _wait_before_retry(
        self,
        attempt: int,
        retry: bool,
        where: str,
        response: httpx.Response | None,
        error: httpx.TransportError | None,
    ) -> float | None:
        """After attempt `attempt`: seconds to wait before the next one, or None when
        `response` is the answer. A timeout is never retried (the server may still be
        working); a failed connection or a 429/503 is, until the attempts run out."""
        last = attempt == self._attempts(retry)[-1]
        if isinstance(error, httpx.TimeoutException):
            raise APITimeoutError(f"{where} timed out: {error}") from error
        if error is not None:
            if last:
                raise APIConnectionError(f"cannot reach {where}: {error}") from error
            return self._delay(attempt, None)
        assert response is not None
        if response.status_code in RETRY_STATUSES and not last:
            return self._delay(attempt, _parse_retry_after(response.headers.get("retry-after")))
        return None


def _as_json(value: str | Sequence[Document]) -> str | list:
    return (
        value if isinstance(value, str) else [d if isinstance(d, str) else dict(d) for d in value]
    )


def _body(required: dict[str, Any], optional: dict[str, Any], extra: Mapping[str, Any] | None):
    """The request body: `required`, the `optional` values that are set, then `extra`."""
    body = {**required, **{k: v for k, v in optional.items() if v is not None}}
    body.update(extra or {})
    return body


def _rerank_body(
    query: str,
    documents: Sequence[Document],
    top_n: int | None,
    instruction: str | None,
    model: str | None,
    return_documents: bool,
    use_activation: bool,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    required = {
        "query": query,
        "documents": _as_json(documents),
        "return_documents": return_documents,
        "use_activation": use_activation,
    }
    return _body(required, {"model": model, "top_n": top_n, "instruction": instruction}, extra)


def _score_body(
    queries: str | Sequence[Document],
    documents: str | Sequence[Document],
    instruction: str | None,
    model: str | None,
    use_activation: bool,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    required = {
        "queries": _as_json(queries),
        "documents": _as_json(documents),
        "use_activation": use_activation,
    }
    return _body(required, {"model": model, "instruction": instruction}, extra)


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    raise _error_from_response(response)


def _models(response: httpx.Response) -> list[ModelInfo]:
    return [ModelInfo.from_json(m) for m in _check(response)["data"]]


def _healthy(response: httpx.Response) -> bool:
    """503 (loading, draining) is "not ready"; any other error raises."""
    if response.status_code == 503:
        return False
    _check(response)
    return True


# --- sync --------------------------------------------------------------------------------


class Client(_Base):
    """Blocking client. Use as a context manager, or call `close()`.

    `max_retries`: extra attempts after a 429/503 answer or a failed connection (0: none).
    `transport`: an httpx transport (tests pass `httpx.MockTransport`, or one that reaches
    an app in the same process).
    """

    _http_class = httpx.Client
    _http: httpx.Client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, path: str, json: Any = None, retry: bool = True
    ) -> httpx.Response:
        for attempt in self._attempts(retry):
            response, error = None, None
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                error = exc
            wait = self._wait_before_retry(
                attempt, retry, f"{method} {self.base_url}{path}", response, error
            )
            if wait is None:
                return response  # type: ignore[return-value]
            _sleep(wait)
        raise AssertionError("unreachable: the last attempt always returns or raises")

    def rerank(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        instruction: str | None = None,
        model: str | None = None,
        return_documents: bool = True,
        use_activation: bool = True,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> RerankResponse:
        """POST /v1/rerank: `documents` are strings or objects with `text` (echoed back)."""
        body = _rerank_body(
            query, documents, top_n, instruction, model, return_documents, use_activation, extra
        )
        return RerankResponse.from_json(_check(self._request("POST", "/v1/rerank", body)))

    def score(
        self,
        queries: str | Sequence[Document],
        documents: str | Sequence[Document],
        instruction: str | None = None,
        model: str | None = None,
        use_activation: bool = True,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> ScoreResponse:
        """POST /v1/score: pair i with i, or one query against every document."""
        body = _score_body(queries, documents, instruction, model, use_activation, extra)
        return ScoreResponse.from_json(_check(self._request("POST", "/v1/score", body)))

    def models(self) -> list[ModelInfo]:
        return _models(self._request("GET", "/v1/models"))

    def health(self) -> bool:
        """True when the server is ready; False while it loads or drains (503). No retries."""
        return _healthy(self._request("GET", "/health", retry=False))


# --- async -------------------------------------------------------------------------------


class AsyncClient(_Base):
    """The same API as `Client`, awaitable: `async with AsyncClient(url) as c: await c.rerank(…)`."""

    _http_class = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, json: Any = None, retry: bool = True
    ) -> httpx.Response:
        for attempt in self._attempts(retry):
            response, error = None, None
            try:
                response = await self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                error = exc
            wait = self._wait_before_retry(
                attempt, retry, f"{method} {self.base_url}{path}", response, error
            )
            if wait is None:
                return response  # type: ignore[return-value]
            await _async_sleep(wait)
        raise AssertionError("unreachable: the last attempt always returns or raises")

    async def rerank(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        instruction: str | None = None,
        model: str | None = None,
        return_documents: bool = True,
        use_activation: bool = True,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> RerankResponse:
        body = _rerank_body(
            query, documents, top_n, instruction, model, return_documents, use_activation, extra
        )
        return RerankResponse.from_json(_check(await self._request("POST", "/v1/rerank", body)))

    async def score(
        self,
        queries: str | Sequence[Document],
        documents: str | Sequence[Document],
        instruction: str | None = None,
        model: str | None = None,
        use_activation: bool = True,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> ScoreResponse:
        body = _score_body(queries, documents, instruction, model, use_activation, extra)
        return ScoreResponse.from_json(_check(await self._request("POST", "/v1/score", body)))

    async def models(self) -> list[ModelInfo]:
        return _models(await self._request("GET", "/v1/models"))

    async def health(self) -> bool:
        return _healthy(await self._request("GET", "/health", retry=False))
