"""Over-long texts are cut before tokenizing, with bounded work and the same token ids."""

from __future__ import annotations

import time

import pytest

from rerankd.recipes.chunking import encode_chunks
from rerankd.runtime import load_recipe
from rerankd.settings import Settings
from tests.fixtures.paths import fixture_dir
from tests.words import WORDS


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(Settings(model=str(fixture_dir("qwen3")), max_model_len=512))[2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_long_document_encodes_exactly_as_without_the_precut(recipe, side, monkeypatch):
    document = " ".join(
        WORDS[i % len(WORDS)] for i in range(20_000)
    )  # far beyond the window of ~8 characters per token
    assert len(document) > recipe._window_chars
    cut = recipe.encode(["capital of France"], [document], side=side)
    monkeypatch.setattr(recipe, "precut", lambda text, side, times=1: text)
    whole = recipe.encode(["capital of France"], [document], side=side)
    assert cut[0].input_ids == whole[0].input_ids
    assert cut[0].truncated and whole[0].truncated


def test_a_text_of_few_tokens_per_character_falls_back_to_the_proven_bound(monkeypatch):
    # the vocabulary's longest entry, repeated: many characters per token, so a window (made
    # small here: the fixture's 2,048-token limit is reached by any 64 KiB of its text) holds
    # fewer tokens than a pair keeps and the cut falls back to `_precut_chars`
    recipe = load_recipe(Settings(model=str(fixture_dir("qwen3"))))[2]
    monkeypatch.setattr(recipe, "_window_chars", 4000)
    tokenizer = recipe.tokenizer
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    longest = max(
        (
            tokenizer.convert_tokens_to_string([t])
            for t in tokenizer.get_vocab()
            if t not in special
        ),
        key=len,
    )
    text = longest * (3 * recipe._window_chars // len(longest))
    assert len(recipe.encode_text(text[: recipe._window_chars])) <= recipe.max_length + 16
    cut = recipe.precut(text, "right")
    assert cut in (text, text[: recipe._precut_chars])
    encoded = recipe.encode(["q"], [text])
    monkeypatch.setattr(recipe, "precut", lambda text, side, times=1: text)
    assert encoded[0].input_ids == recipe.encode(["q"], [text])[0].input_ids


def test_a_10_mb_document_costs_well_under_a_second(recipe):
    document = "word " * 2_000_000
    started = time.perf_counter()
    (pair,) = recipe.encode(["q"], [document])
    assert time.perf_counter() - started < 1.0
    assert len(pair) == recipe.max_length and pair.truncated


def test_chunking_a_10_mb_document_tokenizes_only_what_its_kept_chunks_can_hold(recipe):
    document = "word " * 2_000_000
    started = time.perf_counter()
    (chunks,) = encode_chunks(recipe, ["q"], [document], max_chunks=3)
    assert time.perf_counter() - started < 2.0
    assert len(chunks) == 3 and chunks[-1].truncated
