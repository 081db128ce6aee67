"""Late interaction (ColBERT): per-token embeddings, scored by MaxSim.

score = Σ_i max_j q_i · d_j over the query's token embeddings q_i and the document's d_j, both
L2-normalized (PyLate's `colbert_scores`). The query and the document are encoded apart, as
PyLate's `ColBERT.tokenize` prepares them (PyLate 1.6 on sentence-transformers 5.3):

- the text (after the default prompt, when config_sentence_transformers.json names one) is
  stripped (`str.strip`) and lowercased when sentence_bert_config.json says so;
- it is tokenized with the tokenizer's special tokens and cut at its end to `length - 1`
  tokens (`query_length` / `document_length`), then the marker token (`query_prefix` /
  `document_prefix`, e.g. "[Q] " / "[D] ", or stanford's "[unused0]" / "[unused1]") is
  inserted at index 1, after [CLS] / <s>;
- a query is padded to `query_length` with [MASK] (query expansion, when
  `do_query_expansion`); the other tokens attend to those expansion tokens only when
  `attend_to_expansion_tokens`, but every query token's embedding counts in MaxSim;
- a document keeps no embedding of a token in the skiplist (`skiplist_words`, by default
  the ASCII punctuation, each looked up as one token: absent ones map to the unknown token).

The score is returned raw (no activation), whatever `use_activation` says, as vLLM's late
interaction scoring does: a MaxSim has no probability.

The checkpoint comes in PyLate's layout (sentence-transformers modules.json: Transformer then
one or more `pylate.models.Dense`, settings in config_sentence_transformers.json) or in
stanford-futuredata ColBERT's (`HF_ColBERT` weights holding a `linear` projection, settings in
artifact.metadata). Pairs are `ColbertTwin`s (query sequence ‖ document sequence, as the
bi-encoder's); the late-interaction engine (`rerankd/engine/late_interaction.py`) encodes each
distinct sequence once and computes MaxSim.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.recipes.base import Recipe, ScoreHead
from rerankd.recipes.bi_encoder import checkpoint_dir
from rerankd.recipes.cross_encoder import POSITION_OFFSET
from rerankd.types import EncodedPair, EncodedTwin

#: PyLate's defaults when a checkpoint's files do not say (models/colbert.py)
DEFAULT_QUERY_PREFIX, DEFAULT_DOCUMENT_PREFIX = "[Q] ", "[D] "
STANFORD_QUERY_PREFIX, STANFORD_DOCUMENT_PREFIX = "[unused0]", "[unused1]"
DEFAULT_QUERY_LENGTH, DEFAULT_DOCUMENT_LENGTH = 32, 180
#: the only Dense activation PyLate checkpoints use (its Dense drops any other on load)
_IDENTITY = "torch.nn.modules.linear.Identity"


@dataclass(frozen=True)
class ColbertTwin(EncodedTwin):
    """A late-interaction pair: query sequence ‖ document sequence (see `EncodedTwin`).

    `query_keys`: how many of the query's first tokens the others attend to (its real tokens,
    or all of them when expansion tokens are attended to); every query token is embedded."""

    query_keys: int = 0


@dataclass(frozen=True)
class ColbertInfo:
    """What rerankd needs from a ColBERT checkpoint's own files."""

    layout: str  # "pylate" or "stanford"
    query_prefix: str = DEFAULT_QUERY_PREFIX
    document_prefix: str = DEFAULT_DOCUMENT_PREFIX
    query_length: int = DEFAULT_QUERY_LENGTH
    document_length: int = DEFAULT_DOCUMENT_LENGTH
    do_query_expansion: bool = True
    attend_to_expansion_tokens: bool = False
    skiplist_words: tuple[str, ...] = tuple(string.punctuation)
    do_lower_case: bool = False
    #: sentence-transformers' default prompt (`prompts[default_prompt_name]`), which PyLate's
    #: `encode` puts before every query and document
    prompt: str = ""
    #: PyLate layout: the Dense modules' directories, in order (stanford: `linear` weights)
    dense_dirs: tuple[Path, ...] = ()


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def colbert_info(config: Any, model_dir: Path | str | None) -> ColbertInfo | None:
    """The checkpoint's ColBERT settings, or None when it is not a ColBERT checkpoint.

    PyLate's layout: modules.json lists a Transformer followed by Dense modules (PyLate's or
    sentence-transformers'), and config_sentence_transformers.json says `"model_type":
    "ColBERT"` or holds query/document settings. Stanford's: config.json's architectures is
    `HF_ColBERT`. Raises ModelLoadError for a ColBERT checkpoint rerankd cannot reproduce.
    """
    root = Path(model_dir) if model_dir is not None else None
    architectures = list(getattr(config, "architectures", None) or [])
    try:
        if root is not None and (root / "modules.json").is_file():
            info = _pylate_info(root)
            if info is not None:
                return info
        if architectures[:1] == ["HF_ColBERT"]:
            return _stanford_info(root)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"could not read the ColBERT files in {str(root)!r}: {exc}") from exc
    return None


