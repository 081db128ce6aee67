"""jina-reranker-m0 parity: rerankd's recipe and vision-language engine against the
checkpoint's own `compute_score` (transcribed in tests/reference_jina_m0.py) on transformers'
Qwen2-VL classes, on a tiny random-weight fixture with the real processor config
(tests/fixtures/jina_m0.py).

Token ids must be identical; float32 raw scores (logit − 2.65) within 1e-4, for text
documents, image documents, an image query, in padded batches (ours padded on the right,
the reference's on the left, as the official code pads) and under truncation.
"""

from __future__ import annotations

import base64
import io
import sys

import pytest
import torch
from PIL import Image

from rerankd.engine.multimodal_engine import VisionLanguageEngine
from rerankd.errors import InvalidRequest
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes.jina_m0 import SCORE_TOKEN_ID, JinaM0Reranker
from rerankd.recipes.media import DecodedImage
from rerankd.types import Batch
from tests.fixtures.jina_m0 import jina_m0_dir
from tests.fixtures.qwen3_vl import png_data_uri
from tests.reference_jina_m0 import ReferenceJinaM0, sigmoid

TOLERANCE = 1e-4
QUERY = "what is the capital of France"
TEXTS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "Bananas are yellow and grow in bunches.",
    "",
]
# sizes that resize up (min pixels), keep, change aspect; RGBA and grey converted
URIS = [png_data_uri(64, 96, 1), png_data_uri(50, 40, 2, "RGBA"), png_data_uri(33, 120, 3, "L")]


