"""POST /v1/rerank, /rerank, /v2/rerank (and TEI's /rerank) on the served app.

Every request goes to the app `rerankd serve` builds over the tiny float32 Qwen3-Reranker
fixture, in this process (conftest's `client`: the real engine, no server process); scores are
checked against the model-card reference in tests/reference.py.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from tests.reference import qwen3_reference, sigmoid
from tests.words import WORDS

from .helpers import (
    RERANK_ID,
    assert_close,
    assert_error,
    assert_sorted,
    model_info,
    scores_by_index,
)

TOL = 1e-4
RERANK_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")

QUERY = "What is the capital of France?"
DOCS = [
    "The capital of Brazil is Brasilia.",
    "The capital of France is Paris.",
    "Horses and cows are both animals",
    "Paris is known for the Eiffel Tower and the Louvre museum.",
]
CJK_EMOJI_DOCS = [
    "北京是中国的首都。",
    "東京は日本の首都です",
    "I love pizza 🍕🎉 and pasta!",
    "서울은 한국의 수도입니다 🇰🇷",
    "mixed 中文 and English with emoji 😀",
]


def reference(qwen3_dir, query, documents, max_len, instruction=None) -> list[tuple[list, float]]:
    return qwen3_reference(qwen3_dir, query, documents, instruction=instruction, max_length=max_len)


def rerank(client: httpx.Client, body: dict[str, Any], route: str = "/v1/rerank") -> dict:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_matches_reference(body: dict, ref: list[tuple[list, float]], activated: bool = True):
    got = scores_by_index(body)
    assert sorted(got) == list(range(len(ref)))
    for index, (_, raw) in enumerate(ref):
        expected = sigmoid(raw) if activated else raw
        assert_close(got[index], expected, TOL, f"document {index}")


# --- dialects ----------------------------------------------------------------------------


def test_vllm_rerank_example_sorts_by_reference_score_and_cuts_to_top_n(
    client, qwen3_dir, qwen3_max_len
):
    body = rerank(client, {"query": QUERY, "documents": DOCS, "top_n": 2})
    ref = reference(qwen3_dir, QUERY, DOCS, qwen3_max_len)
    assert len(body["results"]) == 2
    assert_sorted(body["results"])
    # the two best by the reference (up to float noise between near-equal documents)
    kept = {r["index"] for r in body["results"]}
    worst_kept = min(ref[i][1] for i in kept)
    assert all(ref[i][1] <= worst_kept + TOL for i in range(len(DOCS)) if i not in kept)
    for result in body["results"]:
        assert result["document"] == {"text": DOCS[result["index"]]}
        assert_close(result["relevance_score"], sigmoid(ref[result["index"]][1]), TOL)
        assert 0.0 <= result["relevance_score"] <= 1.0
    assert RERANK_ID.match(body["id"]), body["id"]
    assert body["model"] == model_info(client)["id"]
    assert "meta" not in body


def test_cohere_v2_rerank_adds_meta_with_api_version_2_and_billed_units(client):
    request = {
        "model": "qwen3",
        "query": "What is the capital of the United States?",
        "top_n": 3,
        "max_tokens_per_doc": 4096,  # Cohere v2: longer than these documents, so no cut
        "documents": [
            "Carson City is the capital city of the American state of Nevada.",
            "Washington, D.C. is the capital of the United States.",
            "Capital punishment has existed in the United States since before it was a country.",
            "North Dakota is a state in the United States. Its capital is Bismarck.",
        ],
    }
    body = rerank(client, request, "/v2/rerank")
    assert body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    assert len(body["results"]) == 3
    assert_sorted(body["results"])
    assert RERANK_ID.match(body["id"])
    # the same request on the v1 route: same scores, no meta
    v1 = rerank(client, request, "/v1/rerank")
    assert "meta" not in v1
    assert [r["index"] for r in v1["results"]] == [r["index"] for r in body["results"]]
    for a, b in zip(v1["results"], body["results"], strict=True):
        assert_close(a["relevance_score"], b["relevance_score"], 1e-6)


def test_jina_text_objects_are_echoed_exactly(client, qwen3_dir, qwen3_max_len):
    documents = [{"text": d} for d in DOCS]
    body = rerank(client, {"model": "qwen3", "query": QUERY, "documents": documents, "top_n": 3})
    assert len(body["results"]) == 3
    for result in body["results"]:
        assert result["document"] == documents[result["index"]]
    ref = reference(qwen3_dir, QUERY, DOCS, qwen3_max_len)
    for result in body["results"]:
        assert_close(result["relevance_score"], sigmoid(ref[result["index"]][1]), TOL)


def test_mixed_string_and_object_documents_echo_as_sent_and_score_like_strings(client):
    documents = [
        DOCS[0],
        {"text": DOCS[1], "id": "doc-7", "meta": {"tags": ["a", "b"], "n": 3, "ok": True}},
        DOCS[2],
        {"title": "t", "text": DOCS[3], "score_hint": None, "nested": [{"x": 1.5}]},
    ]
    sent = copy.deepcopy(documents)
    body = rerank(client, {"query": QUERY, "documents": documents})
    assert len(body["results"]) == 4
    for result in body["results"]:
        original = sent[result["index"]]
        expected = {"text": original} if isinstance(original, str) else original
        assert result["document"] == expected
    as_strings = scores_by_index(rerank(client, {"query": QUERY, "documents": DOCS}))
    for index, score in scores_by_index(body).items():
        assert_close(score, as_strings[index], 1e-6, f"document {index}")


def test_return_documents_false_omits_document_key(client):
    body = rerank(client, {"query": QUERY, "documents": DOCS, "return_documents": False})
    assert len(body["results"]) == len(DOCS)
    for result in body["results"]:
        assert "document" not in result
        assert set(result) == {"index", "relevance_score"}


@pytest.mark.parametrize("top_n", ["omitted", None, 0, 4, 5, 1000])
def test_top_n_omitted_null_zero_or_at_least_the_document_count_returns_all(client, top_n):
    request: dict[str, Any] = {"query": QUERY, "documents": DOCS}
    if top_n != "omitted":
        request["top_n"] = top_n
    body = rerank(client, request)
    assert sorted(r["index"] for r in body["results"]) == list(range(len(DOCS)))
    assert_sorted(body["results"])


@pytest.mark.parametrize("field", ["top_n", "top_k"])
@pytest.mark.parametrize("n", [1, 3])
def test_top_n_and_voyage_top_k_return_the_best_n(client, field, n):
    full = rerank(client, {"query": QUERY, "documents": DOCS})["results"]
    body = rerank(client, {"query": QUERY, "documents": DOCS, field: n})
    assert [r["index"] for r in body["results"]] == [r["index"] for r in full[:n]]


def test_use_activation_false_returns_the_reference_raw_scores(client, qwen3_dir, qwen3_max_len):
    documents = DOCS + CJK_EMOJI_DOCS
    body = rerank(client, {"query": QUERY, "documents": documents, "use_activation": False})
    ref = reference(qwen3_dir, QUERY, documents, qwen3_max_len)
    assert_matches_reference(body, ref, activated=False)
    raw = [r["relevance_score"] for r in body["results"]]
    assert any(not 0.0 <= score <= 1.0 for score in raw), raw  # logits, not probabilities
    assert_sorted(body["results"])
    activated = scores_by_index(rerank(client, {"query": QUERY, "documents": documents}))
    for index, score in scores_by_index(body).items():
        assert_close(activated[index], sigmoid(score), 1e-6)


def test_raw_scores_true_means_use_activation_false(client):
    raw = scores_by_index(
        rerank(client, {"query": QUERY, "documents": DOCS, "use_activation": False})
    )
    tei_style = scores_by_index(
        rerank(client, {"query": QUERY, "documents": DOCS, "raw_scores": True})
    )
    assert tei_style.keys() == raw.keys()
    for index in raw:
        assert_close(tei_style[index], raw[index], 1e-6)
    assert any(not 0.0 <= score <= 1.0 for score in tei_style.values())


def test_results_are_sorted_descending_with_ties_broken_by_lower_index(client):
    # indices 0, 2 and 4 are the same document, so they tie with each other
    documents = [DOCS[2], DOCS[1], DOCS[2], DOCS[0], DOCS[2]]
    results = rerank(client, {"query": QUERY, "documents": documents})["results"]
    assert_sorted(results)
    scores = scores_by_index({"results": results})
    assert_close(scores[0], scores[2], 1e-6)
    assert_close(scores[0], scores[4], 1e-6)
    positions = {r["index"]: pos for pos, r in enumerate(results)}
    if scores[0] == scores[2] == scores[4]:
        assert positions[0] < positions[2] < positions[4]
    # all identical: the order is the input order
    same = rerank(client, {"query": QUERY, "documents": [DOCS[3]] * 6})["results"]
    assert_sorted(same)
    if len({r["relevance_score"] for r in same}) == 1:
        assert [r["index"] for r in same] == list(range(6))


def test_usage_prompt_tokens_is_the_sum_of_reference_token_lengths(
    client, qwen3_dir, qwen3_max_len
):
    documents = DOCS + CJK_EMOJI_DOCS
    body = rerank(client, {"query": QUERY, "documents": documents})
    ref = reference(qwen3_dir, QUERY, documents, qwen3_max_len)
    expected = sum(len(ids) for ids, _ in ref)
    assert body["usage"]["prompt_tokens"] == expected
    assert body["usage"]["total_tokens"] == expected
    assert body["usage"].get("truncated_documents", 0) == 0


@pytest.mark.parametrize("route", RERANK_ROUTES)
def test_empty_document_list_returns_200_and_no_results(client, route):
    body = rerank(client, {"query": QUERY, "documents": []}, route)
    assert body["results"] == []
    assert body["usage"]["prompt_tokens"] == 0
    assert RERANK_ID.match(body["id"])


def test_tei_empty_texts_returns_an_empty_array(client):
    response = client.post("/rerank", json={"query": QUERY, "texts": []})
    assert response.status_code == 200, response.text
    assert response.json() == []


def test_unknown_extra_fields_are_ignored(client):
    plain = scores_by_index(rerank(client, {"query": QUERY, "documents": DOCS}))
    extra = rerank(
        client,
        {
            "query": QUERY,
            "documents": DOCS,
            "user": "someone",
            "priority": 3,
            "encoding_format": "float",
            "truncation": {"side": "right"},
        },
    )
    for index, score in scores_by_index(extra).items():
        assert_close(score, plain[index], 1e-6)


def test_cohere_rank_fields_build_key_value_lines_in_the_given_order(
    client, qwen3_dir, qwen3_max_len
):
    documents = [
        {"title": "France", "body": "Paris is the capital.", "id": 1},
        {"title": "Brazil", "body": "Brasilia is the capital.", "id": 2},
    ]
    body = rerank(
        client, {"query": QUERY, "documents": documents, "rank_fields": ["title", "body"]}
    )
    texts = [f"title: {d['title']}\nbody: {d['body']}" for d in documents]
    assert_matches_reference(body, reference(qwen3_dir, QUERY, texts, qwen3_max_len))
    for result in body["results"]:
        assert result["document"] == documents[result["index"]]


# --- score parity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "documents"),
    [
        (QUERY, DOCS),
        ("中国的首都是哪里？", CJK_EMOJI_DOCS),
        ("best pizza 🍕 in town?", CJK_EMOJI_DOCS + DOCS[:2]),
        ("a", ["b", "", " ", "a\nb\tc", "x" * 300]),
    ],
    ids=["english", "cjk-query", "emoji-query", "edge-strings"],
)
def test_scores_match_the_reference_activated_and_raw(
    client, qwen3_dir, qwen3_max_len, query, documents
):
    ref = reference(qwen3_dir, query, documents, qwen3_max_len)
    activated = rerank(client, {"query": query, "documents": documents})
    raw = rerank(client, {"query": query, "documents": documents, "use_activation": False})
    assert_matches_reference(activated, ref, activated=True)
    assert_matches_reference(raw, ref, activated=False)
    assert activated["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)


def test_the_same_pair_scores_the_same_through_every_route(client, qwen3_dir, qwen3_max_len):
    query, documents = "北京 capital 🏯?", [CJK_EMOJI_DOCS[0], DOCS[1], CJK_EMOJI_DOCS[2]]
    ref = [sigmoid(raw) for _, raw in reference(qwen3_dir, query, documents, qwen3_max_len)]
    by_route: dict[str, list[float]] = {}
    for route in RERANK_ROUTES:
        scores = scores_by_index(rerank(client, {"query": query, "documents": documents}, route))
        by_route[route] = [scores[i] for i in range(len(documents))]
    for route in ("/v1/score", "/score"):
        response = client.post(route, json={"queries": query, "documents": documents})
        assert response.status_code == 200, response.text
        by_route[route] = [d["score"] for d in response.json()["data"]]
    tei = client.post("/rerank", json={"query": query, "texts": documents})
    assert tei.status_code == 200, tei.text
    tei_scores = {item["index"]: item["score"] for item in tei.json()}
    by_route["tei"] = [tei_scores[i] for i in range(len(documents))]
    for route, scores in by_route.items():
        for index, score in enumerate(scores):
            assert_close(score, ref[index], TOL, f"{route} document {index}")
            assert_close(score, by_route["/v1/rerank"][index], 1e-6, f"{route} vs /v1/rerank")


# --- TEI dialect -------------------------------------------------------------------------


def test_tei_rerank_returns_a_bare_sorted_array(client, qwen3_dir, qwen3_max_len):
    texts = ["Deep Learning is not...", "Deep learning is...", DOCS[1]]
    response = client.post("/rerank", json={"query": "What is Deep Learning?", "texts": texts})
    assert response.status_code == 200, response.text
    items = response.json()
    assert isinstance(items, list)
    assert sorted(item["index"] for item in items) == [0, 1, 2]
    for item in items:
        assert set(item) == {"index", "score"}
    assert_sorted(items, key="score")
    ref = reference(qwen3_dir, "What is Deep Learning?", texts, qwen3_max_len)
    for item in items:
        assert_close(item["score"], sigmoid(ref[item["index"]][1]), TOL)


def test_tei_raw_scores_and_return_text(client, qwen3_dir, qwen3_max_len):
    texts = ["Deep Learning is not...", "Deep learning is...", "深度学习 🤖"]
    response = client.post(
        "/rerank",
        json={
            "query": "What is Deep Learning?",
            "texts": texts,
            "raw_scores": True,
            "return_text": True,
            "truncate": True,
            "truncation_direction": "Right",
        },
    )
    assert response.status_code == 200, response.text
    items = response.json()
    ref = reference(qwen3_dir, "What is Deep Learning?", texts, qwen3_max_len)
    for item in items:
        assert set(item) == {"index", "score", "text"}
        assert item["text"] == texts[item["index"]]
        assert_close(item["score"], ref[item["index"]][1], TOL)
    assert_sorted(items, key="score")


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_texts_on_the_v1_and_v2_routes_is_not_answered_in_tei_shape(client, route):
    """TEI's dialect lives on POST /rerank only (DESIGN §1): a vLLM or Cohere client that
    sends `texts` must get its own response shape or a 400, never TEI's bare array."""
    response = client.post(route, json={"query": QUERY, "texts": DOCS[:2]})
    body = response.json()
    assert not isinstance(body, list), f"{route} answered in TEI's shape: {body}"
    if response.status_code == 200:
        assert "results" in body
    else:
        assert_error(response, 400)


