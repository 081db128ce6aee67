"""What real clients and an attacker met first (issue 15), in-process over a fake engine."""

from __future__ import annotations

import math
import time

import orjson
import pytest

from rerankd.service import Limits
from tests.e2e.helpers import assert_error

DOCS = ["Paris is the capital of France.", "Berlin is in Germany.", "Bananas are yellow."]


def rerank(client, path="/v1/rerank", **body):
    body.setdefault("query", "capital of France")
    body.setdefault("documents", DOCS)
    return client.post(path, json=body)


# --- auth ---------------------------------------------------------------------------------


def test_two_authorization_headers_are_refused_even_when_one_is_right(make_client):
    with make_client(api_keys=["k1"]) as client:
        headers = [("authorization", "Bearer nope"), ("authorization", "Bearer k1")]
        response = client.post(
            "/v1/rerank", json={"query": "q", "documents": ["d"]}, headers=headers
        )
        assert_error(response, 400, contains=["more than one Authorization"])
        headers.reverse()
        response = client.post(
            "/v1/rerank", json={"query": "q", "documents": ["d"]}, headers=headers
        )
        assert_error(response, 400)
        ok = client.post(
            "/v1/rerank",
            json={"query": "q", "documents": ["d"]},
            headers={"Authorization": "Bearer k1"},
        )
        assert ok.status_code == 200, ok.text


def test_key_store_swap_takes_effect_on_the_next_request(make_client):
    with make_client(api_keys=["old"]) as client:
        client.app.state.api_keys.replace(["new"])
        body = {"query": "q", "documents": ["d"]}
        assert (
            client.post(
                "/v1/rerank", json=body, headers={"Authorization": "Bearer old"}
            ).status_code
            == 401
        )
        assert (
            client.post(
                "/v1/rerank", json=body, headers={"Authorization": "Bearer new"}
            ).status_code
            == 200
        )


# --- HTTP edges -----------------------------------------------------------------------------


