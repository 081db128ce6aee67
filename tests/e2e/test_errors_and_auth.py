"""End to end: error JSON for every kind of bad request, API keys, service routes, and
startup failures that must end in one clear paragraph instead of a traceback."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rerankd

from .helpers import assert_error, post_raw

ALL_POST_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank", "/v1/score", "/score")
GOOD_RERANK = {"query": "what is water?", "documents": ["water is wet", "stone is hard"]}
GOOD_SCORE = {"queries": "what is water?", "documents": ["water is wet", "stone is hard"]}


def good_body(route: str) -> dict[str, Any]:
    return GOOD_SCORE if "score" in route else GOOD_RERANK


# --- bodies that are not a JSON object ----------------------------------------------------

UNPARSABLE = {
    "malformed-json": b'{"query": "q", "documents": ["a"',
    "trailing-garbage": b'{"query": "q", "documents": ["a"]} x',
    "single-quotes": b"{'query': 'q', 'documents': ['a']}",
    "empty-body": b"",
    "whitespace-body": b"  \n ",
    "json-array": b'[{"query": "q", "documents": ["a"]}]',
    "empty-array": b"[]",
    "json-string": b'"query"',
    "json-number": b"42",
    "json-null": b"null",
    "nan-literal": b'{"query": "q", "documents": ["a"], "top_n": NaN}',
    "infinity-literal": b'{"query": "q", "documents": ["a"], "top_n": Infinity}',
    "minus-infinity": b'{"query": "q", "documents": ["a"], "top_n": -Infinity}',
    "nan-in-extra-key": b'{"query": "q", "documents": [{"text": "a", "w": NaN}]}',
    "invalid-utf8-in-string": b'{"query": "caf\xe9 \xff\xfe", "documents": ["a"]}',
    "invalid-utf8-body": b"\xff\xfe\x00{",
    "overlong-utf8": b'{"query": "\xc0\xaf", "documents": ["a"]}',
    "lone-high-surrogate": b'{"query": "\\ud800", "documents": ["a"]}',
    "lone-low-surrogate": b'{"query": "q", "documents": ["ok", "\\udc00 tail"]}',
    "surrogate-in-object": b'{"query": "q", "documents": [{"text": "a", "k": "\\ud83d"}]}',
    "deep-nesting": b'{"query": "q", "documents": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
}


@pytest.mark.parametrize("route", ALL_POST_ROUTES)
@pytest.mark.parametrize("body", list(UNPARSABLE.values()), ids=list(UNPARSABLE))
def test_bodies_that_are_not_a_strict_json_object_are_400(client, route, body):
    assert_error(post_raw(client, route, body), 400)


def test_a_valid_surrogate_pair_escape_is_accepted_and_echoed(client):
    response = post_raw(
        client,
        "/v1/rerank",
        b'{"query": "smile \\ud83d\\ude00", "documents": ["a \\ud83d\\ude00"]}',
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["document"] == {"text": "a \U0001f600"}


# --- well-formed JSON, invalid request --------------------------------------------------

INVALID_RERANK: dict[str, tuple[dict[str, Any], str | None]] = {
    "missing-query": ({"documents": ["a"]}, "query"),
    "missing-documents": ({"query": "q"}, "documents"),
    "empty-object": ({}, None),
    "query-number": ({"query": 3, "documents": ["a"]}, "query"),
    "query-list": ({"query": ["q"], "documents": ["a"]}, "query"),
    "documents-string": ({"query": "q", "documents": "a b c"}, "documents"),
    "documents-object": ({"query": "q", "documents": {"text": "a"}}, "documents"),
    "documents-number": ({"query": "q", "documents": 5}, "documents"),
    "document-number": ({"query": "q", "documents": ["a", 3.5]}, "documents[1]"),
    "document-bool": ({"query": "q", "documents": ["a", True]}, "documents[1]"),
    "document-list": ({"query": "q", "documents": ["a", ["b"]]}, "documents[1]"),
    "document-without-text": ({"query": "q", "documents": ["a", {"title": "b"}]}, "documents[1]"),
    "document-text-number": ({"query": "q", "documents": ["a", {"text": 7}]}, "documents[1]"),
    "document-null": ({"query": "q", "documents": ["a", None]}, "documents[1]"),
    "negative-top-n": ({**GOOD_RERANK, "top_n": -1}, "top_n"),
    "top-n-string": ({**GOOD_RERANK, "top_n": "3"}, "top_n"),
    "top-n-float": ({**GOOD_RERANK, "top_n": 2.5}, "top_n"),
    "top-n-bool": ({**GOOD_RERANK, "top_n": True}, "top_n"),
    "top-n-float-1e30": ({**GOOD_RERANK, "top_n": 1e30}, "top_n"),
    "negative-top-k": ({**GOOD_RERANK, "top_k": -5}, "top_k"),
    "model-number": ({**GOOD_RERANK, "model": 1}, "model"),
    "return-documents-string": ({**GOOD_RERANK, "return_documents": "no"}, "return_documents"),
    "use-activation-string": ({**GOOD_RERANK, "use_activation": "false"}, "use_activation"),
    "instruction-number": ({**GOOD_RERANK, "instruction": 1}, "instruction"),
    "truncate-string": ({**GOOD_RERANK, "truncate": "yes"}, "truncate"),
    "nulls-everywhere": (
        {
            "model": None,
            "query": None,
            "documents": None,
            "top_n": None,
            "return_documents": None,
            "use_activation": None,
            "instruction": None,
            "truncate": None,
        },
        None,
    ),
    "null-documents": ({"query": "q", "documents": None}, "documents"),
    "null-query": ({"query": None, "documents": ["a"]}, "query"),
}


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize(("body", "param"), list(INVALID_RERANK.values()), ids=list(INVALID_RERANK))
def test_invalid_rerank_requests_are_400_naming_the_field(client, route, body, param):
    error = assert_error(client.post(route, json=body), 400)
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
        assert param.split("[")[0] in error["message"] or "document" in error["message"], error
    else:
        assert error["param"] in (None, "query", "documents"), error


@pytest.mark.parametrize("digits", [31, 20, 400])
def test_huge_integer_top_n_literal_is_400(client, digits):
    body = b'{"query": "q", "documents": ["a"], "top_n": 1' + b"0" * (digits - 1) + b"}"
    assert_error(post_raw(client, "/v1/rerank", body), 400)


def test_optional_fields_sent_as_null_mean_their_default(client):
    body = {
        **GOOD_RERANK,
        "model": None,
        "top_n": None,
        "top_k": None,
        "use_activation": None,
        "raw_scores": None,
        "instruction": None,
        "truncate": None,
        "rank_fields": None,
    }
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_document_errors_name_the_document_index(client):
    body = {"query": "q", "documents": ["a", "b", "c", {"id": 1}]}
    error = assert_error(client.post("/v1/rerank", json=body), 400)
    assert error["param"].startswith("documents[3]"), error
    assert "3" in error["message"], error


@pytest.mark.parametrize(
    "body",
    [
        {"query": "q", "texts": "a"},
        {"query": "q", "texts": ["a", 1]},
        {"query": "q", "texts": ["a", {"text": "b"}]},
        {"texts": ["a"]},
        {"query": "q", "texts": ["a"], "raw_scores": "yes"},
        {"query": "q", "texts": ["a"], "truncation_direction": "Sideways"},
    ],
    ids=["texts-string", "texts-number", "texts-object", "no-query", "bad-bool", "bad-direction"],
)
def test_invalid_tei_requests_are_400(client, body):
    assert_error(client.post("/rerank", json=body), 400)


def test_unknown_route_is_404_error_json(client):
    assert_error(client.post("/v1/rerankz", json=GOOD_RERANK), 404)
    assert_error(client.get("/v3/nothing/here"), 404)


@pytest.mark.parametrize("route", ALL_POST_ROUTES)
def test_get_on_a_post_route_is_405_error_json(client, route):
    response = client.get(route)
    assert_error(response, 405)
    assert "POST" in response.headers.get("allow", "POST")


def _requests_total(client: httpx.Client) -> dict[tuple[str, str], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name != "rerankd_requests":
            continue
        for sample in family.samples:
            if sample.name == "rerankd_requests_total":
                key = (sample.labels["route"], sample.labels["status"])
                totals[key] = sample.value
    return totals


def test_the_server_stays_healthy_after_all_bad_requests(client):
    # runs after the error tests above (file order): nothing may have broken the server
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    response = client.post("/v1/rerank", json=GOOD_RERANK)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2
    server_errors = {k: v for k, v in _requests_total(client).items() if k[1].startswith("5")}
    assert not server_errors, server_errors


# --- service routes ----------------------------------------------------------------------


def test_health_is_200_ok(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_version_reports_the_package_version(client):
    response = client.get("/version")
    assert response.status_code == 200
    assert response.json() == {"version": rerankd.__version__}


def test_models_is_an_openai_list_with_aliases_and_max_length(client, qwen3_dir):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1
    model = body["data"][0]
    assert model["object"] == "model"
    assert isinstance(model["id"], str) and model["id"]
    assert isinstance(model["created"], int)
    assert isinstance(model["owned_by"], str)
    assert qwen3_dir.name in [model["id"], *model["aliases"]]
    assert model["max_model_len"] == 2048  # the fixture's context (max_position_embeddings)


def test_metrics_count_requests_by_route_and_status(client):
    before = _requests_total(client)
    assert client.post("/v1/rerank", json=GOOD_RERANK).status_code == 200
    assert client.post("/v1/rerank", json={"query": "q"}).status_code == 400
    assert client.post("/v1/score", json=GOOD_SCORE).status_code == 200
    after = _requests_total(client)
    for key, delta in (
        (("/v1/rerank", "200"), 1),
        (("/v1/rerank", "400"), 1),
        (("/v1/score", "200"), 1),
    ):
        assert after.get(key, 0) == before.get(key, 0) + delta, (key, before, after)


def test_metrics_are_prometheus_text_with_documents_and_tokens(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert "rerankd_requests" in names

    def counter(name: str) -> float:
        text = client.get("/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )

    docs_before, tokens_before = counter("rerankd_documents_total"), counter("rerankd_tokens_total")
    body = client.post("/v1/rerank", json=GOOD_RERANK).json()
    assert counter("rerankd_documents_total") == docs_before + 2
    assert counter("rerankd_tokens_total") == tokens_before + body["usage"]["prompt_tokens"]


def test_docs_page_and_openapi_describe_the_rerank_and_score_routes(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    spec = spec.json()
    schemas = spec["components"]["schemas"]

    def body_schema(path: str) -> list[dict[str, Any]]:
        operation = spec["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        refs = schema.get("anyOf", [schema])
        resolved = []
        for ref in refs:
            assert "$ref" in ref, ref
            resolved.append(schemas[ref["$ref"].rsplit("/", 1)[-1]])
        return resolved

    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        properties = [set(s.get("properties", {})) for s in body_schema(path)]
        assert any({"query", "documents", "top_n"} <= p for p in properties), (path, properties)
    assert any("texts" in p for p in [set(s.get("properties", {})) for s in body_schema("/rerank")])
    for path in ("/v1/score", "/score"):
        properties = [set(s.get("properties", {})) for s in body_schema(path)]
        assert any({"queries", "documents"} <= p for p in properties), (path, properties)
    for path in ("/health", "/v1/models", "/version", "/metrics"):
        assert "get" in spec["paths"][path], path


# --- API keys ----------------------------------------------------------------------------


# Keys from --api-key flags and RERANKD_API_KEY: tests/api/test_keys_and_names.py (in-process);
# a real server with a flag key and a key file: tests/hardening/test_security.py.


def test_a_server_without_keys_needs_no_authorization(client):
    assert client.post("/v1/rerank", json=GOOD_RERANK).status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/metrics").status_code == 200
    # a stray header is ignored, not rejected
    headers = {"Authorization": "Bearer whatever"}
    assert client.post("/v1/rerank", json=GOOD_RERANK, headers=headers).status_code == 200


# --- startup failures ----------------------------------------------------------------------


def _assert_one_paragraph_error(output: str, *fragments: str) -> str:
    assert "Traceback" not in output, output
    paragraphs = [p for p in re.split(r"\n\s*\n", output) if p.strip()]
    matching = [p for p in paragraphs if all(f in p for f in fragments)]
    assert matching, f"no paragraph holds all of {fragments}:\n{output}"
    paragraph = matching[0]
    assert len(paragraph.strip().splitlines()) <= 5, f"not one short paragraph:\n{paragraph}"
    return paragraph


RECIPE_NAMES = ("qwen3-reranker", "qwen3-seq-cls", "bge-gemma", "cross-encoder")


def test_a_hub_id_that_cannot_be_downloaded_offline_fails_with_one_paragraph(startup_failures):
    model, code, output = startup_failures.result("hub-id-offline")
    assert code not in (0, None), output
    paragraph = _assert_one_paragraph_error(output, model)
    assert "HF_HUB_OFFLINE" in paragraph or "offline" in paragraph.lower(), paragraph


def test_a_missing_local_path_fails_with_one_paragraph(startup_failures):
    model, code, output = startup_failures.result("missing-path")
    assert code not in (0, None), output
    _assert_one_paragraph_error(output, model)


@pytest.mark.parametrize(
    ("case", "detail"), [("masked-lm", "BertForMaskedLM"), ("three-labels", "num_labels")]
)
def test_a_checkpoint_no_recipe_fits_fails_listing_the_recipes(startup_failures, case, detail):
    _, code, output = startup_failures.result(case)
    assert code not in (0, None), output
    _assert_one_paragraph_error(output, detail, *RECIPE_NAMES)