def _pylate_info(root: Path) -> ColbertInfo | None:
    st_file = root / "config_sentence_transformers.json"
    settings = _read_json(st_file) if st_file.is_file() else {}
    modules = _read_json(root / "modules.json")
    kinds = [str(m.get("type", "")) for m in modules]
    dense = [m for m, kind in zip(modules, kinds, strict=True) if kind.endswith("Dense")]
    is_colbert = settings.get("model_type") == "ColBERT" or any("pylate" in k for k in kinds)
    if not is_colbert:
        return None
    names = [kind.rsplit(".", 1)[-1] for kind in kinds]
    if names[:1] != ["Transformer"] or set(names[1:]) - {"Dense"}:
        raise ModelLoadError(
            f"this PyLate checkpoint's modules are {names}; the colbert recipe supports "
            "Transformer followed by Dense projections only"
        )
    dense_dirs = []
    for module in dense:
        path = root / module.get("path", "")
        dense_config = _read_json(path / "config.json")
        activation = dense_config.get("activation_function", _IDENTITY)
        if activation != _IDENTITY:
            raise ModelLoadError(
                f"the Dense module in {str(path)!r} has activation {activation!r}; PyLate "
                "projections are linear (Identity)"
            )
        dense_dirs.append(path)
    bert_config = root / "sentence_bert_config.json"
    lower = (
        bool(_read_json(bert_config).get("do_lower_case", False))
        if bert_config.is_file()
        else False
    )
    default = settings.get("default_prompt_name")
    prompt = str((settings.get("prompts") or {}).get(default) or "") if default else ""
    info = ColbertInfo("pylate", do_lower_case=lower, prompt=prompt, dense_dirs=tuple(dense_dirs))
    return _with_settings(info, settings)


def _stanford_info(root: Path | None) -> ColbertInfo:
    """artifact.metadata (colbert-ai's ColBERTConfig), read the way PyLate converts it."""
    meta_file = root / "artifact.metadata" if root is not None else None
    meta = _read_json(meta_file) if meta_file is not None and meta_file.is_file() else {}
    settings = {
        "query_prefix": meta.get("query_token_id") or STANFORD_QUERY_PREFIX,
        "document_prefix": meta.get("doc_token_id") or STANFORD_DOCUMENT_PREFIX,
        "query_length": meta.get("query_maxlen"),
        "document_length": meta.get("doc_maxlen"),
        "attend_to_expansion_tokens": meta.get("attend_to_mask_tokens"),
    }
    return _with_settings(ColbertInfo("stanford"), settings)


def _with_settings(info: ColbertInfo, settings: dict[str, Any]) -> ColbertInfo:
    """`info` with the settings a file gives (None or absent: PyLate's default)."""
    updates: dict[str, Any] = {}
    for key, cast in (
        ("query_prefix", str),
        ("document_prefix", str),
        ("query_length", int),
        ("document_length", int),
        ("do_query_expansion", bool),
        ("attend_to_expansion_tokens", bool),
        ("skiplist_words", tuple),
    ):
        if settings.get(key) is not None:
            updates[key] = cast(settings[key])
    fields = {**info.__dict__, **updates}
    if not fields["do_query_expansion"]:  # PyLate: no expansion, nothing to attend to
        fields["attend_to_expansion_tokens"] = False
    return ColbertInfo(**fields)


