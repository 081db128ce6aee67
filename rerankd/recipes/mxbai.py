"""mxbai-rerank-v2 (`mixedbread-ai/mxbai-rerank-base-v2`, `-large-v2`; Qwen2ForCausalLM).

Reproduces `MxbaiRerankV2.prepare_inputs` of the PyPI package `mxbai-rerank` (0.1.6) token
for token:

    ids = encode(chat prefix) + query_part + encode(sep) + document_part
          + encode(sep) + encode(task prompt) + encode(chat suffix)

- query_part: encode("query: Q") (or "instruction: I\\nquery: Q"), cut to 3·L/4 tokens;
- document_part: encode("document: D") cut to min(L, context − len(query_part) − template);
- then `prepare_for_model(query_part, sep + document_part, only_second, max_length=L)`:
  the end of the document part is dropped until query + sep + document ≤ L.

L is the package's `max_length` (8192 by default; `--max-model-len` sets it): the budget of
the query and the document, the ~80 template tokens come on top. raw = logit("1") −
logit("0") at the last position, as `predict(normalize=False)` returns it; activated =
sigmoid(raw) (vLLM's two-token softmax).

Not applied: the package's `normalize=True`, which subtracts half a constant keyed on the hub
model name (`estimated_max`: 9 for base, 12 for large) before the sigmoid. A checkpoint
cannot carry that constant; `sigmoid(raw - estimated_max / 2)` reproduces it client-side.

Detection: the checkpoint is a plain Qwen2.5 chat LM (config, tokenizer and chat template are
Qwen2.5's, nothing marks it a reranker; the package itself is told the class by its user, and
vLLM needs `hf_overrides`). Only a hub download is recognized by its repo id (the Hugging Face
cache keeps it in the directory name, `models--mixedbread-ai--mxbai-rerank-base-v2`); a local
directory needs `--recipe mxbai-rerank-v2`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import Recipe, ScoreHead, keep_document_end
from rerankd.types import EncodedPair

# Verbatim from mxbai_rerank.mxbai_rerank_v2.MxbaiRerankV2 (0.1.6).
SEP = "\n"
INSTRUCTION_PROMPT = "instruction: {instruction}"
QUERY_PROMPT = "query: {query}"
DOC_PROMPT = "document: {document}"
TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. "
    "For each query-document pair, carefully analyze the semantic relationship between them, "
    "then provide your binary relevance judgment (0 for not relevant, 1 for relevant).\n"
    "Relevance:"
)
CHAT_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n<|im_start|>user\n"
)
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
#: the package's default `max_length`
DEFAULT_MAX_LENGTH = 8192
#: the package's `normalize` constants (documented, never applied: see the module docstring)
ESTIMATED_MAX = {
    "mixedbread-ai/mxbai-rerank-base-v2": 9.0,
    "mixedbread-ai/mxbai-rerank-large-v2": 12.0,
}

#: a Hugging Face cache snapshot of an mxbai-rerank v2 repo (`models--ORG--NAME/snapshots/…`)
_HUB_CACHE_REPO = re.compile(r"^models--[^/]+--[^/]*mxbai-rerank-[^/]*v2[^/]*$", re.IGNORECASE)


def is_mxbai_v2_download(model_dir: Path | str | None) -> bool:
    """Whether `model_dir` is a hub download of an mxbai-rerank v2 repo (its cache path names
    the repo); a local directory's name proves nothing and is never matched."""
    if model_dir is None:
        return False
    parts = Path(model_dir).absolute().parts  # not resolved: the cache dir is the evidence
    return any(
        _HUB_CACHE_REPO.match(part) and parts[i + 1 : i + 2] == ("snapshots",)
        for i, part in enumerate(parts)
    )


class MxbaiRerankV2(Recipe):
    name = "mxbai-rerank-v2"
    #: never detected from the architecture alone (any Qwen2.5 LM has it): see the docstring
    architectures = ()
    supports_instruction = True

    def __init__(self, tokenizer, config, max_model_len: int | None = None) -> None:
        self.context = int(getattr(config, "max_position_embeddings", None) or 32768)
        self.prefix_ids = list(tokenizer(CHAT_PREFIX, add_special_tokens=False)["input_ids"])
        self.sep_ids = list(tokenizer(SEP, add_special_tokens=False)["input_ids"])
        self.tail_ids = (
            self.sep_ids
            + list(tokenizer(TASK_PROMPT, add_special_tokens=False)["input_ids"])
            + list(tokenizer(CHAT_SUFFIX, add_special_tokens=False)["input_ids"])
        )
        #: the package's `predefined_length`: every template token
        self.template_length = len(self.prefix_ids) + len(self.tail_ids)
        super().__init__(tokenizer, config, max_model_len)
        if self.max_length < 4:
            raise ValueError(f"max length {self.max_length} leaves no room for a query")

    @property
    def head(self) -> ScoreHead:
        def first_id(text: str) -> int:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"][0]

        return ScoreHead(
            kind="lm_rows", positive_token_id=first_id("1"), negative_token_id=first_id("0")
        )

    def _max_length(self, max_model_len: int | None) -> int:
        length = DEFAULT_MAX_LENGTH if max_model_len is None else max_model_len
        # the package: the template must fit beside L within the model's context
        if length + self.template_length > self.context:
            length = self.context - self.template_length
        return length

    def _query_text(self, query: str, instruction: str | None) -> str:
        text = QUERY_PROMPT.format(query=query)
        if instruction:
            text = INSTRUCTION_PROMPT.format(instruction=instruction) + SEP + text
        return text

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        length = self.max_length
        unique = list(dict.fromkeys(queries))
        query_ids = dict(
            zip(
                unique,
                self.encode_texts([self._query_text(q, instruction) for q in unique]),
                strict=True,
            )
        )
        texts = [DOC_PROMPT.format(document=d) for d in documents]
        if side == "left":
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            doc_ids, doc_offsets = encoded["input_ids"], encoded["offset_mapping"]
        else:
            doc_ids, doc_offsets = self.encode_texts(texts), None
        pairs = []
        for index, query in enumerate(queries):
            full_query = query_ids[query]
            first = full_query[: length * 3 // 4]
            doc_budget = min(self.context - len(first) - self.template_length, length)
            if doc_budget <= 0:
                raise InvalidRequest(
                    "the query leaves no room for a document within this model's limit",
                    param="query",
                )
            full_doc = doc_ids[index]
            kept = len(full_doc[:doc_budget])
            # prepare_for_model(only_second): drop from the end of sep + document
            overflow = max(0, len(first) + len(self.sep_ids) + kept - length)
            kept = max(0, kept - overflow)
            if doc_offsets is not None and kept < len(full_doc):
                document = keep_document_end(
                    full_doc, doc_offsets[index], len(DOC_PROMPT.format(document="")), kept
                )
            else:
                document = full_doc[:kept]
            cut = len(full_query) - len(first) + len(full_doc) - kept
            ids = self.prefix_ids + first + self.sep_ids + list(document) + self.tail_ids
            pairs.append(EncodedPair(tuple(ids), None, cut))
        return pairs
