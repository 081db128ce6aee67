"""jina-reranker-v3 (listwise): one prompt holds the query and a window of documents.

Reproduces Jina's `modeling.py` on the hub (jinaai/jina-reranker-v3, `JinaForRanking`, a
Qwen3-0.6B backbone; vLLM's `JinaForRanking` reads the same token positions):

- the query is cut to 512 tokens and each document to 2048 (`_truncate_texts` with `rerank`'s
  defaults; a request's `max_tokens_per_doc` cuts documents first, as for every recipe): a text is
  tokenized alone, and one of at least that many tokens is replaced by the decoded kept tokens
  (the reference's `>=`: a text of exactly 2048 tokens is re-decoded too);
- documents are grouped into windows (`rerank`'s loop, `windows` here): with L the
  tokenizer's `model_max_length` (rerankd also caps it at the config's
  `max_position_embeddings`, 131072 on the hub, and at `--max-model-len`) and q the query's
  token count, a window closes after its 125th document or as soon as the documents in it
  leave at most 2048 of the L − 2q tokens; the rest forms a last window. Windows are scored
  one prompt each; as in the reference, the template (~12 tokens a document) comes on top;
- a window's prompt (`format_docs_prompts_func`), tokenized whole by the tokenizer:

      <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n
      I will provide you with {n} passages, each indicated by a numerical identifier. Rank the
      passages based on their relevance to query: {query}\\n
      [<instruct>\\n{instruction}\\n</instruct>\\n]           (only with an instruction)
      <passage id="0">\\n{doc 0}<|embed_token|>\\n</passage>\\n ... <passage id="n-1">...</passage>\\n
      <query>\\n{query}<|rerank_token|>\\n</query><|im_end|>\\n<|im_start|>assistant\\n
      <think>\\n\\n</think>\\n\\n

  passage ids restart at 0 in each window; the two special tokens are removed from the query
  and the documents first (rerankd repeats the removal until none is left, where the
  reference's single pass would leave one that a nested string rebuilds, and removes them from
  the instruction too: only such hostile texts differ, whose prompts the reference misreads);
- the engine (engine/listwise.py) reads the final hidden state at each `<|embed_token|>` (the
  documents) and at `<|rerank_token|>` (the query), projects them (Linear → ReLU → Linear)
  and, over all windows, scores each document by its cosine with the windows' query
  embeddings averaged with weights max((1 + cos) / 2) of each window — with one window,
  the plain cosine.

The score is the cosine in [-1, 1], returned as is whatever `use_activation` says: the
reference's `relevance_score` has no other form. The reference's own `rerank` passes no
instruction; an `instruction` fills the `<instruct>` block its prompt function defines.

A request's pairs are `ListwisePair`s, one per document, all pointing to the request's
`Listing` (its windows' token ids and the positions of the special tokens), so the scheduler
and the service handle them as any pairs: a pair's tokens are its share of its window (the
tokens up to its `<|embed_token|>`; the last one also carries the query tail), so the
request's pairs count exactly the tokens the model computes. /v1/score pairs with the same
query form one listing. `max_chunks_per_doc` is refused (a 400): the model cuts documents at
2048 tokens, as its reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.recipes.base import Recipe, ScoreHead
from rerankd.types import EncodedPair

SYSTEM = (
    "You are a search relevance expert who can determine a ranking of the passages based on "
    "how relevant they are to the query. If the query is a question, how relevant a passage "
    "is depends on how well it answers the question. If not, try to analyze the intent of the "
    "query and assess how well each passage satisfies the intent. If an instruction is "
    "provided, you should follow the instruction when determining the ranking."
)
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DOCUMENT_TOKEN = "<|embed_token|>"
QUERY_TOKEN = "<|rerank_token|>"
#: the reference's `rerank` constants: query and document token limits, documents per window
MAX_QUERY_TOKENS = 512
MAX_DOCUMENT_TOKENS = 2048
WINDOW_DOCUMENTS = 125


@dataclass(frozen=True, eq=False)
class ListwiseWindow:
    """One window's prompt: its token ids and where the special tokens are in them."""

    input_ids: tuple[int, ...]
    #: index in `input_ids` of each document's `<|embed_token|>`, in document order
    document_positions: tuple[int, ...]
    #: index in `input_ids` of the query's `<|rerank_token|>`
    query_position: int


