"""The vision-language engine: transformers' own Qwen3-VL model, padded, with images.

Our packed engine is text-only (no vision tower, no multimodal RoPE), so Qwen3-VL-Reranker
runs here: `AutoModelForImageTextToText` (transformers' `Qwen3VLForConditionalGeneration`,
never checkpoint code) with its base model scored at the last real token through the two
LM-head rows the recipe names, h · (W[yes] − W[no]). Pairs are padded on the right in
length-sorted sub-batches (as the transformers engine does); a sub-batch's images go through
the vision tower together.

Shared prefix: the pairs of a request start with the same tokens (template, instruction,
query, and the query's image when it is the same image). That prefix runs once (over a
batch of one request, before its sub-batches; over each sub-batch of a mixed batch), its K/V
cache is repeated across the sub-batch, and only each pair's rest runs on top of it, with
the multimodal positions of the whole sequence. The prefix's K/V is kept (one, the last) and
reused by the request's later sub-batches and scheduler batches, so a request whose pairs
span several forwards still runs its query once. A prefix never ends inside an image, and an
image is shared only when it is the same pixel array in every pair (the recipe processes a
request's query image once; the kept prefix holds its arrays, so their identity stays
unique). The kept K/V stays allocated until the next prefix replaces it (Qwen3-VL-2B in
bf16: ~115 KB a token, ~200 MB for a query holding a 1,800-patch image). The cost against the
packed engine: padding is computed, and the K/V cache is copied per pair.

Pairs carry their images as `EncodedVisionPair.images` (recipes/qwen3_vl.py): pixel patches
and grids, which this engine concatenates in pair order, as the model expects.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rerankd.engine.base import default_batch_tokens, run_padded
from rerankd.engine.transformers_engine import last_rows, lm_head_rows, padded
from rerankd.types import Batch, EncodedPair, ScoreHead

log = logging.getLogger(__name__)

#: a shared prefix shorter than this is not worth its extra forward and cache copies
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class _Prefix:
    """A computed shared prefix: its token ids, the pixel arrays of its images (held, so
    that identity comparisons stay sound), and its K/V cache at batch size 1."""

    ids: tuple[int, ...]
    arrays: tuple[Any, ...]
    cache: Any  # transformers.DynamicCache


class VisionLanguageEngine:
    """Scores text-and-image pairs with a transformers vision-language model."""

    def __init__(
        self,
        model_dir: Path,
        head: ScoreHead,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
        share_prefix: bool = True,
        score_offset: float = 0.0,
    ) -> None:
        from transformers import AutoModelForImageTextToText

        if head.kind not in ("lm_rows", "classifier"):
            raise ValueError(
                f"the vision-language engine scores LM-head rows or a score MLP, not {head.kind!r}"
            )
        self.name = "transformers-vl"
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device, self._dtype = device, dtype
        self.default_batch_tokens = default_batch_tokens(device, padded=True)
        self.max_padded_tokens = max_batch_tokens or self.default_batch_tokens
        self.share_prefix = share_prefix
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
        config = model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self._score_mlp = None
        if head.kind == "classifier":  # the checkpoint's score MLP (jina-reranker-m0), float32
            from rerankd.models.jina_vl import load_score_mlp

            self._score_mlp = load_score_mlp(model_dir, score_offset).to(device)
        else:
            self._head_weight = lm_head_rows(model, head, device)
        self._base = model.model
        del model  # the full LM head is not needed (tied or not)
        self._base.to(device).eval()
        self._prefix: _Prefix | None = None  # the last shared prefix computed

    def score(self, batch: Batch) -> list[float]:
        """Raw scores in batch order; sub-batches sorted by length, split on OOM. A batch of
        one request computes (or reuses) its shared prefix first, so that every sub-batch,
        even one of a single pair, runs on it."""
        pairs = batch.pairs
        if self.share_prefix and len(pairs) > 1 and len(set(batch.groups or [0])) == 1:
            self._prepare_prefix(pairs)
        return run_padded(self.forward, pairs, self.max_padded_tokens, self._device)

    @torch.inference_mode()
    def forward(self, pairs: list[EncodedPair], groups: list[int] | None = None) -> list[float]:
        """Raw scores of one padded sub-batch (the seam `split_on_oom` wraps); its shared
        token prefix, if long enough, computed once."""
        # transformers keeps the last image batch's M-RoPE offsets for generation and applies
        # them to any later call with a cache (the shared path's second call): a text-only
        # batch after an image batch then got shifted positions, or a shape error
        self._base.rope_deltas = None
        prefix = self._prefix_for(pairs) if self.share_prefix else None
        if prefix is not None:
            return self._forward_shared(pairs, prefix)
        return self._forward_padded(pairs)

    @torch.inference_mode()
    def _prepare_prefix(self, pairs: list[EncodedPair]) -> None:
        """Compute (or keep) the shared prefix of one request's pairs."""
        self._base.rope_deltas = None
        self._prefix_for(pairs)

    def _prefix_for(self, pairs: list[EncodedPair]) -> _Prefix | None:
        """The prefix these pairs run on: the kept one when every pair starts with it and
        computing their own longer one would cost more tokens than it saves, else their own
        (computed now and kept), or None when they share too little."""
        tokens, images = self.shared_prefix(pairs)
        kept = self._prefix
        if (
            kept is not None
            and self._starts_all(kept, pairs)
            and (tokens - len(kept.ids)) * len(pairs) <= tokens
        ):
            return kept
        if tokens < MIN_SHARED_PREFIX:
            return None
        first = pairs[0]
        arrays = tuple(patches for patches, _ in getattr(first, "images", ())[:images])
        del kept
        self._prefix = None  # the kept K/V freed before the next one is computed
        cache = self._run_prefix(first, tokens, images)
        self._prefix = _Prefix(tuple(first.input_ids[:tokens]), arrays, cache)
        return self._prefix

    @staticmethod
    def _starts_all(prefix: _Prefix, pairs: list[EncodedPair]) -> bool:
        """Whether every pair starts with `prefix` (its ids and the same image arrays) and
        keeps a token of its own after it."""
        n = len(prefix.ids)
        for pair in pairs:
            if len(pair) <= n or tuple(pair.input_ids[:n]) != prefix.ids:
                return False
            images = getattr(pair, "images", ())
            if len(images) < len(prefix.arrays) or any(
                images[k][0] is not array for k, array in enumerate(prefix.arrays)
            ):
                return False
        return True

    def shared_prefix(self, pairs: list[EncodedPair]) -> tuple[int, int]:
        """(tokens, images) every pair starts with: the longest common token prefix that
        leaves each pair a token of its own, cut back to before an image it would split or
        an image whose pixels differ between pairs."""
        if len(pairs) < 2:
            return 0, 0
        shortest = min(len(p) for p in pairs) - 1
        ids = np.array([p.input_ids[:shortest] for p in pairs])  # (B, shortest)
        differs = (ids != ids[:1]).any(axis=0)
        prefix = int(differs.argmax()) if differs.any() else shortest
        first = pairs[0]
        for k, (start, end) in enumerate(self._image_runs(first.input_ids)):
            if start > prefix:
                return prefix, k
            if prefix < end or any(
                getattr(p, "images", ())[k][0] is not first.images[k][0] for p in pairs[1:]
            ):
                return start - 1, k  # before its <|vision_start|>
        return prefix, len(getattr(first, "images", ()))

    def _image_runs(self, ids: tuple[int, ...]) -> list[tuple[int, int]]:
        """[start, end) of each run of image placeholder tokens, in order."""
        runs, start = [], None
        for i, token in enumerate(ids):
            if token == self.image_token_id and start is None:
                start = i
            elif token != self.image_token_id and start is not None:
                runs.append((start, i))
                start = None
        if start is not None:
            runs.append((start, len(ids)))
        return runs

    def _vision_inputs(self, images: list, ids: torch.Tensor) -> dict:
        """pixel_values, image_grid_thw and mm_token_type_ids for `images` in order."""
        if not images:
            return {}
        pixels = np.concatenate([patches for patches, _ in images])  # (sum patches, 1536)
        # text 0, image 1, video 2: transformers builds the multimodal positions from these
        types = (ids == self.image_token_id).int()
        if self.video_token_id is not None:
            types += 2 * (ids == self.video_token_id).int()
        return {
            "pixel_values": torch.from_numpy(pixels).to(self._device, self._dtype),
            "image_grid_thw": torch.tensor([grid for _, grid in images]).to(self._device),
            "mm_token_type_ids": types.to(self._device),
        }

    def _run_prefix(self, first: EncodedPair, prefix: int, shared: int) -> Any:
        """The K/V cache of `first`'s first `prefix` tokens (holding its first `shared`
        images), batch size 1."""
        from transformers import DynamicCache

        head = torch.tensor([first.input_ids[:prefix]])
        cache = DynamicCache()
        self._base(
            input_ids=head.to(self._device),
            attention_mask=torch.ones_like(head).to(self._device),
            cache=cache,
            use_cache=True,
            **self._vision_inputs(list(getattr(first, "images", ())[:shared]), head),
        )
        self._base.rope_deltas = None  # the rest's positions are given, or counted on
        return cache

    def _forward_shared(self, pairs: list[EncodedPair], kept: _Prefix) -> list[float]:
        """Each pair's rest on a copy of the prefix's K/V repeated per pair; positions from
        the whole padded sequences, as the unshared forward has them."""
        prefix, shared = len(kept.ids), len(kept.arrays)
        cache = copy.deepcopy(kept.cache)
        cache.batch_repeat_interleave(len(pairs))
        ids, mask = padded(pairs)
        all_images = [image for pair in pairs for image in getattr(pair, "images", ())]
        rest_images = [image for pair in pairs for image in getattr(pair, "images", ())[shared:]]
        position_ids = None  # text only: the text model counts on from the cache's length
        if all_images:
            vision = self._vision_inputs(all_images, ids)
            position_ids, _ = self._base.get_rope_index(
                ids.to(self._device),
                mm_token_type_ids=vision["mm_token_type_ids"],
                image_grid_thw=vision["image_grid_thw"],
                attention_mask=mask.to(self._device),
            )
            position_ids = position_ids[:, :, prefix:]  # (3, B, width - prefix)
        rest = ids[:, prefix:]
        kwargs = self._vision_inputs(rest_images, rest)
        kwargs.pop("mm_token_type_ids", None)  # positions are given
        hidden = self._base(
            input_ids=rest.to(self._device),
            attention_mask=mask.to(self._device),  # (B, width): the prefix and each rest
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **kwargs,
        ).last_hidden_state
        return self._score(last_rows(hidden, mask[:, prefix:].to(self._device)))

    def _forward_padded(self, pairs: list[EncodedPair]) -> list[float]:
        """Every pair whole, padded on the right."""
        ids, mask = padded(pairs)
        images = [image for pair in pairs for image in getattr(pair, "images", ())]
        kwargs = self._vision_inputs(images, ids)
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self._base(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        return self._score(last_rows(hidden.last_hidden_state, mask))

    def _score(self, h: torch.Tensor) -> list[float]:
        """Raw scores of last-position hidden states h, (B, hidden) float32."""
        if self._score_mlp is not None:
            return self._score_mlp(h).tolist()
        return (h @ self._head_weight.T)[:, 0].tolist()  # (B, hidden) x (hidden, 1)