# --- instructions (Qwen3) ----------------------------------------------------------------

INSTRUCTION = "Given a question about geography, find passages naming the capital city"
INSTR_QUERY = "capital of France"
INSTR_DOCS = [DOCS[1], DOCS[0], CJK_EMOJI_DOCS[0]]


@pytest.mark.parametrize("style", ["instruction-field", "inline-instruct-query", "regolo-tags"])
def test_every_instruction_style_gives_the_official_prompt(client, qwen3_dir, qwen3_max_len, style):
    if style == "instruction-field":
        request = {"query": INSTR_QUERY, "documents": INSTR_DOCS, "instruction": INSTRUCTION}
    elif style == "inline-instruct-query":
        request = {
            "query": f"Instruct: {INSTRUCTION}\nQuery: {INSTR_QUERY}",
            "documents": INSTR_DOCS,
        }
    else:
        request = {
            "query": f"<Instruct>: {INSTRUCTION}\n<Query>: {INSTR_QUERY}",
            "documents": [f"<Document>: {d}" for d in INSTR_DOCS],
        }
    body = rerank(client, request)
    ref = reference(qwen3_dir, INSTR_QUERY, INSTR_DOCS, qwen3_max_len, instruction=INSTRUCTION)
    assert_matches_reference(body, ref)
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)
    for result in body["results"]:  # echoed as sent, tag included
        assert result["document"] == {"text": request["documents"][result["index"]]}


