"""Cohere v1 `max_chunks_per_doc`: a long document scored as several chunks, each beside the
query, instead of being cut.

Chunks follow the document's own tokenization (token boundaries, preferring a word boundary
near each chunk's end), are sized so that each fits beside the query in the recipe's
template, and are encoded through the recipe exactly as whole documents are. This module
only splits and counts; prompts and tokenizers stay in the recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import Recipe
from rerankd.types import EncodedPair

#: a chunk size that still needs cutting shrinks by its overflow, at most this many times
_MAX_RESIZES = 8


def encode_chunks(
    recipe: Recipe,
    queries: Sequence[str],
    documents: Sequence[str],
    instruction: str | None = None,
    truncate: bool = True,
    *,
    max_chunks: int,
    max_document_tokens: int | None = None,
) -> list[list[EncodedPair]]:
    """Per document, the pairs of its chunks.

    A document that fits beside its query is one chunk, encoded exactly as `recipe.encode`
    does. A longer one is split into consecutive chunks that each fit beside the query; the
    first `max_chunks` are kept. Dropping the rest counts as truncation (its tokens are added
    to the last kept chunk's `cut_tokens`); with ``truncate=False`` it is a 400 instead.
    """
    if max_chunks < 1:
        raise ValueError("max_chunks must be at least 1")
    if max_chunks == 1:  # one chunk is the document cut as by default, exactly
        pairs = recipe.encode(
            queries, documents, instruction, truncate, max_document_tokens=max_document_tokens
        )
        return [[pair] for pair in pairs]
    if len(queries) != len(documents):
        raise ValueError("queries and documents must be aligned; this is a bug")
    if not documents:
        return []
    capped = [0] * len(documents)
    # chunks past `max_chunks` are dropped: never tokenize more than they could hold
    documents = [recipe.precut(d, "right", times=max_chunks) for d in documents]
    if max_document_tokens is not None:
        documents, capped = recipe.cap_texts(documents, max_document_tokens, "right")
    whole = recipe.encode_pairs(queries, documents, instruction)
    empty: dict[str, EncodedPair] = {}
    groups: list[list[EncodedPair]] = []
    for index, (query, document, pair) in enumerate(zip(queries, documents, whole, strict=True)):
        if query not in empty:
            empty[query] = recipe.encode_pairs([query], [""], instruction)[0]
        chunks = split_document(recipe, query, document, instruction, pair, empty[query])
        if chunks is None:
            if not truncate:
                recipe.check_fits([pair], first_index=index)
            groups.append([replace(pair, cut_tokens=pair.cut_tokens + capped[index])])
            continue
        if len(chunks) > max_chunks and not truncate:
            raise InvalidRequest(
                f"document {index} needs {len(chunks)} chunks of this model's limit "
                f"of {recipe.max_length} tokens, more than max_chunks_per_doc="
                f"{max_chunks}, and truncate is false; shorten it, raise "
                "max_chunks_per_doc or send truncate: true to drop the rest",
                param=f"documents[{index}]",
            )
        groups.append(_kept_chunks(recipe, chunks, max_chunks, capped[index]))
    return groups


def _kept_chunks(
    recipe: Recipe, chunks: list[tuple[str, EncodedPair]], max_chunks: int, capped: int
) -> list[EncodedPair]:
    """The first `max_chunks` chunks' pairs; the dropped chunks' tokens count as cut from the
    last kept one, a `max_tokens_per_doc` cap's from the first."""
    kept = [pair for _, pair in chunks[:max_chunks]]
    dropped = sum(len(recipe.encode_text(text)) for text, _ in chunks[max_chunks:])
    kept[-1] = replace(kept[-1], cut_tokens=kept[-1].cut_tokens + dropped)
    kept[0] = replace(kept[0], cut_tokens=kept[0].cut_tokens + capped)
    return kept


def split_document(
    recipe: Recipe,
    query: str,
    document: str,
    instruction: str | None,
    pair: EncodedPair,
    bare: EncodedPair,
) -> list[tuple[str, EncodedPair]] | None:
    """Split `document` into consecutive texts that each fit beside `query`, with their
    pairs; None when it fits already (or nothing of it can: then only the default
    truncation applies).

    `pair` is the whole document's encoding, `bare` the query's with an empty document:
    their difference is how many document tokens fit. Sizes count the document's own
    tokens; a chunk ends at a word boundary when one lies in its last quarter. The template
    may tokenize a chunk's edges a token differently, so sizes shrink until no chunk needs
    cutting.
    """
    room = len(pair) - len(bare)
    if pair.cut_tokens - bare.cut_tokens <= 0 or room <= 0:
        return None
    offsets = recipe.token_offsets(document)
    size = room
    for _ in range(_MAX_RESIZES):
        texts = [document[a:b] for a, b in chunk_spans(document, offsets, size)]
        pairs = recipe.encode_pairs([query] * len(texts), texts, instruction)
        over = max(chunk.cut_tokens - bare.cut_tokens for chunk in pairs)
        if over <= 0 or size == 1:
            break
        size = max(1, size - over)
    return list(zip(texts, pairs, strict=True))


def chunk_spans(text: str, offsets: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Character spans of consecutive chunks of at most `size` tokens covering `text`."""
    starts, token = [0], 0
    while token + size < len(offsets):
        end = token + size
        for candidate in range(end, end - size // 4, -1):  # prefer a word boundary
            char = offsets[candidate][0]
            if char > starts[-1] and (text[char].isspace() or text[char - 1].isspace()):
                end = candidate
                break
        # byte-level tokens of one character share its span: never an empty chunk
        if offsets[end][0] > starts[-1]:
            starts.append(offsets[end][0])
        token = end
    spans = []
    for start, stop in zip(starts, [*starts[1:], len(text)], strict=True):
        # whitespace between two chunks belongs to neither (the first chunk's start and
        # the last chunk's end stay as sent)
        if start > 0:
            while start < stop and text[start].isspace():
                start += 1
        if stop < len(text):
            while stop > start and text[stop - 1].isspace():
                stop -= 1
        spans.append((start, stop))
    return spans
