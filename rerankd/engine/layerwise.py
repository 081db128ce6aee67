"""The packed engine for models with one score head per layer (bge-reranker-v2-minicpm-layerwise).

Everything is `PackedEngine`'s (packing, shared prefixes, attention kernels, compile, OOM
splits); only the forward differs: each pair says after which layer it is scored
(`LayerwisePair.layer`, set by the recipe from the request's `cutoff_layers`), and the model
runs its layers up to the deepest one the batch needs. Pairs without a layer (the start-up
probes) are scored after the last layer.
"""

from __future__ import annotations

import torch

from rerankd.engine.packed_engine import PackedEngine
from rerankd.ops.attention import VARLEN_BACKENDS
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair, LayerwisePair


class LayerwiseEngine(PackedEngine):
    @torch.inference_mode()
    def forward(self, pairs: list[EncodedPair], groups: list[int] | None) -> list[float]:
        packed = pack(pairs, groups, self._device, share_prefix=self.share_prefix)
        if self.attention in VARLEN_BACKENDS:
            packed.with_varlen_layout()
        layers = [pair.layer if isinstance(pair, LayerwisePair) else None for pair in pairs]
        return self.model(packed, layers).tolist()
