"""The recipe contract: text → token ids, and which model output is the score.

A recipe reproduces a model card's prompt token for token. It owns the tokenizer and
everything about text; it never touches tensors (the engine does, guided by `ScoreHead`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rerankd.errors import InvalidRequest
from rerankd.types import EncodedPair


@dataclass(frozen=True)
class ScoreHead:
    """Which output of the model is the raw score.

    - ``lm_rows``: a causal LM; raw = h_last · (W[positive] − W[negative]) where W is the LM
      head. Only those rows are ever used, never the full vocabulary.
    - ``classifier``: the checkpoint's own one-label classification head (logit 0).
    """

    kind: str
    positive_token_id: int | None = None
    negative_token_id: int | None = None


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

    # --- to implement ---------------------------------------------------------------------

    @property
    @abstractmethod
    def head(self) -> ScoreHead: ...

    @abstractmethod
    def _max_length(self, max_model_len: int | None) -> int:
        """The recipe's token limit, given the user's `--max-model-len` cap."""

    @abstractmethod
    def _encode_pairs(
        self, queries: Sequence[str], documents: Sequence[str], instruction: str | None
    ) -> list[EncodedPair]:
        """Tokenize aligned (query, document) pairs, truncating as the model card does."""

    # --- shared behaviour -----------------------------------------------------------------

    def encode(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None = None,
        truncate: bool = True,
    ) -> list[EncodedPair]:
        """Encode aligned pairs; with ``truncate=False`` a pair that needed cutting is a 400."""
        if len(queries) != len(documents):
            raise ValueError("queries and documents must be aligned; this is a bug")
        pairs = self._encode_pairs(queries, documents, instruction)
        if not truncate:
            for index, pair in enumerate(pairs):
                if pair.truncated:
                    full = len(pair) + pair.cut_tokens
                    raise InvalidRequest(
                        f"document {index} is {full} tokens with the prompt, more than this "
                        f"model's limit of {self.max_length} tokens, and truncate is false; "
                        "shorten it or send truncate: true to cut its end",
                        param=f"documents[{index}]",
                    )
        return pairs

    def activate(self, raw: float) -> float:
        """The model's activation: a probability in [0, 1]."""
        return sigmoid(raw)

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
