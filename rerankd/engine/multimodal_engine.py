"""The vision-language engine: transformers' own Qwen3-VL model, padded, with images.

Our packed engine is text-only (no vision tower, no multimodal RoPE), so Qwen3-VL-Reranker
runs here: `AutoModelForImageTextToText` (transformers' `Qwen3VLForConditionalGeneration`,
never checkpoint code) with its base model scored at the last real token through the two
LM-head rows the recipe names, h · (W[yes] − W[no]). Pairs are padded on the right in
length-sorted sub-batches (as the transformers engine does); a sub-batch's images go through
the vision tower together. The cost against the packed engine: padding is computed, and the
shared query prefix of a request is computed once per document, not once per request.

Pairs carry their images as `EncodedVisionPair.images` (recipes/qwen3_vl.py): pixel patches
and grids, which this engine concatenates in pair order, as the model expects.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rerankd.engine.base import default_batch_tokens, padded_chunks, split_on_oom
from rerankd.types import Batch, EncodedPair, ScoreHead

log = logging.getLogger(__name__)


class VisionLanguageEngine:
    """Scores text-and-image pairs with a transformers vision-language model."""

    def __init__(
        self,
        model_dir: Path,
        head: ScoreHead,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText

        if head.kind != "lm_rows":
            raise ValueError(f"the vision-language engine scores LM-head rows, not {head.kind!r}")
        self.name = "transformers-vl"
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device, self._dtype = device, dtype
        self.default_batch_tokens = default_batch_tokens(device, padded=True)
        self.max_padded_tokens = max_batch_tokens or self.default_batch_tokens
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
        config = model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        weight = model.get_output_embeddings().weight
        direction = weight[head.positive_token_id].float()
        if head.negative_token_id is not None:
            direction = direction - weight[head.negative_token_id].float()
        # (1, hidden): the score head reduced to the rows the recipe needs, in float32
        self._head_weight = direction[None, :].to(device)
        self._base = model.model
        del model  # the full LM head is not needed (tied or not)
        self._base.to(device).eval()

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
        """Raw scores of one padded sub-batch (the seam `split_on_oom` wraps)."""
        width = max(len(p) for p in pairs)
        ids = torch.zeros((len(pairs), width), dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, pair in enumerate(pairs):
            ids[row, : len(pair)] = torch.tensor(pair.input_ids)
            mask[row, : len(pair)] = 1
        kwargs = {}
        images = [image for pair in pairs for image in getattr(pair, "images", ())]
        if images:
            pixels = np.concatenate([patches for patches, _ in images])  # (sum patches, 1536)
            kwargs["pixel_values"] = torch.from_numpy(pixels).to(self._device, self._dtype)
            kwargs["image_grid_thw"] = torch.tensor([grid for _, grid in images]).to(self._device)
            # text 0, image 1, video 2: transformers builds the multimodal positions from these
            types = (ids == self.image_token_id).int()
            if self.video_token_id is not None:
                types += 2 * (ids == self.video_token_id).int()
            kwargs["mm_token_type_ids"] = types.to(self._device)
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self._base(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        hidden = hidden.last_hidden_state
        last = mask.sum(dim=1) - 1
        h = hidden[torch.arange(len(pairs), device=self._device), last].float()  # (B, hidden)
        return (h @ self._head_weight.T)[:, 0].tolist()  # (B, hidden) x (hidden, 1)