class ColbertReranker(Recipe):
    name = "colbert"
    architectures = ("HF_ColBERT",)

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        max_model_len: int | None = None,
        model_dir: Path | str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else checkpoint_dir(config)
        info = colbert_info(config, self.model_dir)
        if info is None:  # a forced `--recipe colbert` on other files: PyLate's defaults
            info = ColbertInfo("pylate")
        self.info = info
        self._positions = _position_limit(config)
        self.query_length = min(info.query_length, self._positions)
        super().__init__(tokenizer, config, max_model_len)
        # A private Rust tokenizer without truncation/padding: we alone decide where to cut.
        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._num_special = self._tok.num_special_tokens_to_add(is_pair=False)
        self.query_prefix_id = self._marker_id(info.query_prefix, "query_prefix")
        self.document_prefix_id = self._marker_id(info.document_prefix, "document_prefix")
        # PyLate pads the query with [MASK] (else EOS, else the pad token)
        pad = next(
            (
                t
                for t in (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                if t is not None
            ),
            None,
        )
        if pad is None and info.do_query_expansion:
            raise ModelLoadError(
                "query expansion needs a [MASK], EOS or pad token; this tokenizer has none"
            )
        self.expansion_id = pad
        self.skiplist_ids = frozenset(
            i
            for i in (tokenizer.convert_tokens_to_ids(w) for w in info.skiplist_words)
            if i is not None
        )
        for side, limit, marker in (
            ("query", self.query_length, self.query_prefix_id),
            ("document", self.max_length, self.document_prefix_id),
        ):
            if self._room(limit, marker) <= 0:
                raise ModelLoadError(f"the {side} length {limit} leaves no room for text")

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="maxsim")

    @property
    def dense_dirs(self) -> tuple[Path, ...]:
        return self.info.dense_dirs

    def _max_length(self, max_model_len: int | None) -> int:
        """The document's limit: `document_length`, capped by the positions and the user."""
        limits = [self.info.document_length, self._positions]
        if max_model_len is not None:
            limits.append(max_model_len)
        return min(limits)

    def activate(self, raw: float) -> float:
        """MaxSim is returned raw (no activation), as vLLM's late-interaction scoring does."""
        return raw

    def _marker_id(self, marker: str, key: str) -> int | None:
        if marker == "":
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(marker)
        if token_id is None or (
            token_id == self.tokenizer.unk_token_id and marker != self.tokenizer.unk_token
        ):
            # PyLate would add it to the vocabulary and grow the embeddings with a fresh,
            # untrained row: no trained checkpoint is in that state
            raise ModelLoadError(
                f"the {key} {marker!r} is not a token of this checkpoint's tokenizer"
            )
        return int(token_id)

    def _room(self, limit: int, marker: int | None) -> int:
        return limit - self._num_special - (marker is not None)

    def _sequences(
        self, texts: Sequence[str], is_query: bool, side: str
    ) -> list[tuple[tuple[int, ...], int]]:
        """Each text as PyLate encodes it alone, and how many of its tokens were cut."""
        texts = [(self.info.prompt + text).strip() for text in texts]
        if self.info.do_lower_case:
            texts = [text.lower() for text in texts]
        limit = self.query_length if is_query else self.max_length
        marker = self.query_prefix_id if is_query else self.document_prefix_id
        room = self._room(limit, marker)
        out = []
        for enc in self._tok.encode_batch(texts, add_special_tokens=False):
            cut = max(0, len(enc.ids) - room)
            if cut:
                enc.truncate(room, direction=side)
            ids = list(self._tok.post_process(enc, None, add_special_tokens=True).ids)
            if marker is not None:
                ids.insert(1, marker)  # after [CLS] / <s> (index 1, as PyLate inserts it)
            out.append((tuple(ids), cut))
        return out

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        unique = list(dict.fromkeys(queries))
        encoded = {}
        for query, (ids, cut) in zip(unique, self._sequences(unique, True, "right"), strict=True):
            keys = len(ids)
            if self.info.do_query_expansion:
                ids = ids + (self.expansion_id,) * (self.query_length - len(ids))
                if self.info.attend_to_expansion_tokens:
                    keys = len(ids)
            encoded[query] = (ids, cut, keys)
        pairs: list[EncodedPair] = []
        for query, (doc_ids, doc_cut) in zip(
            queries, self._sequences(documents, False, side), strict=True
        ):
            query_ids, query_cut, keys = encoded[query]
            pairs.append(
                ColbertTwin(
                    query_ids + doc_ids,
                    None,
                    query_cut + doc_cut,
                    split=len(query_ids),
                    query_cut=query_cut,
                    query_keys=keys,
                )
            )
        return pairs

    def _too_long(self, index: int, pair: EncodedPair) -> InvalidRequest:
        if isinstance(pair, EncodedTwin) and pair.query_cut:
            return InvalidRequest(
                f"the query is more than this model's query length of {self.query_length} "
                "tokens and truncate is false; shorten it or send truncate: true to cut its end",
                param="query",
            )
        document_ids = pair.document_ids if isinstance(pair, EncodedTwin) else pair.input_ids
        return InvalidRequest(
            f"document {index} is {len(document_ids) + pair.cut_tokens} tokens, more than this "
            f"model's document length of {self.max_length} tokens, and truncate is false; "
            "shorten it or send truncate: true to cut it",
            param=f"documents[{index}]",
        )


def _position_limit(config: Any) -> int:
    """Tokens the backbone's position embeddings allow (RoPE backbones: a large bound)."""
    positions = getattr(config, "max_position_embeddings", None) or 1 << 20
    return positions - POSITION_OFFSET.get(getattr(config, "model_type", ""), 0)
