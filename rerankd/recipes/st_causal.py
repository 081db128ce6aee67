"""Causal-LM rerankers saved in sentence-transformers' format (>= 5.4 / 6.x), read generically.

A checkpoint that ships `modules.json` = [Transformer (text-generation), LogitScore] declares
its own scoring (zerank-2, Qwen3-Reranker's ST revision, …). It is served the way
`sentence_transformers.CrossEncoder.predict` scores it, so new rerankers in that format need no
new code:

- the pair becomes messages `[system: prompt]? + [query: Q] + [document: D]` (content a plain
  string, or `[{"type": "text", …}]` for the "structured" message format), rendered by the
  checkpoint's chat template with the `processing_kwargs["chat_template"]` of its
  `sentence_bert_config.json` (e.g. `add_generation_prompt`), then tokenized whole without
  special tokens;
- prompt: the request's `instruction` (ST's `prompt=`), else the config's default prompt
  (`prompts[default_prompt_name]`); an empty instruction means no system message;
- truncation as ST: the rendered prompt is cut at its end to the max length, then the
  template's closing tokens (the common token suffix of two renders with different fillers)
  are written back over the last tokens of every row that reached the limit;
- raw = logit[true_token_id] (− logit[false_token_id]) at the last position (LogitScore);
  activated = sigmoid(raw) whatever the config's `activation_fn` (zerank-2's is Identity:
  its `predict` returns raw, and rerankd's raw score equals it).

Max length: `sentence_bert_config.json`'s `max_seq_length`, else the tokenizer's limit capped
by `max_position_embeddings` (as ST loads it); `--max-model-len` sets it as
`CrossEncoder(max_length=…)` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rerankd.errors import ModelLoadError
from rerankd.recipes.base import Recipe, ScoreHead
from rerankd.types import EncodedPair

#: the score modules ST has called its logit head (6.x LogitScore; an earlier CausalScoreHead)
SCORE_MODULES = ("LogitScore", "CausalScoreHead")
#: apply_chat_template size kwargs ST takes out of the template's kwargs
_SIZE_KWARGS = ("padding", "truncation", "max_length", "return_tensors")
#: ST's fillers for deriving the template's closing tokens (`_chat_template_suffix_ids`)
_FILLERS = ("0", "1 2 3 4")


@dataclass(frozen=True)
class StCausalInfo:
    """What rerankd reads from a sentence-transformers causal-LM cross-encoder's files."""

    true_token_id: int
    false_token_id: int | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    restore_suffix: bool = True
    structured: bool = False
    max_seq_length: int | None = None
    max_length_override: int | None = None
    prompt: str | None = None
    activation_fn: str | None = None


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def st_causal_info(model_dir: Path | str | None) -> StCausalInfo | None:
    """The checkpoint's ST causal-LM scoring, or None when it declares none (no modules.json,
    or no LogitScore-style module). Raises ModelLoadError when it declares a pipeline rerankd
    cannot reproduce: serving it another way would give silently wrong scores."""
    if model_dir is None:
        return None
    files = _read_st_files(Path(model_dir))
    if files is None:
        return None
    score, settings, st_config = files
    _check_transformer_settings(settings)
    processing = settings.get("processing_kwargs") or {}
    template_kwargs = dict(processing.get("chat_template") or {})
    restore = bool(template_kwargs.pop("restore_suffix", True))
    text_kwargs = {**(processing.get("common") or {}), **(processing.get("text") or {})}
    size = {
        **text_kwargs,
        **{k: template_kwargs.pop(k) for k in _SIZE_KWARGS if k in template_kwargs},
    }
    if size.get("truncation") in (False, "do_not_truncate"):
        raise ModelLoadError("this checkpoint turns truncation off; rerankd always truncates")
    message = (settings.get("modality_config") or {}).get("message") or {}
    prompts = st_config.get("prompts") or {}
    default_name = st_config.get("default_prompt_name")
    return StCausalInfo(
        true_token_id=int(score["true_token_id"]),
        false_token_id=None
        if score.get("false_token_id") is None
        else int(score["false_token_id"]),
        chat_template_kwargs=template_kwargs,
        restore_suffix=restore,
        structured=message.get("format") == "structured",
        max_seq_length=int(settings["max_seq_length"]) if settings.get("max_seq_length") else None,
        max_length_override=int(size["max_length"]) if size.get("max_length") else None,
        prompt=prompts.get(default_name) if default_name else None,
        activation_fn=st_config.get("activation_fn"),
    )