def test_instruction_styles_also_apply_on_the_score_route(client, qwen3_dir, qwen3_max_len):
    response = client.post(
        "/v1/score",
        json={
            "queries": f"<Instruct>: {INSTRUCTION}\n<Query>: {INSTR_QUERY}",
            "documents": [f"<Document>: {d}" for d in INSTR_DOCS],
        },
    )
    assert response.status_code == 200, response.text
    ref = reference(qwen3_dir, INSTR_QUERY, INSTR_DOCS, qwen3_max_len, instruction=INSTRUCTION)
    for item, (_, raw) in zip(response.json()["data"], ref, strict=True):
        assert_close(item["score"], sigmoid(raw), TOL)


def test_default_instruction_is_used_when_none_is_given(client, qwen3_dir, qwen3_max_len):
    body = rerank(client, {"query": INSTR_QUERY, "documents": INSTR_DOCS})
    default_ref = reference(qwen3_dir, INSTR_QUERY, INSTR_DOCS, qwen3_max_len, instruction=None)
    assert_matches_reference(body, default_ref)
    # and an instruction really changes the prompt (the two references differ)
    other_ref = reference(
        qwen3_dir, INSTR_QUERY, INSTR_DOCS, qwen3_max_len, instruction=INSTRUCTION
    )
    assert any(abs(a[1] - b[1]) > 1e-3 for a, b in zip(default_ref, other_ref, strict=True))


