"""Helpers shared by recipe-level tests."""

from __future__ import annotations

from rerankd.recipes import Recipe
from rerankd.recipes.chunking import split_document


def chunk_texts(recipe: Recipe, query: str, document: str) -> list[str]:
    """The texts `encode_chunks` scores for `document` beside `query` (all of them, before
    `max_chunks` applies); just the document when it fits."""
    pair = recipe.encode_pairs([query], [document], None)[0]
    bare = recipe.encode_pairs([query], [""], None)[0]
    chunks = split_document(recipe, query, document, None, pair, bare)
    return [document] if chunks is None else [text for text, _ in chunks]