def _decoded(uri: str) -> DecodedImage:
    return DecodedImage(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def _image_doc(uri: str) -> tuple:
    return (("image", _decoded(uri)),)


@pytest.fixture(scope="module")
def model_dir():
    return jina_m0_dir()


@pytest.fixture(scope="module")
def recipe(model_dir):
    config, tokenizer = load_config_and_tokenizer(model_dir)
    return JinaM0Reranker(tokenizer, config, None, model_dir=model_dir)


@pytest.fixture(scope="module")
def engine(model_dir, recipe):
    return VisionLanguageEngine(
        model_dir, recipe.head, torch.device("cpu"), torch.float32, score_offset=-2.65
    )


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceJinaM0(model_dir)


def _diff(got, want) -> float:
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


# --- the prompt ----------------------------------------------------------------------------


def test_the_prompt_is_the_official_layout(recipe, reference):
    (pair,) = recipe.encode([QUERY], [TEXTS[0]])
    assert pair.input_ids[-1] == SCORE_TOKEN_ID
    text = recipe.tokenizer.decode(pair.input_ids[:-1])
    assert text == f"**Document**:\n{TEXTS[0]}\n**Query**:\n{QUERY}"
    assert list(pair.input_ids) == reference.token_ids((QUERY, TEXTS[0]))
    (empty,) = recipe.encode([QUERY], [""])
    assert list(empty.input_ids) == reference.token_ids((QUERY, ""))


def test_an_image_document_is_its_placeholder_expanded(recipe, reference):
    (pair,) = recipe.encode([QUERY], [_image_doc(URIS[0])])
    assert list(pair.input_ids) == reference.token_ids((QUERY, URIS[0]), doc_type="image")
    ((pixels, grid),) = pair.images
    assert pixels.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    text = recipe.tokenizer.decode(pair.input_ids[:-1])
    pads = "<|image_pad|>" * (grid[0] * grid[1] * grid[2] // 4)
    assert text == f"**Document**:\n<|vision_start|>{pads}<|vision_end|>\n**Query**:\n{QUERY}"


def test_an_image_query_with_an_image_document_orders_images_as_the_prompt(recipe, reference):
    query = _image_doc(URIS[0])
    (pair,) = recipe.encode([query], [_image_doc(URIS[1])])
    ids = reference.token_ids((URIS[0], URIS[1]), query_type="image", doc_type="image")
    assert list(pair.input_ids) == ids
    (_, doc_grid), (_, query_grid) = pair.images  # the document's image first
    assert doc_grid == recipe.process_image(_decoded(URIS[1]).image)[1]
    assert query_grid == recipe.process_image(_decoded(URIS[0]).image)[1]


def test_text_and_image_in_one_document_is_placeholders_then_text(recipe):
    """Not in the official code (one kind per side): images first, then the texts."""
    (pair,) = recipe.encode([QUERY], [(("text", "a caption"), ("image", _decoded(URIS[0])))])
    text = recipe.tokenizer.decode(pair.input_ids[:-1])
    assert text.startswith("**Document**:\n<|vision_start|><|image_pad|>")
    assert text.endswith(f"<|vision_end|>a caption\n**Query**:\n{QUERY}")


def test_vision_markup_in_text_is_refused(recipe):
    with pytest.raises(InvalidRequest, match=r"documents\[1\]"):
        recipe.encode([QUERY] * 2, ["fine", "a <|image_pad|> smuggled"])


# --- parity ----------------------------------------------------------------------------------


def test_text_documents_match_the_official_code(recipe, engine, reference):
    pairs = recipe.encode([QUERY] * len(TEXTS), TEXTS)
    got = engine.score(Batch(pairs))
    want = reference.compute_score([(QUERY, d) for d in TEXTS])
    assert _diff(got, want) <= TOLERANCE, (got, want)
    assert len(set(got)) == len(got)
    # the activation is the official compute_score value
    assert abs(recipe.activate(got[0]) - sigmoid(want[0])) <= TOLERANCE


def test_image_documents_match_the_official_code(recipe, engine, reference):
    documents = [_image_doc(u) for u in URIS] + [TEXTS[0]]  # a text one in the same batch
    got = engine.score(Batch(recipe.encode([QUERY] * 4, documents)))
    want = reference.compute_score([(QUERY, u) for u in URIS], doc_type="image")
    want += reference.compute_score([(QUERY, TEXTS[0])])
    assert _diff(got, want) <= TOLERANCE, (got, want)


def test_an_image_query_matches_the_official_code(recipe, engine, reference):
    query = _image_doc(URIS[0])
    got = engine.score(Batch(recipe.encode([query] * 2, TEXTS[:2])))
    want = reference.compute_score([(URIS[0], d) for d in TEXTS[:2]], query_type="image")
    assert _diff(got, want) <= TOLERANCE, (got, want)
    got = engine.score(Batch(recipe.encode([query] * 2, [_image_doc(u) for u in URIS[1:]])))
    want = reference.compute_score(
        [(URIS[0], u) for u in URIS[1:]], query_type="image", doc_type="image"
    )
    assert _diff(got, want) <= TOLERANCE, (got, want)


def test_a_long_document_is_cut_as_the_official_code_cuts_it(model_dir, engine):
    config, tokenizer = load_config_and_tokenizer(model_dir)
    recipe = JinaM0Reranker(tokenizer, config, 1024, model_dir=model_dir)
    reference = ReferenceJinaM0(model_dir)
    long_text = " ".join(["the river runs by the old mountain city"] * 80)
    (pair,) = recipe.encode([QUERY], [long_text])
    assert pair.truncated and len(pair) <= 1024
    assert list(pair.input_ids) == reference.token_ids((QUERY, long_text), max_length=1024)
    (want,) = reference.compute_score([(QUERY, long_text)], max_length=1024)
    assert abs(engine.score(Batch([pair]))[0] - want) <= TOLERANCE
    with pytest.raises(InvalidRequest, match="document 0") as caught:
        recipe.encode([QUERY], [long_text], truncate=False)
    assert caught.value.param == "documents[0]"
    with pytest.raises(InvalidRequest, match="query") as caught:  # never cut into the query
        recipe.encode([long_text], [long_text])
    assert caught.value.param == "query"


def test_a_shared_prefix_after_an_image_batch_changes_no_score(model_dir, recipe, engine):
    """Documents that start alike share their prefix (the query comes last, so only then);
    an image batch before must not leave its M-RoPE offsets to the next batch (it did:
    transformers keeps them for generation, and the shared path's cached call read them)."""
    plain = VisionLanguageEngine(
        model_dir,
        recipe.head,
        torch.device("cpu"),
        torch.float32,
        share_prefix=False,
        score_offset=-2.65,
    )
    common = "The annual report of the regional water authority for the year states that "
    documents = [common + "rainfall was low.", common + "the river flooded.", common + "x"]
    pairs = recipe.encode([QUERY] * 3, documents)
    assert engine.shared_prefix(pairs)[0] >= 16
    want = plain.score(Batch(pairs))
    engine.score(Batch(recipe.encode([QUERY] * 2, [_image_doc(u) for u in URIS[:2]])))
    assert _diff(engine.score(Batch(pairs)), want) <= 1e-5


def test_bfloat16_stays_near_the_official_code_in_bfloat16(model_dir, recipe):
    """bf16 against the official code in bf16: within 1e-1 (measured 4.5e-2 on these
    random weights: the official code runs its score MLP in bf16, this engine in float32;
    bf16 against the float32 reference is 8.8e-2 off)."""
    engine = VisionLanguageEngine(
        model_dir, recipe.head, torch.device("cpu"), torch.bfloat16, score_offset=-2.65
    )
    reference = ReferenceJinaM0(model_dir, dtype=torch.bfloat16)
    documents = [TEXTS[0], TEXTS[2], _image_doc(URIS[0])]
    got = engine.score(Batch(recipe.encode([QUERY] * 3, documents)))
    want = reference.compute_score([(QUERY, d) for d in TEXTS[0:3:2]])
    want += reference.compute_score([(QUERY, URIS[0])], doc_type="image")
    assert _diff(got, want) <= 1e-1, (got, want)


# --- served: detection, the engine choice, and the HTTP path end to end ---------------------


def test_detected_from_the_config_without_running_checkpoint_code(model_dir):
    """The fixture's modeling.py raises on import: loading never runs it."""
    from rerankd.errors import ModelLoadError
    from rerankd.recipes import detect_recipe
    from rerankd.runtime import build_engine, load_recipe
    from rerankd.settings import Settings

    settings = Settings(model=str(model_dir), dtype="float32")
    _, config, recipe = load_recipe(settings)
    assert config.architectures == ["JinaVLForRanking"] and config.model_type == "qwen2_vl"
    assert detect_recipe(config, model_dir) is JinaM0Reranker
    assert recipe.name == "jina-reranker-m0"
    with pytest.raises(ModelLoadError, match="vision-language engine"):
        build_engine(
            "packed", model_dir, config, recipe, torch.device("cpu"), torch.float32, settings
        )
    engine = build_engine(
        "auto", model_dir, config, recipe, torch.device("cpu"), torch.float32, settings
    )
    assert isinstance(engine, VisionLanguageEngine)
    assert not any(name.startswith("transformers_modules") for name in sys.modules)


@pytest.fixture(scope="module")
def client(model_dir):
    from starlette.testclient import TestClient

    from rerankd.api import create_app
    from rerankd.runtime import build_service
    from rerankd.settings import Settings

    service = build_service(Settings(model=str(model_dir), dtype="float32"))
    with TestClient(create_app(service)) as client:
        yield client


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _scores(response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {r["index"]: r["relevance_score"] for r in response.json()["results"]}


def test_a_rerank_request_scores_as_the_official_code(client, reference):
    """Through the app (routes → service → image decoding → recipe → engine): Jina's m0 form,
    plain strings and {"text"} objects in one list, and the activated score."""
    body = {
        "query": QUERY,
        "documents": [TEXTS[0], {"image": URIS[0]}, {"text": TEXTS[1]}, {"image": URIS[1]}],
    }
    raw = _scores(client.post("/v1/rerank", json={**body, "use_activation": False}))
    activated = _scores(client.post("/v1/rerank", json=body))
    want_text = reference.compute_score([(QUERY, TEXTS[0]), (QUERY, TEXTS[1])])
    want_image = reference.compute_score([(QUERY, URIS[0]), (QUERY, URIS[1])], doc_type="image")
    want = [want_text[0], want_image[0], want_text[1], want_image[1]]
    assert _diff([raw[i] for i in range(4)], want) <= TOLERANCE
    assert _diff([activated[i] for i in range(4)], [sigmoid(w) for w in want]) <= TOLERANCE


def test_vllm_content_forms_and_an_image_query(client, reference):
    """vLLM's multimodal documents (each part one document) and an image query, on
    /v1/rerank and /v1/score; a pair scores the same on both routes."""
    documents = {"content": [_image_part(URIS[2]), {"type": "text", "text": TEXTS[2]}]}
    got = _scores(
        client.post(
            "/v1/rerank", json={"query": QUERY, "documents": documents, "use_activation": False}
        )
    )
    (want_image,) = reference.compute_score([(QUERY, URIS[2])], doc_type="image")
    (want_text,) = reference.compute_score([(QUERY, TEXTS[2])])
    assert _diff([got[0], got[1]], [want_image, want_text]) <= TOLERANCE
    image_query = {"content": [_image_part(URIS[0])]}
    response = client.post(
        "/v1/score",
        json={"queries": image_query, "documents": [TEXTS[0]], "use_activation": False},
    )
    assert response.status_code == 200, response.text
    score = response.json()["data"][0]["score"]
    (want,) = reference.compute_score([(URIS[0], TEXTS[0])], query_type="image")
    assert abs(score - want) <= TOLERANCE


def test_a_bad_image_is_a_400_naming_the_document(client):
    truncated = "data:image/png;base64," + base64.b64encode(
        base64.b64decode(URIS[0].split(",", 1)[1])[:60]
    ).decode("ascii")
    for documents, param in [
        (["fine", {"image": truncated}], "documents[1]"),
        (["fine", "fine", {"image": "data:image/png;base64,!!!!"}], "documents[2]"),
        ([{"image": "https://example.com/a.png"}], "documents[0]"),  # remote media is off
    ]:
        response = client.post("/v1/rerank", json={"query": QUERY, "documents": documents})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"].startswith(param), error