def _read_st_files(root: Path) -> tuple[dict, dict, dict] | None:
    """(the score module's config, the Transformer's sentence_bert_config,
    config_sentence_transformers) of a Transformer → LogitScore checkpoint; None without a
    LogitScore-style module; ModelLoadError for another chain or unreadable files."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = _read_json(modules_file)
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if not any(kind in SCORE_MODULES for kind in kinds):
            return None
        if len(kinds) != 2 or kinds[0] != "Transformer" or kinds[1] not in SCORE_MODULES:
            raise ModelLoadError(
                f"this sentence-transformers cross-encoder chains {' → '.join(kinds)}; rerankd "
                "reproduces Transformer → LogitScore only"
            )
        transformer_dir = root / (modules[0].get("path") or "")
        score = _read_json(root / modules[1]["path"] / "config.json")
        bert_file = transformer_dir / "sentence_bert_config.json"
        settings = _read_json(bert_file) if bert_file.is_file() else {}
        st_file = root / "config_sentence_transformers.json"
        st_config = _read_json(st_file) if st_file.is_file() else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"could not read the sentence-transformers files in {str(root)!r}: {exc}"
        ) from exc
    return score, settings, st_config


def _check_transformer_settings(settings: dict) -> None:
    """Refuse what rerankd does not reproduce: a non-causal task, lowercasing, expansion."""
    task = settings.get("transformer_task", "text-generation")
    if task != "text-generation":
        raise ModelLoadError(
            f"this checkpoint's LogitScore reads a {task!r} Transformer; rerankd reproduces "
            "text-generation (causal LM) only"
        )
    if settings.get("do_lower_case") or settings.get("query_expansion"):
        raise ModelLoadError(
            "this sentence-transformers cross-encoder lowercases or expands its inputs; rerankd "
            "does not reproduce that"
        )


class StCausalReranker(Recipe):
    name = "st-causal-lm"
    architectures = ()  # detected from the sentence-transformers files, before any architecture
    supports_instruction = True

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        max_model_len: int | None = None,
        model_dir: Path | str | None = None,
    ) -> None:
        info = st_causal_info(model_dir)
        if info is None:
            raise ModelLoadError(
                f"--recipe {self.name} needs a sentence-transformers cross-encoder with a "
                "LogitScore module (modules.json), which this checkpoint does not have"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                "this sentence-transformers cross-encoder has no chat template to render pairs"
            )
        self.info = info
        super().__init__(tokenizer, config, max_model_len)
        self._suffixes: dict[str | None, list[int]] = {}

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(
            kind="lm_rows",
            positive_token_id=self.info.true_token_id,
            negative_token_id=self.info.false_token_id,
        )

    def _max_length(self, max_model_len: int | None) -> int:
        context = getattr(self.config, "max_position_embeddings", None)
        if self.info.max_length_override is not None:
            length = self.info.max_length_override
        elif self.info.max_seq_length is not None:
            length = self.info.max_seq_length
        else:  # ST caps the tokenizer's limit by the position embeddings
            length = min(int(self.tokenizer.model_max_length), context or 1 << 30)
        if max_model_len is not None:  # CrossEncoder(max_length=...)
            length = max_model_len
        return min(length, context) if context else length

    # --- rendering ---------------------------------------------------------------------------

    def _prompt(self, instruction: str | None) -> str | None:
        """ST's `_resolve_prompt`: the request's prompt, else the default; "" means none."""
        return self.info.prompt if instruction is None else (instruction or None)

    def _messages(self, prompt: str | None, query: str, document: str) -> list[dict[str, Any]]:
        def content(text: str) -> Any:
            return [{"type": "text", "text": text}] if self.info.structured else text

        messages = [{"role": "system", "content": content(prompt)}] if prompt else []
        return messages + [
            {"role": "query", "content": content(query)},
            {"role": "document", "content": content(document)},
        ]

    def _render(self, prompt: str | None, query: str, document: str) -> str:
        return self.tokenizer.apply_chat_template(
            self._messages(prompt, query, document),
            tokenize=False,
            **self.info.chat_template_kwargs,
        )

    def _suffix(self, prompt: str | None) -> list[int]:
        """The template's closing tokens after the pair (ST's `_chat_template_suffix_ids`):
        the common token suffix of two renders whose query and document are fillers."""
        if prompt not in self._suffixes:
            first, second = (
                self.encode_text(self._render(prompt, filler, filler)) for filler in _FILLERS
            )
            count = 0
            for left, right in zip(reversed(first), reversed(second), strict=False):
                if left != right:
                    break
                count += 1
            valid = 0 < count < min(len(first), len(second))
            self._suffixes[prompt] = first[len(first) - count :] if valid else []
        return self._suffixes[prompt]

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        prompt = self._prompt(instruction)
        limit = self.max_length
        texts = [self._render(prompt, q, d) for q, d in zip(queries, documents, strict=True)]
        pairs = []
        for index, ids in enumerate(self.encode_texts(texts)):
            cut = max(0, len(ids) - limit)
            if cut and side == "left":
                ids = self._keep_document_end(prompt, queries[index], documents[index], limit)
            ids = ids[:limit]
            if len(ids) >= limit and self.info.restore_suffix:  # ST: rows that reached the limit
                suffix = self._suffix(prompt)
                keep = min(len(suffix), len(ids))
                if keep:
                    ids[len(ids) - keep :] = suffix[len(suffix) - keep :]
            pairs.append(EncodedPair(tuple(ids), None, cut))
        return pairs

    def _keep_document_end(
        self, prompt: str | None, query: str, document: str, limit: int
    ) -> list[int]:
        """`side="left"`: drop the document's first tokens (whole tokens of its own
        tokenization) until the rendered pair fits; the template stays whole. Falls back to
        ST's cut when even an empty document does not fit."""
        offsets = self.token_offsets(document)
        ids = self.encode_text(self._render(prompt, query, document))
        drop = 0
        while len(ids) > limit and drop < len(offsets):
            drop = min(len(offsets), drop + len(ids) - limit)
            start = offsets[drop][0] if drop < len(offsets) else len(document)
            ids = self.encode_text(self._render(prompt, query, document[start:]))
        return ids
