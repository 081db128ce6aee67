"""Qwen3-Reranker (0.6B/4B/8B): the model card's chat prompt, scored by yes − no logits.

Also the community "-seq-cls" conversions (`Qwen3ForSequenceClassification`), which use
the same prompt with a one-label head equal to the yes row minus the no row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import Recipe, ScoreHead, keep_document_end
from rerankd.types import EncodedPair

# Verbatim from the Qwen3-Reranker model card.
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: the card's `max_length`; the model itself allows 32768 (raise it with --max-model-len)
CARD_MAX_LENGTH = 8192

# Clients put the instruction inside the query in two styles (see DESIGN.md §2):
#   "Instruct: I\nQuery: Q"  (Qwen3-Embedding / HexGrid docs; "Query:" may have no space)
#   "<Instruct>: I\n<Query>: Q"  (regolo docs)
_INLINE_INSTRUCTION = re.compile(
    r"\A\s*(?:<Instruct>|Instruct):[ \t]?(?P<instruction>.*?)\r?\n(?:<Query>|Query):[ \t]?(?P<query>.*)\Z",
    re.DOTALL,
)
_DOCUMENT_TAG = "<Document>: "


def split_inline_instruction(query: str) -> tuple[str | None, str]:
    """Split a query written with an inline instruction into (instruction, query)."""
    match = _INLINE_INSTRUCTION.match(query)
    if match is None:
        return None, query
    return match.group("instruction"), match.group("query")


def strip_document_tag(document: str) -> str:
    """Drop a leading `<Document>: ` that some clients add, so the tag is never doubled."""
    return document[len(_DOCUMENT_TAG) :] if document.startswith(_DOCUMENT_TAG) else document


def format_body(instruction: str, query: str, document: str) -> str:
    """The card's `format_instruction`; an empty instruction (a request's `"instruction": ""`)
    gives the bare pair, without the `<Instruct>` line (users report the card's default
    instruction hurting some tasks; this is not the card's recipe, so it is opt-in)."""
    if not instruction:
        return f"<Query>: {query}\n<Document>: {document}"
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class Qwen3Reranker(Recipe):
    name = "qwen3-reranker"
    architectures = ("Qwen3ForCausalLM",)
    supports_instruction = True

    def __init__(self, tokenizer, config, max_model_len: int | None = None) -> None:
        super().__init__(tokenizer, config, max_model_len)
        self.prefix_ids = self.encode_text(PREFIX)
        self.suffix_ids = self.encode_text(SUFFIX)
        self.body_budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_budget <= 0:
            raise ValueError(f"max length {self.max_length} leaves no room for the prompt")

    @property
    def head(self) -> ScoreHead:
        vocab = self.tokenizer
        return ScoreHead(
            kind="lm_rows",
            positive_token_id=vocab.convert_tokens_to_ids("yes"),
            negative_token_id=vocab.convert_tokens_to_ids("no"),
        )

    def _max_length(self, max_model_len: int | None) -> int:
        context = getattr(self.config, "max_position_embeddings", None) or CARD_MAX_LENGTH
        limit = CARD_MAX_LENGTH if max_model_len is None else max_model_len
        return min(limit, context)

    def _resolve(self, query: str, instruction: str | None) -> tuple[str, str]:
        """Pick the instruction (field > inline > default; an empty field: none, the bare
        pair) and the bare query."""
        inline, bare_query = split_inline_instruction(query)
        if instruction is not None:
            return instruction, bare_query
        return inline or DEFAULT_INSTRUCTION, bare_query

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        resolved = [self._resolve(q, instruction) for q in queries]
        stripped = [strip_document_tag(d) for d in documents]
        bodies = [format_body(inst, q, d) for (inst, q), d in zip(resolved, stripped, strict=True)]
        if side == "left":
            return self._encode_keeping_end(bodies, stripped, resolved)
        pairs = []
        budget = self.body_budget
        for index, body_ids in enumerate(self.encode_texts(bodies)):
            cut = max(0, len(body_ids) - budget)
            if cut:
                self._check_query_fits(index, *resolved[index])
            ids = self.prefix_ids + body_ids[:budget] + self.suffix_ids
            pairs.append(EncodedPair(tuple(ids), None, cut))
        return pairs

    def _encode_keeping_end(self, bodies, documents, resolved) -> list[EncodedPair]:
        """Like the card's truncation, but an over-long document loses its start, not its end
        (the body's tokens before the document, and the template, stay whole)."""
        encoded = self.tokenizer(bodies, add_special_tokens=False, return_offsets_mapping=True)
        pairs = []
        budget = self.body_budget
        for index, (body, document) in enumerate(zip(bodies, documents, strict=True)):
            body_ids = encoded["input_ids"][index]
            cut = max(0, len(body_ids) - budget)
            if cut:
                self._check_query_fits(index, *resolved[index])
                offsets = encoded["offset_mapping"][index]
                body_ids = keep_document_end(body_ids, offsets, len(body) - len(document), budget)
            ids = self.prefix_ids + list(body_ids) + self.suffix_ids
            pairs.append(EncodedPair(tuple(ids), None, cut))
        return pairs

    def _check_query_fits(self, index: int, instruction: str, query: str) -> None:
        """A query (with instruction and template) that alone fills the context is a 400."""
        head_tokens = len(self.encode_text(format_body(instruction, query, "")))
        if head_tokens >= self.body_budget:
            raise InvalidRequest(
                f"the query and instruction take {head_tokens + len(self.prefix_ids) + len(self.suffix_ids)} "
                f"tokens with the prompt template, leaving no room for a document within this "
                f"model's limit of {self.max_length} tokens; shorten the query",
                param="query",
            )


class Qwen3SeqCls(Qwen3Reranker):
    """Converted Qwen3 reranker: same prompt, the checkpoint's one-label classifier."""

    name = "qwen3-seq-cls"
    architectures = ("Qwen3ForSequenceClassification",)

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="classifier")
