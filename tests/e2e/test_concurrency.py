"""End to end at scale: a 1,000-document request, and 32 concurrent requests whose scores
must not depend on what else the server was doing at the time."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.reference import qwen3_reference, sigmoid
from tests.words import WORDS

from .helpers import assert_close, assert_sorted, scores_by_index


def make_documents(n: int, seed: int, min_words: int = 3, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def test_a_thousand_documents_in_one_request_match_smaller_chunks(client, qwen3_dir, qwen3_max_len):
    query = "which document talks about the old stone bridge in the village?"
    documents = make_documents(1000, seed=1)
    response = client.post("/v1/rerank", json={"query": query, "documents": documents})
    assert response.status_code == 200, response.text
    body = response.json()
    indices = [r["index"] for r in body["results"]]
    assert sorted(indices) == list(range(1000))  # every index exactly once
    assert_sorted(body["results"])
    for result in body["results"]:
        assert result["document"] == {"text": documents[result["index"]]}
    big = scores_by_index(body)

    chunked: dict[int, float] = {}
    tokens = 0
    for start in range(0, 1000, 125):
        part = client.post(
            "/v1/rerank", json={"query": query, "documents": documents[start : start + 125]}
        )
        assert part.status_code == 200, part.text
        tokens += part.json()["usage"]["prompt_tokens"]
        for index, value in scores_by_index(part.json()).items():
            chunked[start + index] = value
    assert chunked.keys() == big.keys()
    for index in range(1000):
        assert_close(big[index], chunked[index], 1e-5, f"document {index}")
    assert body["usage"]["prompt_tokens"] == tokens

    # a sample against the reference, one pair at a time
    sample = [0, 1, 499, 998, 999]
    ref = qwen3_reference(
        qwen3_dir, query, [documents[i] for i in sample], max_length=qwen3_max_len
    )
    for index, (_, raw) in zip(sample, ref, strict=True):
        assert_close(big[index], sigmoid(raw), 1e-4, f"document {index} vs reference")


def _request(i: int) -> tuple[str, dict[str, Any]]:
    """Request i of the concurrent workload: different queries, routes and document sizes."""
    rng = random.Random(1000 + i)
    query = f"query {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    documents = make_documents(rng.randint(1, 12), seed=2000 + i, max_words=rng.choice([5, 60]))
    kind = i % 4
    if kind == 0:
        return "/v1/rerank", {"query": query, "documents": documents}
    if kind == 1:
        return "/v1/score", {"queries": query, "documents": documents}
    if kind == 2:
        return "/v2/rerank", {"query": query, "documents": documents, "use_activation": False}
    return "/rerank", {"query": query, "texts": documents, "raw_scores": True}


def _scores(route: str, body: Any) -> dict[int, float]:
    if route == "/v1/score":
        return {d["index"]: d["score"] for d in body["data"]}
    if route == "/rerank":
        return {item["index"]: item["score"] for item in body}
    return scores_by_index(body)


def test_32_concurrent_requests_score_exactly_like_sequential_ones(client, qwen3_server):
    workload = [_request(i) for i in range(32)]
    sequential = []
    for route, body in workload:
        response = client.post(route, json=body)
        assert response.status_code == 200, response.text
        sequential.append(_scores(route, response.json()))

    barrier = threading.Barrier(len(workload))

    def send(item: tuple[str, dict[str, Any]]) -> tuple[int, Any]:
        route, body = item
        with httpx.Client(base_url=qwen3_server, timeout=120) as c:
            barrier.wait(timeout=60)
            response = c.post(route, json=body)
            return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=len(workload)) as pool:
        concurrent = list(pool.map(send, workload))

    for i, ((route, request), (status, body)) in enumerate(zip(workload, concurrent, strict=True)):
        assert status == 200, (i, body)
        got = _scores(route, body)
        expected = sequential[i]
        n = len(request.get("documents") or request["texts"])
        assert sorted(got) == list(range(n)), (i, got)
        # activated scores (probabilities) to 1e-6; raw logits, whose float32 rounding in a
        # differently composed batch is a few 1e-6 on values of order 1, to 1e-5
        raw = request.get("use_activation") is False or request.get("raw_scores") is True
        tol = 1e-5 if raw else 1e-6
        for index in range(n):
            assert_close(got[index], expected[index], tol, f"request {i} document {index}")


def test_concurrent_async_requests_on_one_connection_pool_all_succeed(qwen3_server, client):
    """asyncio + httpx.AsyncClient: many in-flight requests share a pool; none is lost."""
    import asyncio

    queries = [f"query number {i} about {WORDS[i % len(WORDS)]}" for i in range(24)]
    documents = make_documents(6, seed=7)
    expected = [
        scores_by_index(client.post("/v1/rerank", json={"query": q, "documents": documents}).json())
        for q in queries
    ]

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=qwen3_server, timeout=120, limits=limits) as ac:
            return await asyncio.gather(
                *(ac.post("/v1/rerank", json={"query": q, "documents": documents}) for q in queries)
            )

    responses = asyncio.run(run())
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        got = scores_by_index(response.json())
        for index, value in expected[i].items():
            assert_close(got[index], value, 1e-6, f"query {i} document {index}")
