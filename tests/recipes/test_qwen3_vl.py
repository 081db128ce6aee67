"""Qwen3-VL-Reranker parity: rerankd's recipe and vision-language engine against the official
reranker code (transcribed in tests/reference_qwen3_vl.py) on transformers' Qwen3-VL classes,
on a tiny random-weight fixture with the real processor config (tests/fixtures/qwen3_vl.py).

Token ids must be identical; float32 raw scores within 1e-4, for text documents, image
documents, documents with both, an image query, in padded batches and under truncation.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from rerankd.engine.base import padded_chunks
from rerankd.engine.multimodal_engine import VisionLanguageEngine
from rerankd.errors import InvalidRequest
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes.qwen3_vl import EncodedVisionPair, Qwen3VLReranker
from rerankd.types import Batch
from tests.fixtures.qwen3_vl import png_data_uri, qwen3_vl_dir
from tests.reference_qwen3_vl import ReferenceQwen3VLReranker

TOLERANCE = 1e-4
QUERY = "what is the capital of France"
TEXTS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "Bananas are yellow and grow in bunches.",
    "",
]


def _image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    uri = png_data_uri(width, height, seed, mode)
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture(scope="module")
def model_dir():
    return qwen3_vl_dir()


@pytest.fixture(scope="module")
def recipe(model_dir):
    config, tokenizer = load_config_and_tokenizer(model_dir)
    return Qwen3VLReranker(tokenizer, config, None, model_dir=model_dir)


@pytest.fixture(scope="module")
def engine(model_dir, recipe):
    return VisionLanguageEngine(model_dir, recipe.head, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceQwen3VLReranker(model_dir)


@pytest.fixture(scope="module")
def images():
    # sizes that resize up (min pixels), keep, and change aspect; RGBA and grey converted
    return [_image(64, 96, 1), _image(50, 40, 2, "RGBA"), _image(33, 120, 3, "L")]


def _as_parts(doc: dict):
    """The reference's {"text", "image"} as the recipe's parts (order within a kind kept)."""
    if set(doc) == {"text"}:
        return doc["text"]
    images = doc.get("image") or []
    images = images if isinstance(images, list) else [images]
    parts = [("image", image) for image in images]
    if doc.get("text") is not None:
        parts.append(("text", doc["text"]))
    return tuple(parts)


def _compare(recipe, engine, reference, query: dict, documents: list[dict], instruction=None):
    queries = [_as_parts(query)] * len(documents)
    pairs = recipe.encode(queries, [_as_parts(d) for d in documents], instruction)
    for pair, document in zip(pairs, documents, strict=True):
        assert list(pair.input_ids) == reference.token_ids(query, document, instruction)
    got = engine.score(Batch(pairs))
    want = [raw for raw, _ in reference.process(query, documents, instruction)]
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert diff <= TOLERANCE, (got, want)
    return got


def test_text_documents_match_the_official_reranker(recipe, engine, reference):
    got = _compare(recipe, engine, reference, {"text": QUERY}, [{"text": t} for t in TEXTS])
    assert len(set(got)) == len(got)  # distinct documents, distinct scores


def test_an_instruction_replaces_the_default(recipe, engine, reference):
    docs = [{"text": t} for t in TEXTS[:2]]
    _compare(recipe, engine, reference, {"text": QUERY}, docs, "Find the city")


def test_image_documents_match_the_official_reranker(recipe, engine, reference, images):
    documents = [
        {"image": images[0]},
        {"image": images[1]},
        {"text": "a caption", "image": images[2]},
        {"text": TEXTS[0]},  # a text document in the same padded batch
        {"image": [images[0], images[2]], "text": "two pictures"},
    ]
    _compare(recipe, engine, reference, {"text": QUERY}, documents)


def test_an_image_query_matches_the_official_reranker(recipe, engine, reference, images):
    documents = [{"text": TEXTS[0]}, {"image": images[1]}]
    _compare(recipe, engine, reference, {"image": images[0]}, documents)
    _compare(recipe, engine, reference, {"image": images[0], "text": "this"}, documents)


def test_a_side_with_nothing_is_null(recipe, reference):
    pair = recipe.encode([QUERY], [()])[0]
    assert list(pair.input_ids) == reference.token_ids({"text": QUERY}, {})
    assert "<Document>:NULL<|im_end|>" in recipe.tokenizer.decode(pair.input_ids)


def test_the_template_joins_parts_as_the_official_code(recipe, images):
    pair = recipe.encode([QUERY], [(("text", "caption"), ("image", images[0]))])[0]
    text = recipe.tokenizer.decode(pair.input_ids)
    assert text.startswith("<|im_start|>system\nJudge whether the Document")
    assert (
        f"<Instruct>: Given a search query, retrieve relevant candidates that answer the query.<Query>:{QUERY}\n<Document>:<|vision_start|><|image_pad|>"
        in text
    )
    assert text.endswith("<|vision_end|>caption<|im_end|>\n<|im_start|>assistant\n")
    ((pixels, grid),) = pair.images
    assert isinstance(pair, EncodedVisionPair) and pixels.shape == (
        grid[0] * grid[1] * grid[2],
        1536,
    )
    assert list(pair.input_ids).count(recipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == (
        grid[0] * grid[1] * grid[2] // 4
    )


def test_truncation_keeps_special_tokens_and_the_prompt_end(model_dir, engine, images):
    config, tokenizer = load_config_and_tokenizer(model_dir)
    recipe = Qwen3VLReranker(tokenizer, config, 160, model_dir=model_dir)
    reference = ReferenceQwen3VLReranker(model_dir, max_length=160 - 5)
    long_text = " ".join(["the river runs by the old mountain city"] * 40)
    documents = [{"text": long_text}, {"text": long_text, "image": images[0]}]
    pairs = recipe.encode([QUERY] * 2, [_as_parts(d) for d in documents])
    assert all(len(p) <= 160 and p.truncated for p in pairs)
    got = engine.score(Batch(pairs))
    for pair, document, value in zip(pairs, documents, got, strict=True):
        assert list(pair.input_ids) == reference.token_ids({"text": QUERY}, document)
        ((want, _),) = reference.process({"text": QUERY}, [document])
        assert abs(value - want) <= TOLERANCE
    with pytest.raises(InvalidRequest, match="document 0"):
        recipe.encode([QUERY], [long_text], truncate=False)


def test_images_that_fill_the_limit_are_a_400_naming_the_document(model_dir, images):
    config, tokenizer = load_config_and_tokenizer(model_dir)
    recipe = Qwen3VLReranker(tokenizer, config, 50, model_dir=model_dir)
    many = tuple(("image", image) for image in images * 2)  # 49 special tokens with them
    with pytest.raises(InvalidRequest, match="images") as caught:
        recipe.encode([QUERY], [many])
    assert caught.value.param == "documents[0]"


def test_vision_markup_in_text_is_refused(recipe):
    with pytest.raises(InvalidRequest, match=r"documents\[1\]"):
        recipe.encode([QUERY] * 2, ["fine", "a <|image_pad|> smuggled"])


def test_an_extreme_aspect_ratio_is_a_400_naming_the_document(recipe):
    with pytest.raises(InvalidRequest, match=r"documents\[0\].*aspect ratio"):
        recipe.encode([QUERY], [(("image", _image(600, 2, 4)),)])
    query = (("image", _image(600, 2, 4)),)
    with pytest.raises(InvalidRequest, match="aspect ratio") as caught:
        recipe.encode([query] * 2, ["a", "b"])  # one query object: named `query`
    assert caught.value.param == "query"


def test_bfloat16_matches_the_reference_in_bfloat16(model_dir, recipe, images):
    """bf16 against the official code in bf16: within 2e-2 (measured ~6e-3; bf16 against the
    float32 reference is ~9e-2 off on these random weights)."""
    engine = VisionLanguageEngine(model_dir, recipe.head, torch.device("cpu"), torch.bfloat16)
    reference = ReferenceQwen3VLReranker(model_dir, dtype=torch.bfloat16)
    documents = [{"text": TEXTS[0]}, {"text": TEXTS[2]}, {"image": images[0]}]
    pairs = recipe.encode([QUERY] * 3, [_as_parts(d) for d in documents])
    got = engine.score(Batch(pairs))
    want = [raw for raw, _ in reference.process({"text": QUERY}, documents)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 2e-2


# --- served: detection, the engine choice, and the HTTP path end to end ---------------------


def test_detected_and_served_on_the_vision_language_engine(model_dir):
    from rerankd.errors import ModelLoadError
    from rerankd.recipes import detect_recipe
    from rerankd.runtime import build_engine, load_recipe
    from rerankd.settings import Settings

    settings = Settings(model=str(model_dir), dtype="float32")
    _, config, recipe = load_recipe(settings)
    assert (
        detect_recipe(config, model_dir) is Qwen3VLReranker and recipe.name == "qwen3-vl-reranker"
    )
    with pytest.raises(ModelLoadError, match="vision-language engine"):
        build_engine(
            "packed", model_dir, config, recipe, torch.device("cpu"), torch.float32, settings
        )


def test_a_request_scores_as_the_official_code(model_dir, reference):
    """Through the app (routes → service → image decoding → recipe → engine): a data: URI
    image document and an image query score as the official code scores the decoded PNGs."""
    from starlette.testclient import TestClient

    from rerankd.api import create_app
    from rerankd.runtime import build_service
    from rerankd.settings import Settings

    png, png2 = png_data_uri(64, 96, 1), png_data_uri(50, 40, 2, "RGBA")
    decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in (png, png2)]
    service = build_service(Settings(model=str(model_dir), dtype="float32"))
    with TestClient(create_app(service)) as client:
        body = {
            "query": QUERY,
            "documents": [TEXTS[0], {"image": png}, {"text": "a caption", "image": png2}],
            "use_activation": False,
        }
        got = _scores(client.post("/v1/rerank", json=body))
        image_query = {"query": {"content": [_image_part(png)]}, "documents": [TEXTS[1]]}
        got_image_query = _scores(
            client.post("/v1/rerank", json={**image_query, "use_activation": False})
        )
    want = reference.process(
        {"text": QUERY},
        [{"text": TEXTS[0]}, {"image": decoded[0]}, {"text": "a caption", "image": decoded[1]}],
    )
    assert max(abs(got[i] - raw) for i, (raw, _) in enumerate(want)) <= TOLERANCE
    ((raw, _),) = reference.process({"image": decoded[0]}, [{"text": TEXTS[1]}])
    assert abs(got_image_query[0] - raw) <= TOLERANCE


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _scores(response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {r["index"]: r["relevance_score"] for r in response.json()["results"]}


# --- the shared prefix ---------------------------------------------------------------------


def test_the_shared_prefix_runs_once_and_changes_no_score(model_dir, recipe, engine, images):
    """The engine shares the pairs' common prefix (with the query's image when every pair has
    the same one) and scores exactly as without sharing."""
    plain = VisionLanguageEngine(
        model_dir, recipe.head, torch.device("cpu"), torch.float32, share_prefix=False
    )
    documents = [TEXTS[0], (("image", images[0]),), (("image", images[1]), ("text", "c")), ""]
    image_query = (("image", images[2]), ("text", "q"))
    cases = {
        "text query": (recipe.encode([QUERY] * 4, documents), 0),
        "image query": (recipe.encode([image_query] * 4, documents), 1),
        # two requests' pairs in one batch: their images differ, the prefix stops before them
        "two image queries": (
            recipe.encode([image_query] * 2 + [(("image", images[0]),)] * 2, documents),
            0,
        ),
    }
    for name, (pairs, shared_images) in cases.items():
        prefix, images_in_prefix = engine.shared_prefix(pairs)
        assert prefix >= 40 and images_in_prefix == shared_images, name
        first = pairs[0].input_ids
        assert all(p.input_ids[:prefix] == first[:prefix] for p in pairs), name
        got, want = engine.score(Batch(pairs)), plain.score(Batch(pairs))
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5, name


def _counting_forwards(engine, monkeypatch) -> list[tuple[int, int]]:
    """(batch size, tokens) of every forward of the engine's base model, recorded."""
    calls: list[tuple[int, int]] = []
    forward = engine._base.forward

    def counting(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine._base, "forward", counting)
    return calls


