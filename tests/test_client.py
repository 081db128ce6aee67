"""rerankd.client: typed results against the served app; retries and errors against stubs.

The app is `rerankd serve`'s (rerankd.api.build_app over the real engine), in this process:
the client's own transport hands it each request (tests/in_process.py), so no server
process starts. The CLI's --url mode over real TCP is tested in tests/test_eval_cli.py."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time

import httpx
import pytest

import rerankd.client as client_module
from rerankd.client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    RateLimitError,
    RerankResult,
    ServiceUnavailableError,
)
from tests.in_process import AppTransport, served_real

QUERY = "What is the capital of France?"
DOCS = [
    "The capital of Brazil is Brasilia.",
    "The capital of France is Paris.",
    "Horses and cows are both animals",
    "Paris is known for the Eiffel Tower and the Louvre museum.",
]


# --- the served app ----------------------------------------------------------------------

URL = "http://rerankd.test"


@pytest.fixture(scope="module")
def app(qwen3_dir):
    """The app of `rerankd serve --model <tiny qwen3> --dtype float32 --device cpu`."""
    with served_real(qwen3_dir) as app:
        yield app


@pytest.fixture(scope="module")
def client(app):
    with Client(URL, timeout=120, transport=AppTransport(app)) as c:
        yield c


def test_rerank_returns_typed_results_equal_to_the_raw_http_answer(client, app):
    got = client.rerank(QUERY, DOCS)
    raw = app.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()
    assert got.model == raw["model"]
    assert got.id.startswith("rerank-")
    assert got.usage.prompt_tokens == raw["usage"]["prompt_tokens"] > 0
    assert [r.index for r in got.results] == [r["index"] for r in raw["results"]]
    for mine, theirs in zip(got.results, raw["results"], strict=True):
        assert isinstance(mine, RerankResult)
        assert mine.relevance_score == pytest.approx(theirs["relevance_score"], abs=1e-6)
        assert mine.document == {"text": DOCS[mine.index]}
        assert mine.text == DOCS[mine.index]
    scores = [r.relevance_score for r in got.results]
    assert scores == sorted(scores, reverse=True)


def test_rerank_options_top_n_no_documents_raw_scores_and_object_documents(client):
    full = client.rerank(QUERY, DOCS)
    top = client.rerank(QUERY, DOCS, top_n=2, return_documents=False)
    assert [r.index for r in top.results] == [r.index for r in full.results[:2]]
    assert all(r.document is None and r.text is None for r in top.results)

    raw = client.rerank(QUERY, DOCS, use_activation=False)
    by_index = {r.index: r.relevance_score for r in full.results}
    for r in raw.results:  # activated = sigmoid(raw) for Qwen3-Reranker
        assert 1 / (1 + math.exp(-r.relevance_score)) == pytest.approx(by_index[r.index], abs=1e-5)

    objects = [{"text": d, "id": f"doc-{i}"} for i, d in enumerate(DOCS)]
    echoed = client.rerank(QUERY, objects, instruction="Find the capital")
    assert {r.index: r.document["id"] for r in echoed.results} == {
        i: f"doc-{i}" for i in range(len(DOCS))
    }


def test_score_matches_rerank_scores_in_input_order(client):
    scored = client.score(QUERY, DOCS)
    ranked = {r.index: r.relevance_score for r in client.rerank(QUERY, DOCS).results}
    assert len(scored.scores) == len(DOCS)
    for i, s in enumerate(scored.scores):
        assert s == pytest.approx(ranked[i], abs=1e-5)
    pairs = client.score([QUERY, QUERY], DOCS[:2])
    assert pairs.scores == pytest.approx(scored.scores[:2], abs=1e-5)


def test_models_and_health(client):
    models = client.models()
    assert len(models) == 1
    assert models[0].id and models[0].max_model_len > 0
    assert models[0].recipe == "qwen3-reranker"
    assert client.health() is True
    # the served name (and its aliases) select the model
    assert client.rerank(QUERY, DOCS[:1], model=models[0].id).model == models[0].id


def test_errors_carry_the_server_error_json(client):
    with pytest.raises(NotFoundError) as not_found:
        client.rerank(QUERY, DOCS, model="no-such-model")
    assert not_found.value.status == 404
    assert not_found.value.type == "NotFoundError"
    assert not_found.value.param == "model"
    assert "no-such-model" in not_found.value.message

    with pytest.raises(BadRequestError) as bad:
        client.rerank(QUERY, ["fine", {"title": "no text field"}])
    assert bad.value.status == 400 and bad.value.type == "BadRequestError"
    assert bad.value.param == "documents[1].text"
    assert bad.value.body["error"]["code"] == 400


def test_async_client_gives_the_same_answers(client, app):
    async def run():
        async with AsyncClient(URL, timeout=120, transport=AppTransport(app)) as ac:
            ranked, scored, models, healthy = await asyncio.gather(
                ac.rerank(QUERY, DOCS, top_n=3), ac.score(QUERY, DOCS), ac.models(), ac.health()
            )
            with pytest.raises(NotFoundError):
                await ac.rerank(QUERY, DOCS, model="nope")
            return ranked, scored, models, healthy

    ranked, scored, models, healthy = asyncio.run(run())
    sync = client.rerank(QUERY, DOCS, top_n=3)
    assert [r.index for r in ranked.results] == [r.index for r in sync.results]
    assert scored.scores == pytest.approx(client.score(QUERY, DOCS).scores, abs=1e-6)
    assert models == client.models() and healthy is True


def test_api_key_is_sent_and_a_wrong_key_is_an_authentication_error(qwen3_dir):
    with served_real(qwen3_dir, "--api-key", "s3cret") as app:
        transport = AppTransport(app)
        with Client(URL, api_key="s3cret", transport=transport) as good:
            assert good.rerank(QUERY, DOCS[:2]).results
            assert good.models()[0].id
        bad = Client(URL, api_key="wrong", transport=transport)
        with bad, pytest.raises(AuthenticationError) as exc:
            bad.rerank(QUERY, DOCS[:2])
        assert exc.value.status == 401 and exc.value.message == "invalid API key"
        with Client(URL, transport=transport) as anonymous:
            assert anonymous.health() is True  # /health stays open
            with pytest.raises(AuthenticationError, match="missing API key"):
                anonymous.models()


# --- retries, against a stub -------------------------------------------------------------

OK_BODY = {
    "id": "rerank-0",
    "model": "stub",
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
    "results": [{"index": 0, "relevance_score": 0.5, "document": {"text": "d"}}],
}


def _overloaded(status: int, headers: dict | None = None) -> httpx.Response:
    kind = {429: "RateLimitError", 503: "ServiceUnavailableError"}[status]
    body = {"error": {"message": "queue is full", "type": kind, "param": None, "code": status}}
    return httpx.Response(status, json=body, headers=headers)


class Stub:
    """Answers from a script of responses (or exceptions), recording every request."""

    def __init__(self, *script):
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def stub_client(stub: Stub, **options) -> Client:
    return Client("http://stub", transport=httpx.MockTransport(stub), **options)


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []

    async def fake_async_sleep(seconds):
        waited.append(seconds)

    monkeypatch.setattr(client_module, "_sleep", waited.append)
    monkeypatch.setattr(client_module, "_async_sleep", fake_async_sleep)
    return waited


def test_retries_429_honouring_retry_after_then_succeeds(sleeps):
    stub = Stub(
        _overloaded(429, {"Retry-After": "2"}), _overloaded(503), httpx.Response(200, json=OK_BODY)
    )
    with stub_client(stub, api_key="k", backoff=0.5) as c:
        got = c.rerank("q", ["d"], top_n=1, model="stub")
    assert got.results == [RerankResult(0, 0.5, {"text": "d"})]
    assert len(stub.requests) == 3
    assert sleeps[0] == 2.0  # the server's Retry-After
    assert 0.5 * 2 * 0.75 <= sleeps[1] <= 0.5 * 2 * 1.25  # backoff · 2^1 with jitter
    sent = json.loads(stub.requests[0].content)
    assert sent == {
        "query": "q", "documents": ["d"], "return_documents": True, "use_activation": True,
        "model": "stub", "top_n": 1,
    }  # fmt: skip
    assert all(r.headers["authorization"] == "Bearer k" for r in stub.requests)
    assert stub.requests[0].url.path == "/v1/rerank"


def test_retries_are_bounded_and_the_last_error_is_raised(sleeps):
    stub = Stub(*[_overloaded(429, {"Retry-After": "100"}) for _ in range(3)])
    c = stub_client(stub, max_retries=2, max_backoff=7)
    with c, pytest.raises(RateLimitError) as exc:
        c.rerank("q", ["d"])
    assert len(stub.requests) == 3  # 1 + max_retries
    assert sleeps == [7, 7]  # Retry-After capped at max_backoff
    err = exc.value
    assert (err.status, err.type, err.message, err.param) == (429, "RateLimitError", "queue is full", None)  # fmt: skip
    assert err.retry_after == 100


def test_exponential_backoff_without_retry_after(sleeps):
    stub = Stub(*[_overloaded(503) for _ in range(4)])
    c = stub_client(stub, max_retries=3, backoff=1)
    with c, pytest.raises(ServiceUnavailableError):
        c.score("q", ["d"])
    assert len(sleeps) == 3
    for attempt, waited in enumerate(sleeps):
        assert 0.75 * 2**attempt <= waited <= 1.25 * 2**attempt


def test_http_date_retry_after_and_no_retry_on_client_errors(sleeps):
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    stub = Stub(_overloaded(429, {"Retry-After": later}), httpx.Response(200, json=OK_BODY))
    with stub_client(stub) as c:
        c.rerank("q", ["d"])
    assert 25 <= sleeps[0] <= 30

    error = {"message": "documents[0]: bad", "type": "BadRequestError", "param": "documents[0]"}
    stub = Stub(httpx.Response(400, json={"error": {**error, "code": 400}}))
    c = stub_client(stub)
    with c, pytest.raises(BadRequestError) as exc:
        c.rerank("q", [{"x": 1}])
    assert len(stub.requests) == 1 and exc.value.param == "documents[0]"


def test_connection_errors_are_retried_then_raised(sleeps):
    boom = httpx.ConnectError("connection refused")
    stub = Stub(boom, httpx.Response(200, json=OK_BODY))
    with stub_client(stub) as c:
        assert c.rerank("q", ["d"]).results[0].index == 0
    c = stub_client(Stub(boom, boom), max_retries=1)
    with c, pytest.raises(APIConnectionError, match="cannot reach"):
        c.models()


def test_non_json_error_bodies_still_raise_typed_errors(sleeps):
    c = stub_client(Stub(httpx.Response(404, text="<html>not here</html>")))
    with c, pytest.raises(NotFoundError) as exc:
        c.models()
    assert exc.value.status == 404 and "not here" in exc.value.message and exc.value.type is None


def test_async_client_retries_too(sleeps):
    stub = Stub(_overloaded(429, {"Retry-After": "1"}), httpx.Response(200, json=OK_BODY))

    async def run():
        async with AsyncClient("http://stub", transport=httpx.MockTransport(stub)) as c:
            return await c.rerank("q", ["d"])

    assert asyncio.run(run()).results[0].relevance_score == 0.5
    assert sleeps == [1.0] and len(stub.requests) == 2
