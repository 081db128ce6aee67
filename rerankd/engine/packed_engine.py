"""The packed engine: our own model code on flat token streams with shared prefixes.

Same contract as every engine (`score(batch) -> raw scores`). Pairs of one request share
their common token prefix, computed once per batch; no padding is ever computed; only the
last token of each sequence reaches the final norm and score head.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rerankd.engine.batch import pack
from rerankd.types import Batch, EncodedPair

log = logging.getLogger(__name__)


class PackedEngine:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        share_prefix: bool,
        name: str = "packed",
    ) -> None:
        self.model = model
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.name = name
        self._device = device
        self.share_prefix = share_prefix
        self.default_batch_tokens = 32768 if device.type == "cuda" else 8192

    def score(self, batch: Batch) -> list[float]:
        return self._score_split_on_oom(batch.pairs, batch.groups)

    def _score_split_on_oom(
        self, pairs: list[EncodedPair], groups: list[int] | None
    ) -> list[float]:
        try:
            return self._forward(pairs, groups)
        except torch.OutOfMemoryError:
            if len(pairs) == 1:
                raise
            log.warning("out of memory on %d pairs; splitting the batch and retrying", len(pairs))
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pairs) // 2
            left = self._score_split_on_oom(pairs[:half], groups[:half] if groups else None)
            return left + self._score_split_on_oom(pairs[half:], groups[half:] if groups else None)

    @torch.inference_mode()
    def _forward(self, pairs: list[EncodedPair], groups: list[int] | None) -> list[float]:
        packed = pack(pairs, groups, self._device, share_prefix=self.share_prefix)
        return self.model(packed).tolist()
