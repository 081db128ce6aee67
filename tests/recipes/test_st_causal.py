"""Causal-LM rerankers in sentence-transformers' format against `CrossEncoder.predict` (6.x).

The fixture is saved by ST's own API (CrossEncoder + LogitScore, zerank-2 style: its own chat
template, a default prompt, the "Yes" logit alone). It is a Qwen3ForCausalLM, so before this
recipe it was served with the Qwen3-Reranker prompt: silently wrong scores. Checked here: the
ST files win detection, ids equal ST's (truncation with the template's closing tokens written
back), raw scores equal `predict` within 1e-4 in float32 on every engine.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.recipes import build_recipe, detect_recipe
from rerankd.recipes.qwen3 import Qwen3Reranker
from rerankd.recipes.st_causal import StCausalReranker, st_causal_info
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests import reference
from tests.fixtures.paths import fixture_dir

QUERY = "what is the capital of china?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。🎉",
    "",
    "Yes yes no",
    "word " * 300,  # longer than 128 tokens with the template: ST's truncation
]
#: None: ST's own limit (2048, the fixture's position embeddings); 128 cuts the long document
LENGTHS = (None, 128)
ENGINES = ("packed", "transformers")
#: None: the default prompt; "": no system message; else the request's prompt
INSTRUCTIONS = (None, "", "Find passages about geography")


def _dir() -> Path:
    return fixture_dir("st-causal")


@cache
def _model(max_len: int | None, engine: str = "packed", model_dir: str | None = None):
    settings = Settings(
        model=model_dir or str(_dir()),
        dtype="float32",
        max_model_len=max_len,
        device="cpu",
        engine=engine,
    )
    return load_model(settings, Metrics())


@cache
def _reference(max_len: int | None, instruction: str | None = None, model_dir: str | None = None):
    path = model_dir or str(_dir())
    return reference.st_causal_reference(path, QUERY, DOCUMENTS, instruction, max_length=max_len)


def _score(model, documents=DOCUMENTS, instruction=None, shared=False, **kwargs):
    pairs = model.recipe.encode([QUERY] * len(documents), documents, instruction, **kwargs)
    groups = [0] * len(pairs) if shared else None
    return pairs, model.scheduler.engine.score(Batch(pairs, groups))


def test_st_files_win_detection_over_the_architecture():
    config = AutoConfig.from_pretrained(_dir())
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert detect_recipe(config, _dir()) is StCausalReranker
    assert _model(None).recipe.name == "st-causal-lm"


def test_the_qwen3_prompt_would_score_it_wrong():
    """The bug this recipe fixes: the Qwen3-Reranker recipe gives other ids and scores."""
    tok = AutoTokenizer.from_pretrained(_dir())
    qwen3 = Qwen3Reranker(tok, AutoConfig.from_pretrained(_dir()))
    ours = _model(None).recipe.encode([QUERY], DOCUMENTS[:1])
    assert qwen3.encode([QUERY], DOCUMENTS[:1])[0].input_ids != ours[0].input_ids
    assert qwen3.head != _model(None).recipe.head


@pytest.mark.parametrize("max_len", LENGTHS)
@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_token_ids_equal_sentence_transformers(max_len, instruction):
    pairs, _ = _score(_model(max_len), instruction=instruction)
    assert [list(p.input_ids) for p in pairs] == [
        ids for ids, _ in _reference(max_len, instruction)
    ]
    assert [p.truncated for p in pairs] == [
        max_len == 128 and d == DOCUMENTS[-1] for d in DOCUMENTS
    ]


def test_truncation_writes_the_template_end_back():
    recipe = _model(128).recipe
    pair = recipe.encode([QUERY], DOCUMENTS[-1:])[0]
    closing = recipe.tokenizer.encode(
        "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    assert len(pair) == 128 and list(pair.input_ids[-len(closing) :]) == closing


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("max_len", LENGTHS)
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared-prefix"])
def test_float32_scores_match_sentence_transformers(engine, max_len, shared):
    model = _model(max_len, engine)
    assert model.scheduler.engine.name == engine
    _, scores = _score(model, shared=shared)
    expected = [raw for _, raw in _reference(max_len)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert max(expected) - min(expected) > 0.1, "fixture scores too flat to test ranking"


@pytest.mark.parametrize("instruction", INSTRUCTIONS[1:])
def test_instruction_is_the_prompt(instruction):
    _, scores = _score(_model(None), instruction=instruction)
    expected = [raw for _, raw in _reference(None, instruction)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert scores != pytest.approx([raw for _, raw in _reference(None)], abs=1e-3)


@pytest.fixture(scope="module")
def two_token_dir(tmp_path_factory) -> str:
    """The fixture with LogitScore(true="Yes", false="No"): log-odds instead of one logit."""
    path = tmp_path_factory.mktemp("st-two-token") / "model"
    shutil.copytree(_dir(), path)
    tok = AutoTokenizer.from_pretrained(path)
    score_config = path / "1_LogitScore" / "config.json"
    data = json.loads(score_config.read_text())
    data["false_token_id"] = tok.encode("No", add_special_tokens=False)[0]
    score_config.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("engine", ENGINES)
def test_true_minus_false_token_matches_sentence_transformers(two_token_dir, engine):
    model = _model(128, engine, two_token_dir)
    assert model.recipe.head.negative_token_id is not None
    _, scores = _score(model)
    expected = [raw for _, raw in _reference(128, None, two_token_dir)]
    assert scores == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_max_tokens_per_doc_above_every_document_changes_nothing(engine):
    """Truncation on tokens, once: a limit no document reaches changes no id nor score."""
    model = _model(128, engine)
    plain, scores = _score(model)
    capped, capped_scores = _score(model, max_document_tokens=100_000)
    assert [p.input_ids for p in capped] == [p.input_ids for p in plain]
    assert capped_scores == scores


def test_left_truncation_keeps_the_document_end_and_the_template():
    recipe = _model(128).recipe
    document = " ".join(f"w{i}" for i in range(200))
    (left,) = recipe.encode([QUERY], [document], side="left")
    assert len(left) <= 128 and left.truncated
    text = recipe.tokenizer.decode(list(left.input_ids))
    assert text.endswith(f"{document[-20:]}<|im_end|>\n<|im_start|>assistant\n")
    assert "<Query>: " + QUERY in text


def test_a_pipeline_it_cannot_reproduce_is_refused(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(_dir(), path)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "x.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Transformer → LogitScore"):
        detect_recipe(AutoConfig.from_pretrained(path), path)


def test_forcing_the_recipe_without_st_files_is_a_clear_error():
    path = fixture_dir("qwen3")
    assert st_causal_info(path) is None
    with pytest.raises(ModelLoadError, match="LogitScore"):
        build_recipe(
            "st-causal-lm",
            AutoTokenizer.from_pretrained(path),
            AutoConfig.from_pretrained(path),
            None,
            model_dir=path,
        )