def test_trailing_slash_is_served_without_a_redirect(client):
    response = client.post(
        "/v1/rerank/",
        json={"query": "q", "documents": ["d"]},
        headers={"Host": "evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 200, response.text
    assert "location" not in response.headers


def test_head_health_is_200_for_load_balancers(client):
    response = client.head("/health")
    assert response.status_code == 200
    assert response.headers["x-request-id"]


def test_refused_cors_preflight_is_the_json_error_shape(make_client):
    with make_client(cors_origins=["https://ok.example"]) as client:
        response = client.options(
            "/v1/rerank",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert_error(response, 400, contains=["Disallowed CORS"])
        assert response.headers["x-request-id"]


def test_websocket_upgrade_is_refused_with_the_json_error_shape(client):
    from starlette.testclient import WebSocketDenialResponse

    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/v1/rerank"):
        pass
    response = denied.value
    assert_error(response, 403, contains=["WebSocket"])


# --- bodies ---------------------------------------------------------------------------------


def test_a_body_of_millions_of_tiny_values_is_refused_before_parsing(client):
    body = b'{"query":"q","documents":[' + b'"",' * 2_000_000 + b'""]}'
    started = time.perf_counter()
    response = client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    assert_error(response, 400, contains=["JSON values"])
    assert elapsed < 2.0, elapsed


def test_too_many_documents_are_refused_before_validation(make_client):
    with make_client(limits=Limits(max_documents=5)) as client:
        response = rerank(client, documents=["d"] * 6)
        assert_error(response, 400, param="documents", contains=["--max-documents"])


def test_an_integer_beyond_64_bits_is_refused_not_changed(client):
    body = b'{"query": "q", "documents": [{"text": "d", "id": 12345678901234567890123}]}'
    response = client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, contains=["64 bits"])


def test_integers_within_64_bits_are_echoed_exactly(client):
    body = b'{"query": "q", "documents": [{"text": "d", "id": 18446744073709551615, "f": 1e22}]}'
    response = client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert b"18446744073709551615" in response.content
    assert orjson.loads(response.content)["results"][0]["document"]["id"] == 18446744073709551615


def test_an_oversized_instruction_is_refused_fast(client):
    started = time.perf_counter()
    response = rerank(client, instruction="x " * 5_000_000)
    assert_error(response, 400, param="instruction", contains=["instruction"])
    assert time.perf_counter() - started < 2.0


def test_an_instruction_longer_than_the_context_but_short_in_bytes_is_refused(client):
    # ~9k words: above the tiny model's 8192-token limit, below the fast byte bound
    response = rerank(client, instruction="word " * 9000)
    assert_error(response, 400, param="instruction")


# --- wrong answers --------------------------------------------------------------------------


def _health_within(client, status: int, seconds: float = 3.0) -> None:
    """/health answers `status` within `seconds` (the probe runs in the background)."""
    deadline = time.monotonic() + seconds
    while client.get("/health").status_code != status:
        assert time.monotonic() < deadline, client.get("/health").text
        time.sleep(0.02)


def test_a_nan_score_is_a_500_naming_the_cause_and_degrades_health(make_client):
    with make_client(nan=True) as client:
        assert client.get("/health").status_code == 200
        for path in ("/v1/rerank", "/v1/score"):
            body = (
                {"query": "q", "documents": DOCS}
                if "rerank" in path
                else {"queries": "q", "documents": DOCS}
            )
            assert_error(client.post(path, json=body), 500, contains=["non-finite"])
        tei = client.post("/rerank", json={"query": "q", "texts": DOCS})
        assert_error(tei, 500, contains=["non-finite"])
        _health_within(client, 503)
        assert_error(client.get("/health"), 503, contains=["degraded"])
        metrics = client.get("/metrics").text
        assert 'rerankd_failures_total{kind="non_finite"} 3.0' in metrics
        assert 'rerankd_failures_total{kind="health_probe"} 1.0' in metrics


def test_health_recovers_after_a_success(make_client):
    with make_client(nan=True) as client:
        client.post("/v1/rerank", json={"query": "q", "documents": DOCS})
        _health_within(client, 503)
        client.engine.nan = False
        assert rerank(client).status_code == 200
        assert client.get("/health").status_code == 200


def test_health_recovers_by_its_own_probe_when_no_request_comes(make_client, monkeypatch):
    monkeypatch.setattr("rerankd.service.PROBE_EVERY_S", 0.05)
    with make_client(nan=True) as client:
        client.post("/v1/rerank", json={"query": "q", "documents": DOCS})
        _health_within(client, 503)
        client.engine.nan = False  # e.g. a transient device fault cleared
        _health_within(client, 200)


def test_a_repeated_poison_input_fails_alone_and_never_degrades_health(make_client):
    with make_client(fail_over=100) as client:
        for _ in range(5):
            response = rerank(client, documents=["word " * 300])
            assert_error(response, 500, contains=["inference failed"])
        time.sleep(0.2)  # let the probe run
        assert client.get("/health").status_code == 200
        assert rerank(client).status_code == 200


# --- admission ------------------------------------------------------------------------------


def test_admission_refuses_by_estimate_before_tokenizing(make_client):
    with make_client(limits=Limits(max_queued_tokens=100)) as client:
        service = client.service
        service.admitted_tokens = 50  # another request is being served
        response = rerank(client, documents=["word " * 200] * 4)
        assert_error(response, 429, contains=["--max-queued-tokens"])
        assert response.headers["retry-after"]
        assert client.engine.batches == []  # nothing reached the engine
        service.admitted_tokens = 0
        assert rerank(client).status_code == 200  # alone, even a big one is admitted


# --- shapes real clients read ---------------------------------------------------------------


def test_rerank_answers_voyage_data_next_to_results(client):
    body = rerank(client, top_k=2).json()
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [r["index"] for r in body["results"]]
    assert all(isinstance(d["document"], str) for d in body["data"])
    assert [d["relevance_score"] for d in body["data"]] == [
        r["relevance_score"] for r in body["results"]
    ]


def test_voyage_truncation_false_refuses_an_over_long_document(client):
    response = rerank(client, documents=["word " * 9000], truncation=False)
    assert_error(response, 400, contains=["truncate"])


def test_error_bodies_carry_a_top_level_detail_for_jina_clients(client):
    response = rerank(client, model="nope")
    error = assert_error(response, 404)
    assert response.json()["detail"] == error["message"]


def test_infinity_clients_get_documents_as_strings(client):
    body = rerank(client, raw_scores=False).json()
    assert all(isinstance(r["document"], str) for r in body["results"])
    assert body["object"] == "rerank"  # infinity-client validates it
    assert isinstance(rerank(client).json()["results"][0]["document"], dict)


def test_server_wide_string_document_format(make_client):
    with make_client(document_format="string") as client:
        assert all(isinstance(r["document"], str) for r in rerank(client).json()["results"])


@pytest.mark.parametrize(
    "sides",
    [
        {"data_1": "capital of France", "data_2": DOCS},
        {"queries": "capital of France", "items": DOCS},
        {"text_1": "capital of France", "text_2": DOCS},
        {"queries": "capital of France", "documents": DOCS},
    ],
)
def test_score_accepts_every_vllm_name_for_its_sides(client, sides):
    response = client.post("/v1/score", json=sides)
    assert response.status_code == 200, response.text
    expected = client.post("/v1/score", json={"queries": "capital of France", "documents": DOCS})
    assert [d["score"] for d in response.json()["data"]] == [
        d["score"] for d in expected.json()["data"]
    ]


def test_vllm_zero_caps_mean_no_cap(client):
    plain = rerank(client).json()
    zeros = rerank(
        client, max_tokens_per_doc=0, max_tokens_per_query=0, truncate_prompt_tokens=-1
    ).json()
    assert zeros["results"] == plain["results"]


def test_truncate_prompt_tokens_cuts_each_pair_to_that_many_tokens(client):
    long_doc = "word " * 500
    cut = rerank(client, documents=[long_doc], truncate_prompt_tokens=120).json()
    # at most that many (the document is cut at its own token boundaries, then templated)
    assert 100 < cut["usage"]["prompt_tokens"] <= 120
    assert cut["usage"]["truncated_documents"] == 1
    too_small = rerank(client, documents=[long_doc], truncate_prompt_tokens=3)
    assert_error(too_small, 400, param="truncate_prompt_tokens")


def test_max_tokens_per_query_cuts_the_query(client):
    whole = rerank(client, query="alpha beta gamma delta " * 10).json()
    cut = rerank(client, query="alpha beta gamma delta " * 10, max_tokens_per_query=4).json()
    assert cut["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"]


def test_nim_ranking_route(client):
    response = client.post(
        "/v1/ranking",
        json={
            "model": "tiny-qwen3",
            "query": {"text": "capital of France"},
            "passages": [{"text": d} for d in DOCS],
            "truncate": "END",
        },
    )
    assert response.status_code == 200, response.text
    rankings = response.json()["rankings"]
    raw = rerank(client, use_activation=False).json()["results"]
    assert rankings == [{"index": r["index"], "logit": r["relevance_score"]} for r in raw]
    assert all(math.isfinite(r["logit"]) for r in rankings)


def test_last_path_part_of_a_served_name_is_an_alias(make_client):
    with make_client(served_name="Qwen/Qwen3-Reranker-4B") as client:
        response = rerank(client, model="Qwen3-Reranker-4B")
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "Qwen/Qwen3-Reranker-4B"


def test_models_names_the_attention_kernel_field(client):
    (model,) = client.get("/v1/models").json()["data"]
    assert "attention" in model and model["attention"] is None  # the fake engine has no choice
    assert model["supports_instruction"] is True  # Qwen3-Reranker takes an instruction


def test_tei_route_honours_top_n_as_litellm_sends_it(client):
    items = client.post("/rerank", json={"query": "q", "texts": DOCS, "top_n": 2}).json()
    assert len(items) == 2
    assert len(client.post("/rerank", json={"query": "q", "texts": DOCS}).json()) == 3
