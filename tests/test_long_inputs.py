"""Recipe-level long-document options (the dialect extras of DESIGN §1), for every family:
TEI's left truncation, Cohere v2's `max_tokens_per_doc`, Cohere v1's `max_chunks_per_doc`.
The default (right) path is the model cards' and is covered token for token by test_parity."""

from __future__ import annotations

from functools import cache

import pytest
from transformers import AutoConfig, AutoTokenizer

from rerankd.errors import InvalidRequest
from rerankd.recipes import build_recipe
from rerankd.recipes.chunking import encode_chunks
from tests.fixtures.paths import fixture_dir
from tests.recipes.helpers import chunk_texts

#: fixture → the max_model_len the tests give it (small, so short texts overflow)
FAMILIES = {"qwen3": 128, "gemma": 48, "xlmr": 48, "bert": 48}
QUERY = "what is the capital of china"
LONG = "alpha " + " ".join(f"w{i}" for i in range(200)) + " omega"
SHORT = "beijing is the capital of china"


@cache
def recipe(name: str):
    path = fixture_dir(name)
    return build_recipe(
        None, AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path), FAMILIES[name]
    )


def text_of(r, pair) -> str:
    return r.tokenizer.decode(pair.input_ids)


def after_document(r, name: str) -> int:
    """How many tokens follow the document in a pair (the template's tail)."""
    if name == "qwen3":
        return len(r.suffix_ids)
    if name == "gemma":
        return len(r.sep_ids) + len(r.default_prompt_ids)
    return 1  # the closing special token


@pytest.mark.parametrize("name", FAMILIES)
def test_left_keeps_the_end_of_a_long_document_and_the_whole_template(name):
    r = recipe(name)
    right = r.encode([QUERY], [LONG])[0]
    left = r.encode([QUERY], [LONG], side="left")[0]
    assert len(left) == len(right) and left.cut_tokens == right.cut_tokens > 0
    assert "omega" in text_of(r, left) and "alpha" not in text_of(r, left)
    assert "alpha" in text_of(r, right) and "omega" not in text_of(r, right)
    tail = after_document(r, name)
    assert left.input_ids[-tail:] == right.input_ids[-tail:]  # template tail intact
    assert left.input_ids[:8] == right.input_ids[:8]  # template head intact
    assert QUERY in text_of(r, left).lower()  # the query is never cut


@pytest.mark.parametrize("name", FAMILIES)
def test_left_changes_nothing_for_a_document_that_fits(name):
    r = recipe(name)
    assert r.encode([QUERY], [SHORT], side="left") == r.encode([QUERY], [SHORT])


@pytest.mark.parametrize("name", FAMILIES)
def test_left_with_truncate_false_is_still_a_400(name):
    with pytest.raises(InvalidRequest) as info:
        recipe(name).encode([QUERY] * 2, [SHORT, LONG], truncate=False, side="left")
    assert info.value.param == "documents[1]"


def _first_tokens(r, text: str, n: int) -> str:
    offsets = r.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    return text[: offsets[n - 1][1]]


@pytest.mark.parametrize("name", FAMILIES)
def test_max_document_tokens_cuts_the_text_before_templating(name):
    r = recipe(name)
    total = len(r.encode_text(LONG))
    capped = r.encode([QUERY, QUERY], [LONG, "paris"], max_document_tokens=6)
    expected = r.encode([QUERY], [_first_tokens(r, LONG, 6)])[0]
    assert capped[0].input_ids == expected.input_ids
    assert capped[0].cut_tokens == total - 6  # counted as truncation
    assert capped[1] == r.encode([QUERY], ["paris"])[0]  # shorter than the cap: untouched
    # asked for by the client: never a truncate=false error
    r.encode([QUERY], [LONG], truncate=False, max_document_tokens=6)


@pytest.mark.parametrize("name", FAMILIES)
def test_chunks_of_a_document_that_fits_are_the_document(name):
    r = recipe(name)
    groups = encode_chunks(r, [QUERY, QUERY], [SHORT, "paris"], max_chunks=4)
    assert [g[0] for g in groups] == r.encode([QUERY, QUERY], [SHORT, "paris"])
    assert [len(g) for g in groups] == [1, 1]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_long_document_is_split_into_chunks_that_each_fit(name):
    r = recipe(name)
    (chunks,) = encode_chunks(r, [QUERY], [LONG], max_chunks=100)
    assert len(chunks) > 3
    assert not any(c.truncated for c in chunks)
    assert "alpha" in text_of(r, chunks[0]) and "omega" in text_of(r, chunks[-1])
    # every chunk is the whole template with part of the document
    whole = r.encode([QUERY], [LONG])[0]
    for chunk in chunks:
        assert chunk.input_ids[:8] == whole.input_ids[:8]
    # together they cover the document: every word shows up in some chunk
    texts = " ".join(text_of(r, c) for c in chunks)
    assert all(f"w{i}" in texts for i in range(0, 200, 7))


@pytest.mark.parametrize("name", FAMILIES)
def test_chunks_beyond_the_maximum_are_dropped_and_counted(name):
    r = recipe(name)
    (chunks,) = encode_chunks(r, [QUERY], [LONG], max_chunks=2)
    assert len(chunks) == 2
    assert not chunks[0].truncated and chunks[1].truncated
    with pytest.raises(InvalidRequest) as info:
        encode_chunks(r, [QUERY] * 2, [SHORT, LONG], truncate=False, max_chunks=2)
    assert info.value.param == "documents[1]" and "max_chunks_per_doc=2" in info.value.message
    # enough chunks: truncate=false is fine, nothing was cut
    groups = encode_chunks(r, [QUERY], [LONG], truncate=False, max_chunks=100)
    assert not any(c.truncated for c in groups[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_one_chunk_is_the_default_truncation(name):
    r = recipe(name)
    assert encode_chunks(r, [QUERY], [LONG], max_chunks=1) == [[r.encode([QUERY], [LONG])[0]]]


@pytest.mark.parametrize("name", FAMILIES)
def test_chunk_texts_are_what_encode_chunks_scores(name):
    r = recipe(name)
    texts = chunk_texts(r, QUERY, LONG)
    (chunks,) = encode_chunks(r, [QUERY], [LONG], max_chunks=len(texts))
    assert chunks == r.encode([QUERY] * len(texts), texts)
    assert chunk_texts(r, QUERY, SHORT) == [SHORT]
