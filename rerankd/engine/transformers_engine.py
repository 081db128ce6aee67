"""The transformers engine: transformers models, padded length-sorted sub-batches, only the
needed logits; the generic fallback for architectures the packed engine has no code for.

Decoder rerankers (Qwen3, Gemma) run the base model and score only the last real token:
for LM-head recipes h · (W[yes] − W[no]) (or h · W[Yes]) — two rows of the head, never the
vocabulary. Encoders run their own classification head. Same contract as every engine
(`score(batch) -> raw scores`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rerankd.engine.base import default_batch_tokens, run_padded
from rerankd.types import Batch, EncodedPair, ScoreHead

log = logging.getLogger(__name__)


class TransformersEngine:
    """Scores batches with a transformers model; padded, but sorted to waste little."""

    def __init__(
        self,
        model_dir: Path,
        head: ScoreHead,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.name = "transformers"
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device, self._dtype = device, dtype
        self.default_batch_tokens = default_batch_tokens(device, padded=True)
        self.max_padded_tokens = max_batch_tokens or self.default_batch_tokens
        self.pad_id = 0
        if head.kind == "lm_rows":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            self._base = model.get_decoder()
            self._head_weight = lm_head_rows(model, head, device)
            self._head_bias = None
            self._encoder = None
            del model  # drops the full LM head when it is not tied to the embeddings
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
            if hasattr(model, "score") and hasattr(model, "model"):
                # decoder with a classification head (e.g. converted Qwen3): last token
                self._base = model.model
                self._head_weight = model.score.weight.float().to(device)
                bias = getattr(model.score, "bias", None)
                self._head_bias = None if bias is None else bias.float().to(device)
                self._encoder = None
            else:
                self._base = None
                self._encoder = model
                self.pad_id = model.config.pad_token_id or 0
        module = self._encoder if self._encoder is not None else self._base
        module.to(device).eval()

    # --- scoring -----------------------------------------------------------------------

    def score(self, batch: Batch) -> list[float]:
        """Raw scores in batch order; sub-batches sorted by length, split on OOM."""
        return run_padded(self.forward, batch.pairs, self.max_padded_tokens, self._device)

    @torch.inference_mode()
    def forward(self, pairs: list[EncodedPair], groups: list[int] | None = None) -> list[float]:
        """Raw scores of one padded sub-batch (`groups` unused: no prefix sharing here); the
        seam `split_on_oom` and engine/faults.py wrap."""
        ids, mask = padded(pairs, self.pad_id)
        ids, mask = ids.to(self._device), mask.to(self._device)
        if self._encoder is not None:
            kwargs = {}
            if pairs[0].token_type_ids is not None:
                types = torch.zeros(ids.shape, dtype=torch.long)
                for row, pair in enumerate(pairs):
                    types[row, : len(pair)] = torch.tensor(pair.token_type_ids)
                kwargs["token_type_ids"] = types.to(self._device)
            logits = self._encoder(input_ids=ids, attention_mask=mask, **kwargs).logits
            return logits[:, 0].float().tolist()
        hidden = self._base(input_ids=ids, attention_mask=mask).last_hidden_state
        h = last_rows(hidden, mask)
        raw = h @ self._head_weight.T  # (B, hidden) x (hidden, 1) -> (B, 1)
        if self._head_bias is not None:
            raw = raw + self._head_bias
        return raw[:, 0].tolist()


# --- shared with engine/multimodal_engine.py ------------------------------------------------


def lm_head_rows(model: Any, head: ScoreHead, device: torch.device) -> torch.Tensor:
    """(1, hidden) float32: the LM head reduced to the rows the recipe scores with,
    W[yes] − W[no] (or W[Yes]); the vocabulary is never computed."""
    weight = model.get_output_embeddings().weight
    direction = weight[head.positive_token_id].float()
    if head.negative_token_id is not None:
        direction = direction - weight[head.negative_token_id].float()
    return direction[None, :].to(device)


def padded(pairs: list[EncodedPair], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (B, width), on the host, padded on the right: causal
    models never look right, so real tokens are unaffected."""
    width = max(len(p) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        ids[row, : len(pair)] = torch.tensor(pair.input_ids)
        mask[row, : len(pair)] = 1
    return ids, mask


def last_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, hidden) float32: each row's hidden state at its last real position, `hidden`
    (B, W, hidden) and `mask` (B, W) right-padded on `hidden`'s device."""
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(len(hidden), device=hidden.device), last].float()
