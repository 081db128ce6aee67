"""Shared helpers for the end-to-end suite: HTTP assertions, servers started in parallel."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

#: the documented error `type` for each status (DESIGN.md §1 "Errors")
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
}

RERANK_ID = re.compile(r"^rerank-[0-9a-f]{32}$")
SCORE_ID = re.compile(r"^score-[0-9a-f]+$")


def assert_error(
    response: httpx.Response, status: int, param: Any = ..., contains: Sequence[str] = ()
) -> dict[str, Any]:
    """The response is exactly `{"error": {message, type, param, code}}` with `status`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    error = body["error"]
    assert body["detail"] == error["message"], body  # Jina's clients read `detail`
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"]
    assert error["code"] == status, error
    assert isinstance(error["type"], str) and error["type"], error
    if status in ERROR_TYPES:
        assert error["type"] == ERROR_TYPES[status], error
    assert error["param"] is None or isinstance(error["param"], str), error
    if param is not ...:
        assert error["param"] == param, error
    for fragment in contains:
        assert fragment in error["message"], (fragment, error["message"])
    return error


def post_raw(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def scores_by_index(body: dict[str, Any]) -> dict[int, float]:
    """{index: relevance_score} of a rerank response."""
    return {r["index"]: r["relevance_score"] for r in body["results"]}


def assert_sorted(results: Sequence[Mapping[str, Any]], key: str = "relevance_score") -> None:
    """Sorted by score descending, ties by lower index first."""
    expected = sorted(results, key=lambda r: (-r[key], r["index"]))
    assert list(results) == expected, [(r["index"], r[key]) for r in results]


def assert_close(actual: float, expected: float, tol: float, what: str = "") -> None:
    assert math.isfinite(actual), (what, actual)
    assert abs(actual - expected) <= tol, f"{what}: got {actual!r}, expected {expected!r}"


def model_info(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1, data
    return data[0]
