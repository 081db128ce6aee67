"""End to end: POST /v1/score and /score, and every recipe family served over HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.reference import (
    bge_gemma_reference,
    cross_encoder_reference,
    qwen3_reference,
    sigmoid,
)

from .helpers import (
    SCORE_ID,
    assert_close,
    assert_error,
    model_info,
    scores_by_index,
)

TOL = 1e-4
QUERIES = ["What is the capital of France?", "北京是哪个国家的首都？", "pizza 🍕 recipes"]
DOCS = ["The capital of France is Paris.", "北京是中国的首都。", "Mix flour, water 💧 and yeast."]


def score(client: httpx.Client, body: dict[str, Any], route: str = "/v1/score") -> dict:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_score_shape(body: dict, n: int, served: str) -> None:
    assert body["object"] == "list"
    assert isinstance(body["created"], int) and not isinstance(body["created"], bool)
    assert abs(body["created"] - time.time()) < 600
    assert SCORE_ID.match(body["id"]), body["id"]
    assert body["model"] == served
    assert [d["index"] for d in body["data"]] == list(range(n))
    for item in body["data"]:
        assert item["object"] == "score"
        assert isinstance(item["score"], float)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def pair_reference(qwen3_dir, queries, documents, max_len) -> list[tuple[list, float]]:
    return [
        qwen3_reference(qwen3_dir, q, [d], max_length=max_len)[0]
        for q, d in zip(queries, documents, strict=True)
    ]


# --- /v1/score, /score -------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/score", "/score"])
def test_aligned_pairs_are_scored_pair_by_pair_in_input_order(
    client, qwen3_dir, qwen3_max_len, qwen3_model, route
):
    body = score(client, {"queries": QUERIES, "documents": DOCS}, route)
    assert_score_shape(body, 3, qwen3_model["id"])
    ref = pair_reference(qwen3_dir, QUERIES, DOCS, qwen3_max_len)
    for item, (_, raw) in zip(body["data"], ref, strict=True):
        assert_close(item["score"], sigmoid(raw), TOL)
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)


def test_one_query_is_scored_against_every_document(client, qwen3_dir, qwen3_max_len, qwen3_model):
    for queries in (QUERIES[0], [QUERIES[0]], [{"text": QUERIES[0]}]):
        body = score(client, {"queries": queries, "documents": DOCS})
        assert_score_shape(body, 3, qwen3_model["id"])
        ref = qwen3_reference(qwen3_dir, QUERIES[0], DOCS, max_length=qwen3_max_len)
        for item, (_, raw) in zip(body["data"], ref, strict=True):
            assert_close(item["score"], sigmoid(raw), TOL)


def test_string_against_string_is_one_pair(client, qwen3_dir, qwen3_max_len, qwen3_model):
    body = score(client, {"queries": QUERIES[1], "documents": DOCS[1]})
    assert_score_shape(body, 1, qwen3_model["id"])
    ((_, raw),) = qwen3_reference(qwen3_dir, QUERIES[1], [DOCS[1]], max_length=qwen3_max_len)
    assert_close(body["data"][0]["score"], sigmoid(raw), TOL)


def test_text_1_and_text_2_are_aliases_of_queries_and_documents(client):
    modern = score(client, {"queries": QUERIES, "documents": DOCS})
    legacy = score(client, {"text_1": QUERIES, "text_2": DOCS})
    single = score(client, {"text_1": QUERIES[0], "text_2": DOCS})
    fan_out = score(client, {"queries": QUERIES[0], "documents": DOCS})
    for a, b in zip(modern["data"], legacy["data"], strict=True):
        assert_close(a["score"], b["score"], 1e-6)
    for a, b in zip(single["data"], fan_out["data"], strict=True):
        assert_close(a["score"], b["score"], 1e-6)


def test_score_use_activation_false_returns_raw_scores(client, qwen3_dir, qwen3_max_len):
    body = score(client, {"queries": QUERIES, "documents": DOCS, "use_activation": False})
    ref = pair_reference(qwen3_dir, QUERIES, DOCS, qwen3_max_len)
    for item, (_, raw) in zip(body["data"], ref, strict=True):
        assert_close(item["score"], raw, TOL)


def test_score_instruction_field_changes_the_prompt(client, qwen3_dir, qwen3_max_len):
    instruction = "Find the passage in the same language as the query"
    body = score(client, {"queries": QUERIES, "documents": DOCS, "instruction": instruction})
    ref = [
        qwen3_reference(qwen3_dir, q, [d], instruction=instruction, max_length=qwen3_max_len)[0]
        for q, d in zip(QUERIES, DOCS, strict=True)
    ]
    for item, (_, raw) in zip(body["data"], ref, strict=True):
        assert_close(item["score"], sigmoid(raw), TOL)


@pytest.mark.parametrize(
    ("queries", "documents"),
    [(QUERIES[:2], DOCS), (QUERIES, DOCS[:2]), ([], DOCS), (QUERIES, [])],
    ids=["2-vs-3", "3-vs-2", "0-vs-3", "3-vs-0"],
)
def test_mismatched_pair_counts_are_400(client, queries, documents):
    response = client.post("/v1/score", json={"queries": queries, "documents": documents})
    assert_error(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        {"documents": DOCS},
        {"queries": QUERIES},
        {"queries": None, "documents": None},
        {"queries": 3, "documents": DOCS},
        {"queries": QUERIES[0], "documents": [DOCS[0], 7]},
        {"queries": QUERIES[0], "documents": [DOCS[0], {"title": "no text"}]},
        {"queries": QUERIES[0], "documents": DOCS, "use_activation": "no"},
    ],
    ids=[
        "no-queries",
        "no-documents",
        "nulls",
        "number-query",
        "number-doc",
        "object-no-text",
        "bad-bool",
    ],
)
def test_invalid_score_requests_are_400(client, body):
    assert_error(client.post("/v1/score", json=body), 400)


# --- other families ----------------------------------------------------------------------


FAMILY_QUERY = "where is the old stone bridge?"
FAMILY_DOCS = [
    "The old stone bridge crosses the river north of the city.",
    "Music and science meet in the garden.",
    "石桥在城市的北边 🌉",
    " ".join(["water light people history"] * 200),  # long: truncated
]


def test_gemma_server_matches_the_flagembedding_reference(family_servers, gemma_dir):
    c = family_servers["gemma"]
    info = model_info(c)
    assert info["max_model_len"] == 512  # FlagEmbedding's default L
    assert info["recipe"] == "bge-gemma"
    ref = bge_gemma_reference(gemma_dir, FAMILY_QUERY, FAMILY_DOCS, max_length=512)
    response = c.post("/v1/rerank", json={"query": FAMILY_QUERY, "documents": FAMILY_DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    for index, value in scores_by_index(body).items():
        assert_close(value, sigmoid(ref[index][1]), TOL, f"document {index}")
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)
    assert body["usage"]["truncated_documents"] == 1
    raw = c.post(
        "/v1/score",
        json={"queries": FAMILY_QUERY, "documents": FAMILY_DOCS, "use_activation": False},
    )
    assert raw.status_code == 200, raw.text
    for item, (_, expected) in zip(raw.json()["data"], ref, strict=True):
        assert_close(item["score"], expected, TOL)


def test_gemma_instruction_replaces_the_prompt(family_servers, gemma_dir):
    c = family_servers["gemma"]
    prompt = "Decide if passage B describes a place mentioned in query A. Answer 'Yes' or 'No'."
    response = c.post(
        "/v1/rerank",
        json={"query": FAMILY_QUERY, "documents": FAMILY_DOCS[:3], "instruction": prompt},
    )
    assert response.status_code == 200, response.text
    ref = bge_gemma_reference(gemma_dir, FAMILY_QUERY, FAMILY_DOCS[:3], prompt=prompt)
    default = bge_gemma_reference(gemma_dir, FAMILY_QUERY, FAMILY_DOCS[:3])
    assert any(abs(a[1] - b[1]) > 1e-3 for a, b in zip(ref, default, strict=True))
    for index, value in scores_by_index(response.json()).items():
        assert_close(value, sigmoid(ref[index][1]), TOL, f"document {index}")


@pytest.mark.parametrize("family", ["xlmr", "bert"])
def test_cross_encoder_server_matches_the_tokenizer_pair_reference(
    family_servers, family, xlmr_dir, bert_dir
):
    c = family_servers[family]
    model_dir = {"xlmr": xlmr_dir, "bert": bert_dir}[family]
    info = model_info(c)
    assert info["recipe"] == "cross-encoder"
    max_len = info["max_model_len"]
    assert 0 < max_len <= 512
    ref = cross_encoder_reference(model_dir, FAMILY_QUERY, FAMILY_DOCS, max_length=max_len)
    assert len(ref[3][0]) == max_len  # the long document really was cut
    response = c.post("/v1/rerank", json={"query": FAMILY_QUERY, "documents": FAMILY_DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    for index, value in scores_by_index(body).items():
        assert_close(value, sigmoid(ref[index][1]), TOL, f"document {index}")
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)
    assert body["usage"]["truncated_documents"] == 1
    raw = c.post(
        "/v1/rerank",
        json={"query": FAMILY_QUERY, "documents": FAMILY_DOCS, "use_activation": False},
    )
    assert raw.status_code == 200, raw.text
    for index, value in scores_by_index(raw.json()).items():
        assert_close(value, ref[index][1], TOL, f"raw document {index}")
    tei = c.post("/rerank", json={"query": FAMILY_QUERY, "texts": FAMILY_DOCS[:3]})
    assert tei.status_code == 200, tei.text
    for item in tei.json():
        assert_close(item["score"], sigmoid(ref[item["index"]][1]), TOL)
