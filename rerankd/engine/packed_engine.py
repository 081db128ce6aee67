"""The packed engine: our own model code on flat token streams with shared prefixes.

Same contract as every engine (`score(batch) -> raw scores`). Pairs of one request share
their common token prefix, computed once per batch; no padding is ever computed; only the
last token of each sequence reaches the final norm and score head. On CUDA the varlen
flash-attention kernel is used when it agrees with per-sequence SDPA on this device.
"""

from __future__ import annotations

import logging
import random

import torch
from torch import nn

from rerankd.engine.base import split_on_oom
from rerankd.engine.batch import pack
from rerankd.types import EncodedPair

log = logging.getLogger(__name__)

#: largest |Δ raw score| between attention backends accepted at start-up (bf16 noise)
_BACKEND_TOLERANCE = 5e-2


class PackedEngine:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        share_prefix: bool,
        vocab_size: int,
        name: str = "packed",
    ) -> None:
        self.model = model
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.name = name
        self._device = device
        self.share_prefix = share_prefix
        self.vocab_size = vocab_size
        self.default_batch_tokens = 32768 if device.type == "cuda" else 8192
        self.attention = "sdpa"
        if device.type == "cuda" and self._varlen_agrees():
            self.attention = "varlen"
        model.set_attention(self.attention)

    def score(self, batch) -> list[float]:
        # `self._forward` is looked up per call so the fault-injection hook can wrap it
        return split_on_oom(
            lambda p, g: self._forward(p, g), batch.pairs, batch.groups, self._device
        )

    @torch.inference_mode()
    def _forward(self, pairs: list[EncodedPair], groups: list[int] | None) -> list[float]:
        packed = pack(pairs, groups, self._device, share_prefix=self.share_prefix)
        if self.attention == "varlen":
            packed.with_varlen_layout()
        return self.model(packed).tolist()

    def _varlen_agrees(self) -> bool:
        """Run a small random batch through both attention backends; keep varlen if equal."""
        rng = random.Random(0)
        prefix = tuple(rng.randrange(self.vocab_size) for _ in range(40))
        pairs = [
            EncodedPair(
                prefix + tuple(rng.randrange(self.vocab_size) for _ in range(rng.randint(5, 90)))
            )
            for _ in range(6)
        ]
        groups = [0, 0, 0, 1, 1, 2]
        try:
            self.model.set_attention("sdpa")
            expected = self._forward(pairs, groups)
            self.model.set_attention("varlen")
            self.attention = "varlen"
            got = self._forward(pairs, groups)
        except Exception as exc:  # kernel missing, unsupported dtype/head size, ...
            log.info(
                "varlen attention unavailable (%s: %s); using per-sequence SDPA",
                type(exc).__name__,
                exc,
            )
            return False
        finally:
            self.attention = "sdpa"
        worst = max(abs(a - b) for a, b in zip(expected, got, strict=True))
        if worst > _BACKEND_TOLERANCE:
            log.warning("varlen attention disagrees with SDPA by %.3g; using SDPA", worst)
            return False
        log.info("varlen attention agrees with SDPA (max |Δ| %.2g); using it", worst)
        return True
