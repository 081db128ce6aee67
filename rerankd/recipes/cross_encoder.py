"""One-label sequence-classification cross-encoders (bge-reranker-v2-m3, ms-marco MiniLM, …).

The tokenizer's own pair encoding supplies the special tokens and token types
(XLM-R `<s> q </s></s> d </s>`; BERT `[CLS] q [SEP] d [SEP]`). Equal to
`tokenizer(query, document, truncation="only_second", max_length=L)` (sentence-transformers'
CrossEncoder), plus FlagEmbedding's rule that a query longer than 3/4·L is cut first.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from rerankd.recipes.base import Recipe, ScoreHead
from rerankd.types import EncodedPair

#: model_max_length values above this are the "unset" sentinel transformers uses
UNSET_MAX_LENGTH = 1_000_000
#: RoBERTa-family position ids start after the padding index, costing two positions
POSITION_OFFSET = {"xlm-roberta": 2, "roberta": 2, "camembert": 2, "xlm-roberta-xl": 2}


class CrossEncoder(Recipe):
    name = "cross-encoder"
    architectures = ()  # detected from any one-label *ForSequenceClassification

    def __init__(self, tokenizer, config, max_model_len: int | None = None) -> None:
        super().__init__(tokenizer, config, max_model_len)
        # A private copy of the Rust tokenizer with truncation/padding switched off, so the
        # ids are exactly the model's encoding and we alone decide where to cut.
        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._num_special = self._tok.num_special_tokens_to_add(is_pair=True)
        self._use_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="classifier")

    def _max_length(self, max_model_len: int | None) -> int:
        limits = []
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
        if tokenizer_max and tokenizer_max < UNSET_MAX_LENGTH:
            limits.append(int(tokenizer_max))
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions:
            limits.append(positions - POSITION_OFFSET.get(self.config.model_type, 0))
        if max_model_len is not None:
            limits.append(max_model_len)
        return min(limits) if limits else 512

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        length = self.max_length
        unique = list(dict.fromkeys(queries))
        encoded_queries = {}
        for query, enc in zip(
            unique, self._tok.encode_batch(unique, add_special_tokens=False), strict=True
        ):
            full = len(enc.ids)
            enc.truncate(length * 3 // 4)  # FlagEmbedding: queries get at most 3/4 of the limit
            encoded_queries[query] = (enc, full - len(enc.ids))
        pairs = []
        for query, doc in zip(
            queries, self._tok.encode_batch(list(documents), add_special_tokens=False), strict=True
        ):
            q_enc, q_cut = encoded_queries[query]
            room = max(0, length - self._num_special - len(q_enc.ids))
            d_cut = max(0, len(doc.ids) - room)
            if d_cut:
                doc.truncate(room, direction=side)
            merged = self._tok.post_process(q_enc, doc, add_special_tokens=True)
            types = tuple(merged.type_ids) if self._use_token_types else None
            pairs.append(EncodedPair(tuple(merged.ids), types, q_cut + d_cut))
        return pairs
