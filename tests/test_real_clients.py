"""Third-party clients, unmodified, against a live server: Cohere's SDK and LiteLLM.

Each test is skipped when its library is not installed (extra `clients`). Both must get
the same ranking and scores as the server's own /v1/rerank.
"""

from __future__ import annotations

import httpx
import pytest

QUERY = "What is the capital of France?"
DOCS = [
    "The capital of Brazil is Brasilia.",
    "The capital of France is Paris.",
    "Horses and cows are both animals",
    "Paris is known for the Eiffel Tower and the Louvre museum.",
]
#: the fixture is served under its directory path; its last part ("qwen3") is an alias,
#: which keeps slashes out of LiteLLM's "provider/model" name
ALIAS = "qwen3"


@pytest.fixture(scope="module")
def expected(qwen3_server) -> list[tuple[int, float]]:
    response = httpx.post(
        f"{qwen3_server}/v1/rerank",
        json={"model": ALIAS, "query": QUERY, "documents": DOCS, "top_n": 2},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return [(r["index"], r["relevance_score"]) for r in response.json()["results"]]


def assert_same_ranking(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_cohere_sdk_v2_rerank(qwen3_server, expected):
    cohere = pytest.importorskip("cohere", reason="pip install cohere (extra `clients`)")
    client = cohere.ClientV2(base_url=qwen3_server, api_key="x", timeout=60)
    response = client.rerank(model=ALIAS, query=QUERY, documents=DOCS, top_n=2)
    assert_same_ranking([(r.index, r.relevance_score) for r in response.results], expected)
    assert response.id.startswith("rerank-")


def test_cohere_sdk_v1_rerank(qwen3_server, expected):
    cohere = pytest.importorskip("cohere", reason="pip install cohere (extra `clients`)")
    client = cohere.Client(base_url=qwen3_server, api_key="x", timeout=60)
    response = client.rerank(model=ALIAS, query=QUERY, documents=DOCS, top_n=2)
    assert_same_ranking([(r.index, r.relevance_score) for r in response.results], expected)


@pytest.mark.filterwarnings("ignore:Item .*ReadOnly:UserWarning")  # LiteLLM's own types
def test_litellm_rerank_through_its_cohere_provider(qwen3_server, expected, monkeypatch):
    # LiteLLM fetches a price list from the internet on import unless told to use its copy
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm", reason="pip install litellm (extra `clients`)")
    litellm.telemetry = False
    response = litellm.rerank(
        model=f"cohere/{ALIAS}",
        query=QUERY,
        documents=DOCS,
        top_n=2,
        api_base=qwen3_server,
        api_key="x",
    )
    results = [(r["index"], r["relevance_score"]) for r in response.results]
    assert_same_ranking(results, expected)
