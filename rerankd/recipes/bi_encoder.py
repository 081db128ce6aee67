"""Bi-encoders: sentence-transformers embedding models (all-MiniLM-L6-v2, …) used as rerankers.

score = cosine(mean_pool(encode(query)), mean_pool(encode(document))), each text encoded on
its own with the tokenizer's special tokens (BERT `[CLS] text [SEP]`) and cut at its end to
the model's `max_seq_length` (sentence_bert_config.json; else the tokenizer's limit capped by
the position embeddings). Mean pooling weighs tokens by the attention mask (padding never
counts). raw = the cosine in [-1, 1]; activated = (cosine + 1) / 2.

The recipe contract stays "a pair → token ids, one raw score per pair": a pair is an
`EncodedTwin`, an `EncodedPair` whose `input_ids` are the query's sequence followed by the
document's, with `split` marking where the document's starts. Its length is what the pair
costs (both sequences), for batching and usage. Only the embedding engine
(`rerankd/engine/embedding_engine.py`) reads `split`: it embeds each distinct sequence of a
batch once — a rerank request's query once — and returns cosines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.recipes.base import Recipe, ScoreHead
from rerankd.recipes.cross_encoder import POSITION_OFFSET, UNSET_MAX_LENGTH
from rerankd.types import EncodedPair, EncodedTwin

__all__ = ["BiEncoder", "EncodedTwin", "checkpoint_dir"]

#: sentence-transformers modules that leave mean-pooled cosines unchanged (Normalize does
#: not change a cosine); anything else (Dense, LayerNorm, …) would change the embeddings
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceTransformerInfo:
    """What rerankd needs from a sentence-transformers checkpoint's own files."""

    max_seq_length: int | None = None
    do_lower_case: bool = False


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sentence_transformer_info(model_dir: Path | str | None) -> SentenceTransformerInfo | None:
    """The checkpoint's sentence-transformers settings when it is a mean-pooling bi-encoder
    rerankd can serve; None when it has no sentence-transformers files.

    Raises ModelLoadError when the files describe a pipeline rerankd cannot reproduce
    (another pooling, extra Dense layers, a similarity other than cosine).
    """
    if model_dir is None:
        return None
    root = Path(model_dir)
    modules_file, pooling_file = root / "modules.json", root / "1_Pooling" / "config.json"
    if not modules_file.is_file() and not pooling_file.is_file():
        return None
    try:
        if modules_file.is_file():
            modules = _read_json(modules_file)
            for module in modules:
                kind = str(module.get("type", "")).rsplit(".", 1)[-1]
                if kind not in _SUPPORTED_MODULES:
                    raise ModelLoadError(
                        f"this sentence-transformers checkpoint has a {kind!r} module; the "
                        "bi-encoder recipe supports Transformer → mean Pooling (→ Normalize) only"
                    )
                if kind == "Pooling":
                    pooling_file = root / module.get("path", "1_Pooling") / "config.json"
        pooling = _read_json(pooling_file) if pooling_file.is_file() else {}
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
        if pooling and modes != ["pooling_mode_mean_tokens"]:
            raise ModelLoadError(
                f"this sentence-transformers checkpoint pools with {', '.join(modes) or 'nothing'};"
                " the bi-encoder recipe supports mean pooling (pooling_mode_mean_tokens) only"
            )
        st_config = root / "config_sentence_transformers.json"
        similarity = (
            _read_json(st_config).get("similarity_fn_name") if st_config.is_file() else None
        )
        if similarity not in (None, "cosine"):
            raise ModelLoadError(
                f"this checkpoint scores with {similarity!r} similarity; the bi-encoder recipe "
                "computes cosine similarity only"
            )
        bert_config = root / "sentence_bert_config.json"
        settings = _read_json(bert_config) if bert_config.is_file() else {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(
            f"could not read the sentence-transformers files in {str(root)!r}: {exc}"
        ) from exc
    max_seq_length = settings.get("max_seq_length")
    return SentenceTransformerInfo(
        max_seq_length=int(max_seq_length) if max_seq_length else None,
        do_lower_case=bool(settings.get("do_lower_case", False)),
    )


def is_mean_pooling_bi_encoder(config: Any, model_dir: Path | str | None) -> bool:
    """Detection: a plain encoder (no `*ForSequenceClassification` head) shipped with
    sentence-transformers files that describe mean pooling."""
    architectures = list(getattr(config, "architectures", None) or [])
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return False
    try:
        return sentence_transformer_info(model_dir) is not None
    except ModelLoadError:
        return False


def checkpoint_dir(config: Any) -> Path | None:
    """The directory a transformers config was loaded from, when it is one."""
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if isinstance(name, (str, Path)) and name and Path(name).is_dir():
        return Path(name)
    return None


class BiEncoder(Recipe):
    name = "bi-encoder"
    architectures = ()  # detected from sentence-transformers files, see `detect_recipe`

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        max_model_len: int | None = None,
        model_dir: Path | str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else checkpoint_dir(config)
        # a forced `--recipe bi-encoder` without sentence-transformers files: mean pooling
        self.info = sentence_transformer_info(self.model_dir) or SentenceTransformerInfo()
        super().__init__(tokenizer, config, max_model_len)
        # A private Rust tokenizer without truncation/padding (some checkpoints ship
        # tokenizer.json with fixed padding): we alone decide where to cut.
        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._num_special = self._tok.num_special_tokens_to_add(is_pair=False)
        self.room = self.max_length - self._num_special
        if self.room <= 0:
            raise ValueError(f"max length {self.max_length} leaves no room for text")

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="cosine")

    def _max_length(self, max_model_len: int | None) -> int:
        limits = []
        if self.info.max_seq_length:
            limits.append(self.info.max_seq_length)
        else:
            tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
            if tokenizer_max and tokenizer_max < UNSET_MAX_LENGTH:
                limits.append(int(tokenizer_max))
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions:
            limits.append(positions - POSITION_OFFSET.get(self.config.model_type, 0))
        if max_model_len is not None:
            limits.append(max_model_len)
        return min(limits) if limits else 512

    def activate(self, raw: float) -> float:
        """Cosine in [-1, 1] → [0, 1]."""
        return min(1.0, max(0.0, (raw + 1.0) / 2.0))

    def _sequences(self, texts: Sequence[str], side: str) -> list[tuple[tuple[int, ...], int]]:
        """Each text as the model sees it alone (special tokens added), and its cut tokens."""
        if self.info.do_lower_case:
            texts = [text.lower() for text in texts]
        out = []
        for enc in self._tok.encode_batch(list(texts), add_special_tokens=False):
            cut = max(0, len(enc.ids) - self.room)
            if cut:
                enc.truncate(self.room, direction=side)
            out.append((tuple(self._tok.post_process(enc, None, add_special_tokens=True).ids), cut))
        return out

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        unique = list(dict.fromkeys(queries))
        # queries are always cut at their end (sentence-transformers' truncation)
        encoded_queries = dict(zip(unique, self._sequences(unique, "right"), strict=True))
        pairs: list[EncodedPair] = []
        for query, (doc_ids, doc_cut) in zip(
            queries, self._sequences(documents, side), strict=True
        ):
            query_ids, query_cut = encoded_queries[query]
            pairs.append(
                EncodedTwin(
                    query_ids + doc_ids,
                    None,
                    query_cut + doc_cut,
                    split=len(query_ids),
                    query_cut=query_cut,
                )
            )
        return pairs

    def _too_long(self, index: int, pair: EncodedPair) -> InvalidRequest:
        if isinstance(pair, EncodedTwin) and pair.query_cut:
            return InvalidRequest(
                f"the query is {len(pair.query_ids) + pair.query_cut} tokens, more than this "
                f"model's limit of {self.max_length} tokens, and truncate is false; shorten it "
                "or send truncate: true to cut its end",
                param="query",
            )
        document_ids = pair.document_ids if isinstance(pair, EncodedTwin) else pair.input_ids
        return InvalidRequest(
            f"document {index} is {len(document_ids) + pair.cut_tokens} tokens, more than this "
            f"model's limit of {self.max_length} tokens, and truncate is false; shorten it or "
            "send truncate: true to cut it",
            param=f"documents[{index}]",
        )