# --- model names -------------------------------------------------------------------------


def test_model_may_be_omitted_or_named_by_served_name_or_any_alias(client, qwen3_dir):
    info = model_info(client)
    served = info["id"]
    names = [None, served, qwen3_dir.name, str(qwen3_dir), *info["aliases"]]
    expected = None
    for name in names:
        request: dict[str, Any] = {"query": QUERY, "documents": DOCS[:2]}
        if name is not None:
            request["model"] = name
        body = rerank(client, request)
        assert body["model"] == served, name
        scores = scores_by_index(body)
        if expected is None:
            expected = scores
        for index, score in scores.items():
            assert_close(score, expected[index], 1e-6, str(name))
    assert qwen3_dir.name in [served, *info["aliases"]]


@pytest.mark.parametrize("route", [*RERANK_ROUTES, "/v1/score", "/score"])
def test_unknown_model_is_404_with_error_json(client, route):
    if "score" in route:
        request = {"model": "BAAI/bge-reranker-base", "queries": QUERY, "documents": DOCS}
    else:
        request = {"model": "BAAI/bge-reranker-base", "query": QUERY, "documents": DOCS}
    response = client.post(route, json=request)
    assert_error(response, 404, param="model", contains=["BAAI/bge-reranker-base"])


def test_tei_unknown_model_is_404(client):
    response = client.post("/rerank", json={"model": "nope", "query": QUERY, "texts": DOCS})
    assert_error(response, 404, param="model")


