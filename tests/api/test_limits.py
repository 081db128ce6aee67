"""Request limits, the concurrency cap, the request timeout and non-finite scores, in-process.

The app is the one `rerankd serve FLAGS` builds (tests/api/conftest.py: `serve_flags`,
`serve_real`); what needs the real HTTP stack (body limits by Content-Length and chunked
bodies, a client that disconnects, the flood measured by RSS) stays in tests/hardening.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.hardening.conftest import assert_error, nan_model_dir
from tests.harness import metric_sum

from .conftest import FakeEngine

MAX_DOCS = 8
MAX_QUERY_TOKENS = 16
#: a batch takes this long, past the request timeout, with at most 2 requests served at once
SLOW = ("--request-timeout", "1", "--max-concurrent-requests", "2")
SLOW_BATCH_S = 2.0


@pytest.fixture(scope="module")
def limited(serve_flags):
    flags = ("--max-documents", str(MAX_DOCS), "--max-query-tokens", str(MAX_QUERY_TOKENS))
    with serve_flags(*flags) as client:
        yield client


def metric(client, name: str, **labels: str) -> float:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return metric_sum(response.text, name, **labels)


# --- documents and query (400) --------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_more_than_max_documents_is_400_naming_documents(limited, route):
    response = limited.post(
        route, json={"query": "q", "documents": [f"doc {i}" for i in range(MAX_DOCS + 1)]}
    )
    assert_error(response, 400, param="documents", contains=[str(MAX_DOCS), "--max-documents"])
    at_limit = limited.post(
        route, json={"query": "q", "documents": [f"doc {i}" for i in range(MAX_DOCS)]}
    )
    assert at_limit.status_code == 200, at_limit.text


def test_more_than_max_documents_pairs_or_tei_texts_is_400(limited):
    too_many = [f"doc {i}" for i in range(MAX_DOCS + 1)]
    assert_error(limited.post("/v1/score", json={"queries": "q", "documents": too_many}), 400)
    assert_error(limited.post("/v1/score", json={"queries": too_many, "documents": too_many}), 400)
    assert_error(limited.post("/rerank", json={"query": "q", "texts": too_many}), 400)


def test_a_query_over_max_query_tokens_is_400_naming_the_query(limited):
    long_query = " ".join(f"word{i}" for i in range(40))
    for route, payload in [
        ("/v1/rerank", {"query": long_query, "documents": ["a", "b"]}),
        ("/v1/score", {"queries": long_query, "documents": ["a", "b"]}),
        ("/rerank", {"query": long_query, "texts": ["a"]}),
    ]:
        assert_error(
            limited.post(route, json=payload), 400, param="query", contains=["--max-query-tokens"]
        )
    ok = limited.post("/v1/rerank", json={"query": "short query", "documents": ["a"]})
    assert ok.status_code == 200, ok.text


# --- concurrency cap (429) and timeout (504) ------------------------------------------------


def test_requests_beyond_max_concurrent_requests_get_429_at_once(serve_flags, access_log):
    payload = {"query": "q", "documents": ["one document"]}
    request_id = f"capped-{uuid.uuid4().hex[:8]}"
    engine = FakeEngine(delay_s=SLOW_BATCH_S)
    with serve_flags(*SLOW, engine=engine) as client, ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(client.post, "/v1/rerank", json=payload) for _ in range(2)]
        time.sleep(0.4)  # both admitted; each waits on the 2 s engine (and times out at 1 s)
        third = client.post("/v1/rerank", json=payload, headers={"X-Request-Id": request_id})
        held_still = not any(h.done() for h in holders)
        first_two = [h.result() for h in holders]
        overloaded = metric(client, "rerankd_failures_total", kind="overloaded")
    assert_error(third, 429, contains=["already being served", "limit 2"])
    assert third.headers["retry-after"].isdigit()
    assert held_still, "the cap answered only after the held requests had finished"
    assert access_log(request_id)["latency_ms"] < 500  # refused at once
    assert [r.status_code for r in first_two] == [504, 504], [r.text for r in first_two]
    assert overloaded >= 1


def test_request_timeout_is_504_error_json_and_the_server_stays_healthy(serve_flags, access_log):
    with serve_flags(*SLOW, engine=FakeEngine(delay_s=SLOW_BATCH_S)) as client:
        timeouts_before = metric(client, "rerankd_failures_total", kind="timeout")
        for n in range(3):  # more than --max-concurrent-requests: none may leak a slot
            request_id = f"timeout-{n}-{uuid.uuid4().hex[:8]}"
            response = client.post(
                "/v1/rerank",
                json={"query": "q", "documents": ["a", "b"]},
                headers={"X-Request-Id": request_id},
            )
            assert_error(response, 504, param=None, contains=["--request-timeout"])
            # cancelled at 1 s (the app's clock), not after the 2 s batch
            assert 950 <= access_log(request_id)["latency_ms"] < 1900
        assert metric(client, "rerankd_failures_total", kind="timeout") == timeouts_before + 3
        health = client.get("/health")
        assert health.status_code == 200, health.text
        assert client.get("/v1/models").status_code == 200
        empty = client.post("/v1/rerank", json={"query": "q", "documents": []})
        assert empty.status_code == 200 and empty.json()["results"] == []
        score = client.post("/v1/score", json={"queries": "q", "documents": ["a"]})
        assert_error(score, 504)


# --- a checkpoint whose scores are NaN (the real engine) -------------------------------------

NAN_REQUESTS = [
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
    ("/v1/score", {"queries": "q", "documents": ["a", "b"]}),
    ("/rerank", {"query": "q", "texts": ["a", "b"]}),  # TEI
]


def test_non_finite_scores_are_500s_naming_the_cause_counted_and_degrade_health(serve_real):
    """A copy of the tiny Qwen3 fixture with one weight set to NaN (every score is NaN), on
    the real engine: the model's NaN reaches the service, which refuses to rank it."""
    with serve_real(model=nan_model_dir()) as client:
        counted = metric(client, "rerankd_failures_total", kind="non_finite")
        for path, payload in NAN_REQUESTS:
            error = assert_error(client.post(path, json=payload), 500, contains=["non-finite"])
            assert "nan" in error["message"], error
        assert metric(client, "rerankd_failures_total", kind="non_finite") == counted + 3
        deadline = time.monotonic() + 15
        while (health := client.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 after 3 failing requests"
            time.sleep(0.1)
        assert_error(health, 503, contains=["degraded"])
        assert client.get("/version").status_code == 200  # the app goes on answering