@pytest.mark.parametrize("pairs_per_sub_batch", [2, 1])
@pytest.mark.parametrize("query_kind", ["text", "image"])
def test_a_request_s_prefix_runs_once_across_sub_batches_and_batches(
    model_dir, recipe, images, monkeypatch, query_kind, pairs_per_sub_batch
):
    """A request whose pairs span several padded sub-batches (a small --max-batch-tokens; of
    two pairs, or of one) and two scheduler batches runs its shared prefix (with the query's
    image) once: one batch-1 forward of the prefix, then one forward per sub-batch; scores as
    without sharing."""
    query = QUERY if query_kind == "text" else (("image", images[2]), ("text", "q"))
    documents = [TEXTS[0], (("image", images[0]),), TEXTS[1], (("image", images[1]),), TEXTS[2]]
    pairs = recipe.encode([query] * len(documents), documents)
    plain = VisionLanguageEngine(
        model_dir, recipe.head, torch.device("cpu"), torch.float32, share_prefix=False
    )
    want = plain.score(Batch(pairs))
    widest = max(len(p) for p in pairs)
    budget = widest * pairs_per_sub_batch
    engine = VisionLanguageEngine(
        model_dir, recipe.head, torch.device("cpu"), torch.float32, max_batch_tokens=budget
    )
    calls = _counting_forwards(engine, monkeypatch)
    prefix, _ = engine.shared_prefix(pairs)
    got = engine.score(Batch(pairs[:4])) + engine.score(Batch(pairs[4:]))  # two batches
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5
    prefix_runs = [c for c in calls if c == (1, prefix)]
    assert len(prefix_runs) == 1, calls
    sub_batches = len(list(padded_chunks([len(p) for p in pairs[:4]], budget)))
    assert sub_batches == 4 // pairs_per_sub_batch
    assert len(calls) == 1 + sub_batches + 1, calls  # the prefix, the sub-batches, batch 2
    # another request with the same query: a text prefix is the same tokens, so the kept
    # K/V serves it; the query's image is a new pixel array (another request's encode), so
    # its prefix runs again
    calls.clear()
    other = recipe.encode([query] * 2, documents[:2])
    engine.score(Batch(other))
    expected_prefix_runs = 0 if query_kind == "text" else 1
    assert sum(1 for c in calls if c == (1, prefix)) == expected_prefix_runs, calls


def test_the_pixel_budget_is_configurable(model_dir, engine):
    """--image-pixel-budget: images resized to at most that many pixels, as the official
    code's `max_pixels` does (parity with the reference at the same budget)."""
    from rerankd.runtime import load_recipe
    from rerankd.settings import Settings

    budget = 64 * 64
    recipe = load_recipe(Settings(model=str(model_dir), image_pixel_budget=budget))[2]
    reference = ReferenceQwen3VLReranker(model_dir, max_pixels=budget)
    image = _image(200, 160, 5)
    (pair,) = recipe.encode([QUERY], [(("image", image),)])
    assert pair.images[0][1] == (1, 2, 4)  # 200x160 -> 64x32 (smart_resize floors to fit)
    assert list(pair.input_ids) == reference.token_ids({"text": QUERY}, {"image": image})
    ((want, _),) = reference.process({"text": QUERY}, [{"image": image}])
    assert abs(engine.score(Batch([pair]))[0] - want) <= TOLERANCE
