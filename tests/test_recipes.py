"""Recipe behaviour that is not plain parity: client instruction styles, limits, detection."""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, AutoTokenizer

from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.recipes import RECIPES, build_recipe, detect_recipe
from rerankd.recipes.qwen3 import DEFAULT_INSTRUCTION, split_inline_instruction, strip_document_tag
from tests import reference
from tests.fixtures.paths import fixture_dir


@cache
def recipe(name: str, max_len: int | None = None):
    path = fixture_dir(name)
    return build_recipe(
        None, AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path), max_len
    )


@pytest.mark.parametrize(
    ("query", "instruction", "bare"),
    [
        ("Instruct: Find cities\nQuery: capital of china", "Find cities", "capital of china"),
        ("Instruct: Find cities\nQuery:capital of china", "Find cities", "capital of china"),
        ("<Instruct>: Find cities\n<Query>: capital of china", "Find cities", "capital of china"),
        ("Instruct: multi\nline\nQuery: q", "multi\nline", "q"),
        ("plain query", None, "plain query"),
        ("Query: no instruction", None, "Query: no instruction"),
    ],
)
def test_inline_instruction_is_split(query, instruction, bare):
    assert split_inline_instruction(query) == (instruction, bare)


def test_document_tag_is_stripped_once():
    assert strip_document_tag("<Document>: text") == "text"
    assert strip_document_tag("<Document>: <Document>: x") == "<Document>: x"
    assert strip_document_tag("text") == "text"


def test_qwen3_three_instruction_styles_give_the_official_prompt():
    r = recipe("qwen3")
    official = reference.qwen3_reference_ids(
        fixture_dir("qwen3"), "capital of china", "Beijing.", "Find cities"
    )
    styles = [
        (["capital of china"], ["Beijing."], "Find cities"),
        (["Instruct: Find cities\nQuery: capital of china"], ["Beijing."], None),
        (["<Instruct>: Find cities\n<Query>: capital of china"], ["<Document>: Beijing."], None),
    ]
    for queries, documents, instruction in styles:
        assert list(r.encode(queries, documents, instruction)[0].input_ids) == official


def test_qwen3_instruction_field_wins_over_inline():
    r = recipe("qwen3")
    ids = r.encode(["Instruct: inline one\nQuery: q"], ["d"], "field one")[0].input_ids
    assert list(ids) == reference.qwen3_reference_ids(fixture_dir("qwen3"), "q", "d", "field one")


def test_qwen3_default_instruction():
    ids = recipe("qwen3").encode(["q"], ["d"])[0].input_ids
    assert list(ids) == reference.qwen3_reference_ids(
        fixture_dir("qwen3"), "q", "d", DEFAULT_INSTRUCTION
    )


def test_qwen3_head_uses_yes_and_no_rows():
    r = recipe("qwen3")
    head = r.head
    assert head.kind == "lm_rows"
    assert r.tokenizer.decode([head.positive_token_id]) == "yes"
    assert r.tokenizer.decode([head.negative_token_id]) == "no"


def test_truncate_false_names_the_document_and_its_length():
    r = recipe("qwen3", 256)
    with pytest.raises(InvalidRequest) as info:
        r.encode(["q"] * 3, ["short", "fine", "long " * 400], truncate=False)
    assert info.value.param == "documents[2]"
    assert "document 2" in info.value.message and "256" in info.value.message
    assert r.encode(["q"], ["long " * 400])[0].truncated  # the default truncates


def test_truncation_cuts_document_tail_to_exactly_the_limit():
    r = recipe("qwen3", 256)
    pair = r.encode(["q"], ["long " * 400])[0]
    assert len(pair) == 256
    assert list(pair.input_ids[-len(r.suffix_ids) :]) == r.suffix_ids  # template intact


def test_query_that_alone_fills_the_context_is_rejected():
    r = recipe("qwen3", 256)
    with pytest.raises(InvalidRequest) as info:
        r.encode(["very long query " * 200], ["doc"])
    assert info.value.param == "query"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qwen3", "qwen3-reranker"),
        ("qwen3-seq-cls", "qwen3-seq-cls"),
        ("gemma", "bge-gemma"),
        ("xlmr", "cross-encoder"),
        ("bert", "cross-encoder"),
    ],
)
def test_recipe_detected_from_checkpoint(name, expected):
    assert detect_recipe(AutoConfig.from_pretrained(fixture_dir(name))).name == expected


def test_unfit_checkpoint_error_lists_the_recipes():
    config = SimpleNamespace(architectures=["BertForMaskedLM"], num_labels=2)
    with pytest.raises(ModelLoadError) as info:
        detect_recipe(config)
    for name in RECIPES:
        assert name in info.value.message


def test_recipe_override_and_unknown_recipe():
    path = fixture_dir("qwen3")
    tok, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    assert build_recipe("qwen3-seq-cls", tok, config, None).head.kind == "classifier"
    with pytest.raises(ModelLoadError, match="unknown recipe"):
        build_recipe("nope", tok, config, None)


def test_max_length_defaults():
    assert recipe("qwen3").max_length == min(
        8192, AutoConfig.from_pretrained(fixture_dir("qwen3")).max_position_embeddings
    )
    assert recipe("gemma").max_length == 512
    assert recipe("xlmr").max_length == 512
    assert recipe("bert").max_length == 512


def test_an_empty_instruction_gives_qwen3_the_bare_pair(qwen3_dir):
    """`"instruction": ""` asks for no instruction: the `<Instruct>` line is left out (not
    the card's recipe; opt-in for tasks the default instruction hurts). None keeps the card's."""
    from rerankd.recipes.qwen3 import DEFAULT_INSTRUCTION
    from rerankd.runtime import load_recipe
    from rerankd.settings import Settings

    recipe = load_recipe(Settings(model=str(qwen3_dir)))[2]

    def text(instruction):
        (pair,) = recipe.encode(["capital of France"], ["Paris."], instruction)
        return recipe.tokenizer.decode(pair.input_ids)

    assert "<Instruct>" not in text(
        ""
    ) and "<Query>: capital of France\n<Document>: Paris." in text("")
    assert f"<Instruct>: {DEFAULT_INSTRUCTION}\n" in text(None)
    assert "<Instruct>: find capitals\n" in text("find capitals")
