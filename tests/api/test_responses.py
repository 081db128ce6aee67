"""Shaping a service `Ranking` into /v1/rerank's results and usage (routes and the offline
job share it), and the error `type` a domain error is reported with outside HTTP."""

from __future__ import annotations

import pytest

from rerankd.api.errors import error_type
from rerankd.api.responses import rerank_results, usage
from rerankd.errors import (
    InferenceFailed,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
)
from rerankd.types import Ranking

RANKING = Ranking(
    "m", order=[2, 0], scores=[0.5, 0.1, 0.9], prompt_tokens=30, truncated_documents=1
)
DOCUMENTS = ["alpha", {"text": "beta", "id": 7}, {"title": "t", "body": "gamma"}]
TEXTS = ["alpha", "beta", "title: t"]


def test_results_follow_the_ranking_order_and_echo_documents_exactly_as_sent():
    results = rerank_results(RANKING, DOCUMENTS, TEXTS, return_documents=True)
    assert results == [
        {"index": 2, "document": {"title": "t", "body": "gamma"}, "relevance_score": 0.9},
        {"index": 0, "document": {"text": "alpha"}, "relevance_score": 0.5},
    ]


def test_results_carry_the_scored_text_for_string_clients_and_nothing_when_not_asked():
    as_text = rerank_results(RANKING, DOCUMENTS, TEXTS, return_documents=True, as_string=True)
    assert [r["document"] for r in as_text] == ["title: t", "alpha"]
    bare = rerank_results(RANKING, DOCUMENTS, TEXTS, return_documents=False)
    assert bare == [{"index": 2, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.5}]


def test_usage_counts_prompt_tokens_as_total_and_truncated_documents():
    assert usage(RANKING) == {"prompt_tokens": 30, "total_tokens": 30, "truncated_documents": 1}


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidRequest("x"), "BadRequestError"),
        (ModelNotFound("x"), "NotFoundError"),
        (Overloaded("x"), "RateLimitError"),
        (ShuttingDown("x"), "ServiceUnavailableError"),
        (RequestTimeout("x"), "TimeoutError"),
        (InferenceFailed("x"), "InternalServerError"),
        (ModelLoadError("x"), "ModelLoadError"),  # never answered over HTTP: its own name
    ],
)
def test_a_domain_error_has_the_type_its_http_answer_has(error, expected):
    assert error_type(error) == expected
