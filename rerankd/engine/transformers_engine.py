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

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rerankd.engine.base import default_batch_tokens, padded_chunks, split_on_oom
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
            weight = model.get_output_embeddings().weight
            direction = weight[head.positive_token_id].float()
            if head.negative_token_id is not None:
                direction = direction - weight[head.negative_token_id].float()
            self._base = model.get_decoder()
            # (1, hidden): the score head reduced to the rows the recipe needs, in float32
            self._head_weight = direction[None, :].to(device)
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
        pairs = batch.pairs
        scores: list[float] = [0.0] * len(pairs)
        for chunk in padded_chunks([len(p) for p in pairs], self.max_padded_tokens):
            chunk_scores = split_on_oom(self.forward, [pairs[i] for i in chunk], None, self._device)
            for index, value in zip(chunk, chunk_scores, strict=True):
                scores[index] = value
        return scores

    @torch.inference_mode()
    def forward(self, pairs: list[EncodedPair], groups: list[int] | None = None) -> list[float]:
        """Raw scores of one padded sub-batch (`groups` unused: no prefix sharing here); the
        seam `split_on_oom` and engine/faults.py wrap."""
        width = max(len(p) for p in pairs)
        # right padding: causal models never look right, so real tokens are unaffected
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        types = None
        if pairs[0].token_type_ids is not None:
            types = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, pair in enumerate(pairs):
            n = len(pair)
            ids[row, :n] = torch.tensor(pair.input_ids)
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(pair.token_type_ids)
        ids, mask = ids.to(self._device), mask.to(self._device)
        if self._encoder is not None:
            kwargs = {"token_type_ids": types.to(self._device)} if types is not None else {}
            logits = self._encoder(input_ids=ids, attention_mask=mask, **kwargs).logits
            return logits[:, 0].float().tolist()
        hidden = self._base(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(dim=1) - 1
        h = hidden[torch.arange(len(pairs), device=self._device), last].float()  # (B, hidden)
        raw = h @ self._head_weight.T  # (B, hidden) x (hidden, 1) -> (B, 1)
        if self._head_bias is not None:
            raw = raw + self._head_bias
        return raw[:, 0].tolist()