@dataclass(frozen=True, eq=False)
class Listing:
    """One query's documents as the model sees them: document i of the listing is the i-th
    `<|embed_token|>` over its windows, in order. Compared and hashed by identity."""

    windows: tuple[ListwiseWindow, ...]

    @property
    def num_documents(self) -> int:
        return sum(len(w.document_positions) for w in self.windows)


@dataclass(frozen=True)
class ListwisePair(EncodedPair):
    """A document's place in its listing; `input_ids` are its share of its window's tokens."""

    listing: Listing | None = None
    #: the document's index in `listing`
    document: int = 0


class JinaV3Reranker(Recipe):
    name = "jina-reranker-v3"
    architectures = ("JinaForRanking",)
    supports_instruction = True

    def __init__(self, tokenizer: Any, config: Any, max_model_len: int | None = None) -> None:
        super().__init__(tokenizer, config, max_model_len)
        self.document_token_id = self._special_id(DOCUMENT_TOKEN)
        self.query_token_id = self._special_id(QUERY_TOKEN)
        # L of the windows: the tokenizer's model_max_length (the reference's), within the
        # model's positions and the user's --max-model-len
        limits = [getattr(tokenizer, "model_max_length", None) or 0, max_model_len or 0]
        limits.append(getattr(config, "max_position_embeddings", None) or 0)
        self.window_tokens = min(n for n in limits if n > 0) if any(limits) else 131_072

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="listwise")

    def _max_length(self, max_model_len: int | None) -> int:
        """A document's limit: the reference's 2048 tokens, within --max-model-len."""
        return min(MAX_DOCUMENT_TOKENS, max_model_len or MAX_DOCUMENT_TOKENS)

    def _special_id(self, token: str) -> int:
        ids = self.encode_text(token)
        if len(ids) != 1:
            raise ModelLoadError(
                f"the tokenizer does not hold {token!r} as one token ({ids}); a "
                "jina-reranker-v3 checkpoint's tokenizer has it"
            )
        return ids[0]

    def activate(self, raw: float) -> float:
        """The cosine is returned as is (see the module docstring)."""
        return raw

    # --- encoding --------------------------------------------------------------------------

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
        """As `Recipe.encode`; with ``truncate=False`` a query over 512 tokens is a 400 too."""
        if not truncate:
            for query in dict.fromkeys(queries):
                if self.count_tokens_upto(query, MAX_QUERY_TOKENS) is None:
                    raise InvalidRequest(
                        f"the query is longer than this model's limit of {MAX_QUERY_TOKENS} "
                        "tokens, and truncate is false; shorten it or send truncate: true",
                        param="query",
                    )
        return super().encode(
            queries,
            documents,
            instruction,
            truncate,
            side=side,
            max_document_tokens=max_document_tokens,
        )

    def encode_pairs(self, queries, documents, instruction) -> list[EncodedPair]:
        raise InvalidRequest(
            "max_chunks_per_doc does not apply to jina-reranker-v3: it ranks its documents "
            f"together, each cut to {self.max_length} tokens as its reference does",
            param="max_chunks_per_doc",
        )

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        """One listing per distinct query (a rerank request has one), pairs in input order."""
        by_query: dict[str, list[int]] = {}
        for index, query in enumerate(queries):
            by_query.setdefault(query, []).append(index)
        pairs: list[EncodedPair] = [EncodedPair(())] * len(documents)
        for query, indices in by_query.items():
            listed = self.encode_listing(query, [documents[i] for i in indices], instruction, side)
            for index, pair in zip(indices, listed, strict=True):
                pairs[index] = pair
        return pairs

    def encode_listing(
        self, query: str, documents: Sequence[str], instruction: str | None, side: str = "right"
    ) -> list[ListwisePair]:
        """The documents' pairs in one listing: texts cut, windows formed, prompts tokenized."""
        ((query, query_tokens, _),) = self.truncate_texts([query], MAX_QUERY_TOKENS, "right")
        cut = self.truncate_texts(documents, self.max_length, side)
        spans = self.windows([length for _, length, _ in cut], query_tokens)
        windows, shares = [], []
        for span in spans:
            prompt = self.prompt(query, [cut[i][0] for i in span], instruction)
            window = self._window(list(self.tokenizer(prompt)["input_ids"]), len(span))
            windows.append(window)
            ends = [p + 1 for p in window.document_positions[:-1]] + [len(window.input_ids)]
            starts = [0, *ends[:-1]]
            shares += [window.input_ids[a:b] for a, b in zip(starts, ends, strict=True)]
        listing = Listing(tuple(windows))
        return [
            ListwisePair(ids, cut_tokens=dropped, listing=listing, document=i)
            for i, (ids, (_, _, dropped)) in enumerate(zip(shares, cut, strict=True))
        ]

    def truncate_texts(
        self, texts: Sequence[str], limit: int, side: str
    ) -> list[tuple[str, int, int]]:
        """(text, its kept token count, tokens cut) of each text as `_truncate_texts` cuts it:
        tokenized alone with the tokenizer's defaults, and at `limit` tokens or more replaced
        by the kept tokens' decoding (`side="left"` keeps the end instead)."""
        out: list[tuple[str, int, int]] = []
        if not texts:
            return out
        for text, ids in zip(texts, self.tokenizer(list(texts))["input_ids"], strict=True):
            kept = ids[:limit] if side == "right" else ids[-limit:]
            if len(ids) >= limit:
                text = self.tokenizer.decode(kept)
            out.append((text, len(kept), len(ids) - len(kept)))
        return out

    def windows(self, lengths: Sequence[int], query_tokens: int) -> list[range]:
        """Documents (by index) in each window, given their token counts (see the docstring)."""
        room = self.window_tokens - 2 * query_tokens
        spans, start, left = [], 0, room
        for index, length in enumerate(lengths):
            left -= length
            if index + 1 - start >= WINDOW_DOCUMENTS or left <= self.max_length:
                spans.append(range(start, index + 1))
                start, left = index + 1, room
        if start < len(lengths):
            spans.append(range(start, len(lengths)))
        return spans

    def prompt(self, query: str, documents: Sequence[str], instruction: str | None) -> str:
        """One window's prompt text (`format_docs_prompts_func`, no thinking)."""
        query = sanitize(query)
        text = (
            f"I will provide you with {len(documents)} passages, each indicated by a numerical "
            f"identifier. Rank the passages based on their relevance to query: {query}\n"
        )
        if instruction:
            text += f"<instruct>\n{sanitize(instruction)}\n</instruct>\n"
        passages = (
            f'<passage id="{i}">\n{sanitize(d)}{DOCUMENT_TOKEN}\n</passage>'
            for i, d in enumerate(documents)
        )
        text += "\n".join(passages) + "\n"
        text += f"<query>\n{query}{QUERY_TOKEN}\n</query>"
        return PREFIX + text + SUFFIX

    def _window(self, ids: list[int], num_documents: int) -> ListwiseWindow:
        documents = tuple(i for i, t in enumerate(ids) if t == self.document_token_id)
        queries = [i for i, t in enumerate(ids) if t == self.query_token_id]
        if len(documents) != num_documents or len(queries) != 1 or queries[0] < documents[-1]:
            # the special tokens are removed from every text: only a tokenizer that builds
            # them from other text gets here
            raise InvalidRequest(
                f"the prompt of {num_documents} documents holds {len(documents)} document and "
                f"{len(queries)} query marker tokens; the texts could not be encoded"
            )
        return ListwiseWindow(tuple(ids), documents, queries[0])

    def _too_long(self, index: int, pair: EncodedPair) -> InvalidRequest:
        return InvalidRequest(
            f"document {index} is {self.max_length + pair.cut_tokens} tokens, more than this "
            f"model's limit of {self.max_length} tokens per document, and truncate is false; "
            "shorten it or send truncate: true to cut its end",
            param=f"documents[{index}]",
        )


def sanitize(text: str) -> str:
    """`text` without the two special tokens (the reference's `sanitize_input`, repeated until
    none is left: a nested "<|embed<|embed_token|>_token|>" would rebuild one)."""
    while True:
        clean = text.replace(QUERY_TOKEN, "").replace(DOCUMENT_TOKEN, "")
        if clean == text:
            return clean
        text = clean
