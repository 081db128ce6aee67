"""bge-reranker-v2-gemma: FlagEmbedding's decoder-only reranker prompt, scored by the "Yes" logit."""

from __future__ import annotations

from collections.abc import Sequence

from rerankd.recipes.base import Recipe, ScoreHead, keep_document_end
from rerankd.types import EncodedPair

DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)
SEPARATOR = "\n"
#: FlagEmbedding's default `max_length` (L): passages are cut to L tokens, queries to 3L/4
DEFAULT_MAX_LENGTH = 512


class BgeGemmaReranker(Recipe):
    name = "bge-gemma"
    architectures = ("GemmaForCausalLM",)
    supports_instruction = True  # an instruction replaces the prompt text

    def __init__(self, tokenizer, config, max_model_len: int | None = None) -> None:
        super().__init__(tokenizer, config, max_model_len)
        self.sep_ids = self.encode_text(SEPARATOR)
        self.default_prompt_ids = self.encode_text(DEFAULT_PROMPT)
        bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
        # FlagEmbedding prepends bos only when the tokenizer has one distinct from pad.
        self.bos_ids = [bos] if bos is not None and bos != pad else []

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(
            kind="lm_rows", positive_token_id=self.tokenizer.convert_tokens_to_ids("Yes")
        )

    def _max_length(self, max_model_len: int | None) -> int:
        return DEFAULT_MAX_LENGTH if max_model_len is None else max_model_len

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        length = self.max_length
        # FlagEmbedding's `prompt`: None is the default, "" no prompt (the bare pair)
        prompt_ids = (
            self.encode_text(instruction) if instruction is not None else self.default_prompt_ids
        )
        # The pair (bos + query, sep + passage) may use L + len(sep) + len(prompt) tokens.
        pair_limit = length + len(self.sep_ids) + len(prompt_ids)
        unique_queries = list(dict.fromkeys(queries))
        query_ids = dict(
            zip(unique_queries, self.encode_texts([f"A: {q}" for q in unique_queries]), strict=True)
        )
        passages = [f"B: {d}" for d in documents]
        if side == "left":  # offsets, to keep the passage's "B: " head when cutting its start
            encoded = self.tokenizer(
                passages, add_special_tokens=False, return_offsets_mapping=True
            )
            passage_ids, passage_offsets = encoded["input_ids"], encoded["offset_mapping"]
        else:
            passage_ids, passage_offsets = self.encode_texts(passages), None
        pairs = []
        for index, (query, passage) in enumerate(zip(queries, passage_ids, strict=True)):
            full_query = query_ids[query]
            first = self.bos_ids + full_query[: length * 3 // 4]
            second = self.sep_ids + passage[:length]
            # prepare_for_model(truncation="only_second"): drop from the end of the second part.
            overflow = max(0, len(first) + len(second) - pair_limit)
            second = second[: len(second) - overflow]
            if passage_offsets is not None and len(second) - len(self.sep_ids) < len(passage):
                # keep the end of the document instead: same number of tokens, "B: " kept
                kept = keep_document_end(
                    passage, passage_offsets[index], len("B: "), len(second) - len(self.sep_ids)
                )
                second = self.sep_ids + kept
            cut = (len(full_query) - len(first) + len(self.bos_ids)) + (
                len(passage) + len(self.sep_ids) - len(second)
            )
            ids = first + second + self.sep_ids + prompt_ids
            pairs.append(EncodedPair(tuple(ids), None, cut))
        return pairs
