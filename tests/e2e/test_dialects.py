"""Dialect extras for long documents, on the served app over the tiny float32 Qwen3 fixture
(in this process: conftest's `client`) (DESIGN §1): TEI's `truncation_direction` and `truncate`, Cohere v2's `max_tokens_per_doc`,
Cohere v1's `max_chunks_per_doc`. Scores are checked against the model-card reference
(tests/reference.py) wherever the kept text can be written down, and a pair keeps its score
across routes.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
from transformers import AutoConfig, AutoTokenizer

from rerankd.recipes import build_recipe
from tests.recipes.helpers import chunk_texts
from tests.reference import qwen3_reference, qwen3_reference_ids

from .helpers import assert_close, assert_error, scores_by_index

TOL = 1e-4
QUERY = "What is the capital of France?"
SHORT = ["The capital of France is Paris.", "Horses and cows are both animals"]
#: words the fixture tokenizer keeps as one token each (with their leading space), so any cut
#: of a text made of them falls between words
WORDS = ["the", "river", "city", "music", "history", "people", "light", "house", "tree", "world"]


def words(count: int, offset: int = 0) -> list[str]:
    return [WORDS[(i + offset) % len(WORDS)] for i in range(count)]


@functools.cache
def tokenizer(qwen3_dir):
    return AutoTokenizer.from_pretrained(qwen3_dir)


def n_tokens(qwen3_dir, text: str) -> int:
    return len(tokenizer(qwen3_dir).encode(text, add_special_tokens=False))


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tei_raw(client: httpx.Client, texts: list[str], **extra: Any) -> dict[int, float]:
    items = post(client, "/rerank", {"query": QUERY, "texts": texts, "raw_scores": True, **extra})
    return {item["index"]: item["score"] for item in items}


def rerank_raw(client: httpx.Client, documents: list[str], route="/v1/rerank", **extra) -> dict:
    return post(
        client, route, {"query": QUERY, "documents": documents, "use_activation": False, **extra}
    )


def test_words_are_single_tokens(qwen3_dir):
    for word in WORDS:
        assert n_tokens(qwen3_dir, " " + word) == 1, word


# --- TEI truncation_direction ------------------------------------------------------------------


def test_left_truncation_keeps_the_end_of_the_document_like_the_reference(
    client, qwen3_dir, qwen3_max_len
):
    long_words = words(qwen3_max_len + 300)
    document = " ".join(long_words)
    # the tokens of the template and query; every kept word costs one token on top
    head = len(qwen3_reference_ids(qwen3_dir, QUERY, WORDS[0])) - 1
    kept = " ".join(long_words[-(qwen3_max_len - head) :])
    ((ids, expected),) = qwen3_reference(qwen3_dir, QUERY, [kept], max_length=qwen3_max_len)
    assert len(ids) == qwen3_max_len  # the kept end fills the context exactly
    left = tei_raw(client, [document, SHORT[0]], truncation_direction="Left")
    right = tei_raw(client, [document, SHORT[0]], truncation_direction="Right")
    assert_close(left[0], expected, TOL, "left = the reference on the document's end")
    assert abs(left[0] - right[0]) > 1e-3  # right keeps the start (test_rerank_api checks it)
    assert_close(left[1], right[1], 1e-6, "a text that fits is not affected")


def test_left_truncation_ignores_how_a_long_document_starts(client, qwen3_max_len):
    tail = words(qwen3_max_len + 100)
    first = " ".join(["history"] * 50 + tail)
    second = " ".join(["people", "light"] * 40 + tail)
    left = tei_raw(client, [first, second], truncation_direction="Left")
    right = tei_raw(client, [first, second])
    assert_close(left[0], left[1], 1e-5, "same end, same score")
    assert abs(right[0] - right[1]) > 1e-3  # right truncation keeps the different starts


def test_direction_is_case_insensitive_and_right_is_the_default(client, qwen3_max_len):
    document = " ".join(words(qwen3_max_len + 50))
    assert tei_raw(client, [document], truncation_direction="left") == tei_raw(
        client, [document], truncation_direction="Left"
    )
    assert tei_raw(client, [document], truncation_direction="right") == tei_raw(client, [document])


def test_the_same_pair_scores_the_same_on_tei_and_the_other_routes(client):
    tei = tei_raw(client, SHORT, truncation_direction="Left")
    v1 = scores_by_index(rerank_raw(client, SHORT))
    score = post(
        client, "/v1/score", {"queries": QUERY, "documents": SHORT, "use_activation": False}
    )
    for index in range(len(SHORT)):
        assert_close(tei[index], v1[index], 1e-6, "tei vs v1")
        assert_close(score["data"][index]["score"], v1[index], 1e-6, "score vs v1")


@pytest.mark.parametrize("direction", ["Right", "Left"])
def test_tei_truncate_false_is_400_naming_the_text(client, qwen3_max_len, direction):
    texts = [SHORT[0], " ".join(words(qwen3_max_len + 50))]
    response = client.post(
        "/rerank",
        json={"query": QUERY, "texts": texts, "truncate": False, "truncation_direction": direction},
    )
    error = assert_error(response, 400, contains=["document 1", str(qwen3_max_len)])
    assert error["param"] in ("texts[1]", "documents[1]"), error


# --- Cohere v2 max_tokens_per_doc --------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v2/rerank", "/v1/rerank"])
def test_max_tokens_per_doc_cuts_each_document_before_templating(client, qwen3_dir, route):
    answer = SHORT[0]
    documents = [answer + " " + " ".join(words(300)), "Horses."]
    limit = n_tokens(qwen3_dir, answer)
    assert n_tokens(qwen3_dir, documents[1]) < limit
    body = rerank_raw(client, documents, route, max_tokens_per_doc=limit)
    ref = qwen3_reference(qwen3_dir, QUERY, [answer, documents[1]])
    got = scores_by_index(body)
    assert_close(got[0], ref[0][1], TOL, "the document cut to its first tokens")
    assert_close(got[1], ref[1][1], TOL, "a shorter document is untouched")
    assert body["usage"]["truncated_documents"] == 1
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)
    plain = rerank_raw(client, documents, route)
    assert plain["usage"]["truncated_documents"] == 0
    assert abs(scores_by_index(plain)[0] - got[0]) > 1e-3


def test_max_tokens_per_doc_is_not_a_truncate_false_error(client, qwen3_dir):
    documents = [SHORT[0] + " " + " ".join(words(300))]
    body = rerank_raw(client, documents, max_tokens_per_doc=5, truncate=False)
    assert body["usage"]["truncated_documents"] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    # max_tokens_per_doc=0 is valid: vLLM sends it for "no cap" (next test)
    [("max_tokens_per_doc", v) for v in (-3, "5", 1.5, True)]
    + [("max_chunks_per_doc", v) for v in (0, -3, "5", 1.5, True)],
)
def test_invalid_limits_are_400_naming_the_field(client, field, value):
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": SHORT, field: value})
    assert_error(response, 400, param=field)


def test_max_tokens_per_doc_0_means_no_cap_as_vllm_sends_it(client):
    documents = [SHORT[0] + " " + " ".join(words(300))]
    plain = rerank_raw(client, documents)
    zero = rerank_raw(client, documents, max_tokens_per_doc=0)
    assert zero["usage"] == plain["usage"]
    assert zero["results"] == plain["results"]


# --- Cohere v1 max_chunks_per_doc --------------------------------------------------------------


@functools.cache
def server_chunk_texts(qwen3_dir, max_len: int, document: str) -> list[str]:
    """The chunks the server scores (its recipe, built here with the same limit)."""
    config = AutoConfig.from_pretrained(qwen3_dir)
    recipe = build_recipe(None, tokenizer(qwen3_dir), config, None)
    assert recipe.max_length == max_len
    return chunk_texts(recipe, QUERY, document)


def long_document(max_len: int) -> str:
    # the answer at the end of a document of about two and a half contexts
    return " ".join(words(max_len * 5 // 2)) + " " + SHORT[0]


def test_a_document_that_fits_keeps_its_score_with_chunks(client):
    plain = rerank_raw(client, SHORT)
    chunked = rerank_raw(client, SHORT, max_chunks_per_doc=10)
    assert scores_by_index(chunked) == pytest.approx(scores_by_index(plain), abs=1e-6)
    assert chunked["usage"] == plain["usage"]


def test_a_long_document_scores_as_its_best_chunk(client, qwen3_dir, qwen3_max_len):
    document = long_document(qwen3_max_len)
    texts = server_chunk_texts(qwen3_dir, qwen3_max_len, document)
    assert len(texts) >= 3 and texts[-1].endswith(SHORT[0])
    per_chunk = post(
        client, "/v1/score", {"queries": QUERY, "documents": texts, "use_activation": False}
    )
    chunk_scores = [d["score"] for d in per_chunk["data"]]
    body = rerank_raw(client, [document], max_chunks_per_doc=10)
    assert_close(body["results"][0]["relevance_score"], max(chunk_scores), TOL, "best chunk")
    assert body["usage"]["truncated_documents"] == 0
    assert body["usage"]["prompt_tokens"] == per_chunk["usage"]["prompt_tokens"]  # all chunks
    # the last chunk (with the answer) is what the reference scores for that text
    ref = qwen3_reference(qwen3_dir, QUERY, texts[-1:], max_length=qwen3_max_len)
    assert_close(chunk_scores[-1], ref[0][1], TOL, "last chunk vs reference")
    # activated: the best chunk's probability
    activated = post(
        client, "/v1/rerank", {"query": QUERY, "documents": [document], "max_chunks_per_doc": 10}
    )
    probabilities = post(client, "/v1/score", {"queries": QUERY, "documents": texts})["data"]
    best = max(d["score"] for d in probabilities)
    assert_close(activated["results"][0]["relevance_score"], best, TOL, "activated best chunk")


def test_chunks_beyond_the_maximum_are_dropped_and_counted(client, qwen3_dir, qwen3_max_len):
    document = long_document(qwen3_max_len)
    texts = server_chunk_texts(qwen3_dir, qwen3_max_len, document)[:2]
    per_chunk = post(
        client, "/v1/score", {"queries": QUERY, "documents": texts, "use_activation": False}
    )
    body = rerank_raw(client, [document, SHORT[1]], max_chunks_per_doc=2)
    got = scores_by_index(body)
    assert_close(got[0], max(d["score"] for d in per_chunk["data"]), TOL, "best kept chunk")
    assert body["usage"]["truncated_documents"] == 1
    short = post(client, "/v1/score", {"queries": QUERY, "documents": SHORT[1:]})
    assert body["usage"]["prompt_tokens"] == (
        per_chunk["usage"]["prompt_tokens"] + short["usage"]["prompt_tokens"]
    )


def test_too_few_chunks_with_truncate_false_is_400(client, qwen3_max_len):
    documents = [SHORT[0], long_document(qwen3_max_len)]
    response = client.post(
        "/v1/rerank",
        json={"query": QUERY, "documents": documents, "max_chunks_per_doc": 2, "truncate": False},
    )
    assert_error(response, 400, param="documents[1]", contains=["document 1", "max_chunks_per_doc"])
    enough = rerank_raw(client, documents, max_chunks_per_doc=3, truncate=False)
    assert enough["usage"]["truncated_documents"] == 0


def test_one_chunk_is_the_default_truncation(client, qwen3_max_len):
    documents = [long_document(qwen3_max_len), SHORT[1]]
    plain = rerank_raw(client, documents)
    one = rerank_raw(client, documents, max_chunks_per_doc=1)
    assert scores_by_index(one) == pytest.approx(scores_by_index(plain), abs=1e-6)
    assert one["usage"] == plain["usage"]


def test_empty_document_lists_with_every_option(client):
    assert tei_raw(client, [], truncation_direction="Left") == {}
    for extra in ({"max_chunks_per_doc": 3}, {"max_tokens_per_doc": 5}):
        body = rerank_raw(client, [], **extra)
        assert body["results"] == [] and body["usage"]["prompt_tokens"] == 0
