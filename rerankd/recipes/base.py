"""The recipe contract: text → token ids, and which model output is the score.

A recipe reproduces a model card's prompt token for token. It owns the tokenizer and
everything about text; it never touches tensors (the engine does, guided by `ScoreHead`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from rerankd.errors import InvalidRequest
from rerankd.types import EncodedPair, ScoreHead

__all__ = ["Recipe", "ScoreHead", "keep_document_end", "sigmoid"]


#: truncation sides: "right" cuts the end of a document (the model cards' way, the default);
#: "left" keeps its end (TEI's `truncation_direction: "Left"`)
TRUNCATION_SIDES = ("right", "left")


def keep_document_end(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], document_start: int, limit: int
) -> list[int]:
    """Cut `ids` to `limit` tokens by dropping the *first* tokens of the document text.

    `ids` encode a template head followed by a document that starts at character
    `document_start`; `offsets` are their character spans. Tokens that end at or before the
    document's start are the template's and are all kept; a token straddling the boundary
    counts as the document's. The document keeps its last ``limit - len(head)`` tokens.
    """
    head = next((i for i, (_, end) in enumerate(offsets) if end > document_start), len(ids))
    if head >= limit:  # no room for any of the document
        return list(ids[:limit])
    room = limit - head
    return list(ids[:head]) + list(ids[max(head, len(ids) - room) :])


#: characters of a document's start kept ahead of its end when a long one is cut on the left
_SEAM_CHARS = 64


def sigmoid(x: float) -> float:
    """Numerically safe logistic function (raw logit → probability)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class Recipe(ABC):
    """Base class for scoring recipes; subclasses implement `_encode_pairs`."""

    #: registry name, used by `--recipe` and shown in errors
    name: str = ""
    #: architectures (config.architectures[0]) this recipe is detected from
    architectures: tuple[str, ...] = ()
    #: whether an `instruction` changes the prompt
    supports_instruction: bool = False

    def __init__(self, tokenizer: Any, config: Any, max_model_len: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = self._max_length(max_model_len)
        # No token spans more characters than the longest vocabulary entry (byte-level and
        # WordPiece/Metaspace entries are at least as long as the text they cover). A text
        # longer than `_precut_chars` has more tokens than any pair may keep, so everything
        # past that point is cut anyway: dropping it before tokenizing keeps a 10 MB body's
        # cost bounded by the model's context (x4 margin for normalizers that merge chars).
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self._chars_per_token_bound = 4 * longest
        self._precut_chars = self._chars_per_token_bound * (self.max_length + 16)
        # ... but that bound is loose (millions of characters for a real vocabulary's long
        # entries): a window of ~8 characters per kept token (at least 64 KiB, so documents
        # of ordinary length keep exact `cut_tokens` counts) is tokenized first, and settles
        # it for ordinary text (see `precut`); a longer document's count is then a minimum
        self._window_chars = max(65_536, 8 * (self.max_length + 16) + 64)

    # --- to implement ---------------------------------------------------------------------

    @property
    @abstractmethod
    def head(self) -> ScoreHead: ...

    @abstractmethod
    def _max_length(self, max_model_len: int | None) -> int:
        """The recipe's token limit, given the user's `--max-model-len` cap."""

    @abstractmethod
    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        """Tokenize aligned (query, document) pairs, truncating as the model card does.

        `side="left"` keeps the end of an over-long document instead of its start; the
        default ("right") is the model card's own truncation, token for token.
        """

    # --- shared behaviour -----------------------------------------------------------------

    def encode(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None = None,
        truncate: bool = True,
        *,
        side: str = "right",
        max_document_tokens: int | None = None,
    ) -> list[EncodedPair]:
        """Encode aligned pairs; with ``truncate=False`` a pair that needed cutting is a 400.

        `side`: which end of an over-long document to cut (see `_encode_pairs`).
        `max_document_tokens` (Cohere v2 `max_tokens_per_doc`): each document is first cut to
        that many tokens of its own, before templating; the cut counts as truncation, but is
        what the client asked for, so it never makes ``truncate=False`` fail.
        """
        if len(queries) != len(documents):
            raise ValueError("queries and documents must be aligned; this is a bug")
        if side not in TRUNCATION_SIDES:
            raise ValueError(f"unknown truncation side {side!r}")
        if not documents:
            return []
        queries = [self.precut(q, "right") for q in queries]
        documents = [self.precut(d, side) for d in documents]
        capped: list[int] = []
        if max_document_tokens is not None:
            documents, capped = self.cap_texts(documents, max_document_tokens, side)
        pairs = self._encode_side(queries, documents, instruction, side)
        if not truncate:
            self.check_fits(pairs)
        if capped:
            pairs = [
                replace(pair, cut_tokens=pair.cut_tokens + cut) if cut else pair
                for pair, cut in zip(pairs, capped, strict=True)
            ]
        return pairs

    def encode_pairs(
        self, queries: Sequence[str], documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        """Aligned pairs exactly as the model card tokenizes them (its own truncation), with
        no pre-cut and no `truncate=False` check: for callers that prepare the texts
        themselves (recipes/chunking.py)."""
        return self._encode_pairs(queries, documents, instruction)

    def _encode_side(self, queries, documents, instruction, side: str) -> list[EncodedPair]:
        if side == "right":  # the model card's path, called exactly as before
            return self._encode_pairs(queries, documents, instruction)
        return self._encode_pairs(queries, documents, instruction, side)

    def check_fits(self, pairs: Sequence[EncodedPair], first_index: int = 0) -> None:
        """`truncate: false`: a pair that needed cutting is a 400 naming its document."""
        for offset, pair in enumerate(pairs):
            if pair.truncated:
                raise self._too_long(first_index + offset, pair)

    def precut(self, text: str, side: str, times: int = 1) -> str:
        """`text` without the part no recipe could keep (`times` pairs' worth, for chunking),
        with bounded work: the kept end's window of `_window_chars` when it already holds more
        tokens than that (tokenization is local: the window's tokens up to its last few are
        the text's), else the proven bound `_precut_chars`."""
        window_chars, bound_chars = times * self._window_chars, times * self._precut_chars
        if len(text) <= window_chars:
            return text
        window = self._cut(text, side, window_chars)
        if len(self.encode_text(window)) > times * (self.max_length + 16):
            return window
        return text if len(text) <= bound_chars else self._cut(text, side, bound_chars)

    @staticmethod
    def _cut(text: str, side: str, chars: int) -> str:
        """The first `chars` characters, or (side="left") the last ones behind the text's own
        first few: the template's end tokenizes with the document's real start exactly as it
        would whole (a space there can merge with it), and the seam falls in the cut part."""
        if side == "right":
            return text[:chars]
        return text[:_SEAM_CHARS] + text[-(chars - _SEAM_CHARS) :]

    def _too_long(self, index: int, pair: EncodedPair) -> InvalidRequest:
        full = len(pair) + pair.cut_tokens
        return InvalidRequest(
            f"document {index} is at least {full} tokens with the prompt, more than this "
            f"model's limit of {self.max_length} tokens, and truncate is false; "
            "shorten it or send truncate: true to cut its end",
            param=f"documents[{index}]",
        )

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of `text`'s tokens (no special tokens)."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in encoded["offset_mapping"]]

    def cap_texts(
        self, documents: Sequence[str], limit: int, side: str
    ) -> tuple[list[str], list[int]]:
        """Each text (a document, or a query) cut to `limit` tokens of its own (its start
        kept, or its end with side="left"), as text; and how many tokens each lost."""
        if limit < 1:
            raise InvalidRequest(
                "max_tokens_per_doc must be at least 1", param="max_tokens_per_doc"
            )
        texts: list[str] = []
        cuts: list[int] = []
        if not documents:
            return texts, cuts
        encoded = self.tokenizer(
            list(documents), add_special_tokens=False, return_offsets_mapping=True
        )
        for document, offsets in zip(documents, encoded["offset_mapping"], strict=True):
            cut = max(0, len(offsets) - limit)
            if cut and side == "left":
                document = document[offsets[-limit][0] :]
            elif cut:
                document = document[: offsets[limit - 1][1]]
            texts.append(document)
            cuts.append(cut)
        return texts, cuts

    def activate(self, raw: float) -> float:
        """The model's activation: a probability in [0, 1]."""
        return sigmoid(raw)

    def count_tokens_upto(self, text: str, limit: int) -> int | None:
        """Tokens of `text` alone, or None when it has more than `limit`: with bounded work
        however long the text is (a 10 MB instruction must be refused in milliseconds, not
        tokenized for seconds).

        A text longer than `limit` × the most characters one token can cover has more tokens
        than `limit` without tokenizing it; otherwise a prefix of ~8 characters per allowed
        token is tokenized first, which settles it for ordinary text (a prefix has at most a
        token or two more than the whole text's tokens up to the cut).
        """
        if len(text) > self._chars_per_token_bound * limit:
            return None
        probe_chars = 8 * limit + 64
        if len(text) > probe_chars and len(self.encode_text(text[:probe_chars])) > limit + 2:
            return None
        count = len(self.encode_text(text))
        return count if count <= limit else None

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` alone, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Batch version of `encode_text` (the Rust tokenizer parallelizes and drops the GIL)."""
        if not texts:
            return []
        return [
            list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ]
