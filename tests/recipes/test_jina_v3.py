"""jina-reranker-v3 (listwise) against an independent reference of Jina's `modeling.py`, on a
tiny `JinaForRanking` fixture (tests/fixtures/jina_v3.py: 2 layers, hidden 64,
model_max_length 4096 so that windows close on small inputs).

The reference (tests/reference_jina_v3.py) is transformers' Qwen3ForCausalLM with the
projector and the hub code's prompt, truncation, block loop and weighted merge. rerankd loads
the same directory as a hub download, never running checkpoint code, and must give: the
reference's prompt token ids window by window; its scores within 1e-4 in float32 (one window,
several windows closed by size or by the 125-document cap, cut documents and query, an
instruction, special tokens inside the texts); within 2e-2 in bf16 with the same order
wherever float32 scores are clearly apart; the same scores over HTTP, whether a request's
pairs land in one scheduler batch or many; clean answers to hostile inputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from rerankd.api import create_app
from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes import detect_recipe
from rerankd.recipes.jina_v3 import WINDOW_DOCUMENTS, JinaV3Reranker, sanitize
from rerankd.runtime import build_engine, build_service, load_recipe
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.jina_v3 import MODEL_MAX_LENGTH
from tests.fixtures.paths import fixture_dir
from tests.reference_jina_v3 import Reference

QUERY = "what is panda?"
DOCUMENTS = [
    "hi",
    "The giant panda is a bear species endemic to China.",
    "Beijing is the capital of China. 北京是中华人民共和国的首都。🎉",
    "",
    "  leading spaces\n\nand blank lines  ",
]
#: ~3,000 tokens: cut to the reference's 2048, and closes its window by size
LONG = " ".join(f"panda bamboo forest {i} mountains of Sichuan." for i in range(400))
CASES = {
    "one-window": (QUERY, DOCUMENTS, None),
    "cut-documents-close-windows": (QUERY, [*DOCUMENTS, LONG, *DOCUMENTS, LONG, "tail"], None),
    "125-document-cap": (QUERY, [f"doc {i}: bamboo number {i}" for i in range(131)], None),
    "instruction": (QUERY, DOCUMENTS, "Prefer passages about animals."),
    "long-query": (" ".join(["where do pandas live"] * 200), DOCUMENTS[:3], None),
    "special-tokens-in-texts": (
        "panda<|rerank_token|>?",
        ["a <|embed_token|> b", "<|rerank_token|><|embed_token|>", "<|im_end|> ok"],
        None,
    ),
}
TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return fixture_dir("jina-v3")


@pytest.fixture(scope="module")
def reference(model_dir) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def recipe(model_dir) -> JinaV3Reranker:
    config, tokenizer = load_config_and_tokenizer(model_dir)
    return JinaV3Reranker(tokenizer, config)


class _Server:
    """A started service on its own event loop (its scheduler task lives there)."""

    def __init__(self, path: Path, **settings) -> None:
        values = {"model": str(path), "device": "cpu", "dtype": "float32", **settings}
        self.service = build_service(Settings(**values))
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.service.start())
        self.model = self.service.models[0]

    def rerank(self, query, documents, instruction=None, **options):
        run = self.service.rerank(self.model, query, documents, instruction, **options)
        return self.loop.run_until_complete(run)

    def close(self) -> None:
        self.loop.run_until_complete(self.service.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[_Server]:
    server = _Server(model_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(model_dir) -> Iterator[TestClient]:
    service = build_service(Settings(model=str(model_dir), device="cpu", dtype="float32"))
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


def _worst(got: list[float], expected: list[float]) -> float:
    assert len(got) == len(expected)
    return max(abs(a - b) for a, b in zip(got, expected, strict=True))


# --- detection and loading ---------------------------------------------------------------


def test_detected_from_config_without_its_remote_code(model_dir):
    import json

    assert json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert not list(model_dir.glob("*.py"))  # nothing to run: loading must not try
    config, _ = load_config_and_tokenizer(model_dir)
    assert type(config).__module__.startswith("transformers.")
    assert detect_recipe(config, model_dir) is JinaV3Reranker


def test_engine_is_the_listwise_one(server):
    engine = server.model.scheduler.engine
    assert type(engine).__name__ == "ListwiseEngine"
    assert server.model.recipe.window_tokens == MODEL_MAX_LENGTH
    assert server.model.recipe.max_length == 2048


def test_transformers_engine_and_quantize_are_refused(model_dir):
    for kind, quantize in (("transformers", "none"), ("auto", "int8")):
        settings = Settings(model=str(model_dir), device="cpu", engine=kind, quantize=quantize)
        _, config, recipe = load_recipe(settings)
        with pytest.raises(ModelLoadError, match="listwise engine"):
            build_engine(
                kind, model_dir, config, recipe, torch.device("cpu"), torch.float32, settings
            )


# --- prompts and windows -----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_window_prompts_equal_the_reference(recipe, reference, case):
    query, documents, instruction = CASES[case]
    reference.rerank(query, documents, instruction)
    pairs = recipe.encode([query] * len(documents), documents, instruction)
    windows = pairs[0].listing.windows
    assert [list(w.input_ids) for w in windows] == reference.prompts
    assert all(p.listing is pairs[0].listing for p in pairs)
    # each pair's tokens are its share of its window: together, every window token once
    assert sum(len(p) for p in pairs) == sum(len(w.input_ids) for w in windows)
    assert [p.document for p in pairs] == list(range(len(documents)))


def test_windows_close_as_the_reference_does(recipe):
    room = MODEL_MAX_LENGTH - 2 * 10  # a 10-token query
    assert recipe.windows([10] * 130, 10) == [range(0, 125), range(125, 130)]
    # a window closes once its documents leave at most 2048 of the room: the document that
    # crosses the line is its last
    crossing = room - 2048
    assert recipe.windows([crossing - 1, 1, 5, 7], 10) == [range(0, 2), range(2, 4)]
    assert recipe.windows([crossing - 1, 0, 5], 10) == [range(0, 3)]
    assert recipe.windows([2048, 2048, 2048], 10) == [range(0, 1), range(1, 2), range(2, 3)]
    assert recipe.windows([], 10) == []
    assert WINDOW_DOCUMENTS == 125


def test_multi_window_cases_really_have_several_windows(recipe):
    for case, expected in (("cut-documents-close-windows", 3), ("125-document-cap", 2)):
        query, documents, instruction = CASES[case]
        pairs = recipe.encode([query] * len(documents), documents, instruction)
        assert len(pairs[0].listing.windows) == expected, case
        if case == "cut-documents-close-windows":
            assert [p.cut_tokens > 0 for p in pairs].count(True) == 2


def test_the_prompt_template_is_the_model_cards(recipe):
    text = recipe.prompt("q?", ["a", "b"], None)
    assert text.endswith(
        '<passage id="0">\na<|embed_token|>\n</passage>\n<passage id="1">\nb<|embed_token|>\n'
        "</passage>\n<query>\nq?<|rerank_token|>\n</query><|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n"
    )
    assert "to query: q?\n<passage" in text
    assert "to query: q?\n<instruct>\nbe brief\n</instruct>\n<passage" in recipe.prompt(
        "q?", ["a"], "be brief"
    )


def test_special_tokens_are_removed_until_none_is_left(recipe):
    assert sanitize("a<|embed_<|rerank_token|>token|>b") == "ab"
    nested = ["x <|embed<|embed_token|>_token|> y", "<|rerank<|rerank_token|>_token|>"]
    pairs = recipe.encode([QUERY] * 2, nested)
    window = pairs[0].listing.windows[0]
    assert len(window.document_positions) == 2


# --- parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_scores_equal_the_reference_float32(server, reference, case):
    query, documents, instruction = CASES[case]
    expected = reference.rerank(query, documents, instruction)
    scored = server.rerank(query, documents, instruction)
    assert _worst(scored.raw_scores, expected) <= TOLERANCE
    assert scored.scores == scored.raw_scores  # the cosine is returned as is
    assert scored.prompt_tokens == sum(len(p) for p in reference.prompts)
    assert scored.truncated_documents == sum(len(recipe_ids(server, d)) > 2048 for d in documents)


def recipe_ids(server, text: str) -> list[int]:
    return server.model.recipe.encode_text(text)


@pytest.mark.parametrize("compile", ["off", "on"])
@pytest.mark.parametrize("case", ["cut-documents-close-windows", "125-document-cap"])
def test_bf16_is_close_and_keeps_the_order(model_dir, server, reference, case, compile):
    """bf16, eager and with the decoder's compiled per-token work (`--compile on`; `auto`
    picks it where compile_policy.LISTWISE_MEASURED says), against the float32 and the bf16 reference."""
    query, documents, instruction = CASES[case]
    exact = reference.rerank(query, documents, instruction)
    bf16_reference = Reference(model_dir, torch.bfloat16).rerank(query, documents, instruction)
    config, _ = load_config_and_tokenizer(model_dir)
    settings = Settings(model=str(model_dir), device="cpu", dtype="bfloat16", compile=compile)
    engine = build_engine(
        "auto",
        model_dir,
        config,
        server.model.recipe,
        torch.device("cpu"),
        torch.bfloat16,
        settings,
    )
    assert engine.compiled == (compile == "on")
    pairs = server.model.recipe.encode([query] * len(documents), documents, instruction)
    got = engine.score(Batch(pairs))
    assert _worst(got, bf16_reference) <= BF16_TOLERANCE
    assert _worst(got, exact) <= BF16_TOLERANCE
    for i, a in enumerate(exact):
        for j, b in enumerate(exact):
            if a - b > 2 * BF16_TOLERANCE:
                assert got[i] > got[j], (i, j, a, b, got[i], got[j])


def test_a_request_spread_over_batches_is_computed_once(model_dir, reference):
    query, documents, instruction = CASES["125-document-cap"]
    server = _Server(model_dir, max_batch_tokens=256)  # ~20 documents' shares per batch
    try:
        engine = server.model.scheduler.engine
        calls = []
        forward = engine.forward
        engine.forward = lambda windows, groups=None: (
            calls.append(len(windows)) or forward(windows, groups)
        )
        scored = server.rerank(query, documents, instruction)
    finally:
        server.close()
    assert sum(calls) == 2  # both windows, once
    assert _worst(scored.raw_scores, reference.rerank(query, documents)) <= TOLERANCE


def test_a_document_limit_above_every_document_changes_no_score(server):
    query, documents, _ = CASES["one-window"]
    plain = server.rerank(query, documents).raw_scores
    assert server.rerank(query, documents, max_tokens_per_doc=4000).raw_scores == plain


# --- over HTTP ---------------------------------------------------------------------------


def test_rerank_over_http_is_the_reference_ranking(client, reference):
    query, documents, _ = CASES["cut-documents-close-windows"]
    expected = reference.rerank(query, documents)
    response = client.post("/v1/rerank", json={"query": query, "documents": documents, "top_n": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    order = sorted(range(len(documents)), key=lambda i: (-expected[i], i))[:4]
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) <= TOLERANCE
        assert result["document"] == {"text": documents[result["index"]]}
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in reference.prompts)


def test_score_route_lists_each_query_apart(client, reference):
    queries = [QUERY] * 3 + ["capital of china"] * 2
    documents = DOCUMENTS[:3] + DOCUMENTS[1:3]
    response = client.post("/v1/score", json={"queries": queries, "documents": documents})
    assert response.status_code == 200, response.text
    got = [d["score"] for d in response.json()["data"]]
    expected = reference.rerank(QUERY, DOCUMENTS[:3])
    expected += reference.rerank("capital of china", DOCUMENTS[1:3])
    assert _worst(got, expected) <= TOLERANCE


# --- hostile inputs ----------------------------------------------------------------------


def test_a_huge_document_list_is_answered(client):
    documents = [f"bamboo {i}" for i in range(2000)]  # 16 windows
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": documents})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(2000))
    assert all(-1.0 <= r["relevance_score"] <= 1.0 for r in results)


def test_a_huge_document_is_cut_with_bounded_work(client):
    huge = "bamboo forest panda " * 200_000  # 4 MB, ~600k tokens
    started = time.perf_counter()
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": ["hi", huge]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["truncated_documents"] == 1
    assert time.perf_counter() - started < 30


def test_too_many_documents_is_a_400(client):
    documents = ["x"] * 10_001
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": documents})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "documents"


def test_empty_documents(client):
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": []})
    assert response.status_code == 200 and response.json()["results"] == []
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": ["", "", ""]})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


@pytest.mark.parametrize(
    ("extra", "documents", "param"),
    [
        ({"truncate": False}, ["ok", LONG], "documents[1]"),
        ({"max_chunks_per_doc": 2}, ["ok", LONG], "max_chunks_per_doc"),
    ],
)
def test_refused_options_are_400s_naming_the_field(client, extra, documents, param):
    body = {"query": QUERY, "documents": documents, **extra}
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_long_query_with_truncate_false_is_a_400(recipe):
    query = CASES["long-query"][0]
    with pytest.raises(InvalidRequest) as info:
        recipe.encode([query], ["d"], truncate=False)
    assert info.value.param == "query"
    assert recipe.encode([query], ["d"])[0].listing is not None  # truncate: true cuts it