# --served-model-name: tests/api/test_keys_and_names.py (in-process, the real engine)


# --- long inputs -------------------------------------------------------------------------


def long_text(words: int = 4000) -> str:
    vocab = WORDS[:12]  # the plain English words
    return " ".join(f"{vocab[i % len(vocab)]}{'s' if i % 7 == 0 else ''}" for i in range(words))


def test_a_long_document_is_truncated_by_default_like_the_reference(
    client, qwen3_dir, qwen3_max_len
):
    documents = [DOCS[0], DOCS[1], long_text()]
    full = qwen3_reference(qwen3_dir, QUERY, documents[2:], max_length=10**6)[0][0]
    assert len(full) > qwen3_max_len + 1000  # really over the limit
    body = rerank(client, {"query": QUERY, "documents": documents, "use_activation": False})
    ref = reference(qwen3_dir, QUERY, documents, qwen3_max_len)
    assert len(ref[2][0]) == qwen3_max_len
    assert_matches_reference(body, ref, activated=False)
    assert body["usage"]["truncated_documents"] == 1
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids, _ in ref)
    explicit = rerank(client, {"query": QUERY, "documents": documents, "truncate": True})
    assert explicit["usage"]["truncated_documents"] == 1


@pytest.mark.parametrize("route", [*RERANK_ROUTES, "/v1/score"])
def test_truncate_false_rejects_a_long_document_naming_its_index(client, route):
    documents = [DOCS[0], DOCS[1], long_text()]
    key = "queries" if "score" in route else "query"
    response = client.post(route, json={key: QUERY, "documents": documents, "truncate": False})
    assert_error(response, 400, param="documents[2]", contains=["document 2"])


def test_tei_truncate_false_rejects_a_long_text(client):
    response = client.post(
        "/rerank", json={"query": QUERY, "texts": [DOCS[0], long_text()], "truncate": False}
    )
    error = assert_error(response, 400, contains=["1"])
    assert error["param"] in ("texts[1]", "documents[1]"), error


def test_truncate_false_accepts_documents_that_fit(client):
    body = rerank(client, {"query": QUERY, "documents": DOCS, "truncate": False})
    assert len(body["results"]) == len(DOCS)


@pytest.mark.parametrize("truncate", [None, True, False])
def test_a_query_longer_than_the_limit_is_400(client, truncate):
    request: dict[str, Any] = {"query": long_text(), "documents": DOCS[:2]}
    if truncate is not None:
        request["truncate"] = truncate
    response = client.post("/v1/rerank", json=request)
    error = assert_error(response, 400)
    assert error["param"] in ("query", "queries"), error
