"""The engine of bge-reranker-v2.5-gemma2-lightweight (models/gemma2_lightweight.py).

`PackedEngine`'s contract, OOM splits and fault seams; its own forward: each pair carries its
layout and options (`LightweightPair`: query/prompt lengths, scoring layer and head,
compression), which become the model's per-sequence `Plan`. Sequences run back to back in one
flat stream with no padding; no shared prefixes (compression renumbers positions, and the
packed kernels know neither sliding windows nor shrinking sequences), attention is one SDPA
call per bucket of similar-length sequences (models/gemma2_lightweight.py), and nothing is
compiled. Pairs without options (start-up probes) are scored after
the last layer, by head 0, uncompressed.
"""

from __future__ import annotations

import logging

import torch

from rerankd.engine.packed_engine import PackedEngine
from rerankd.models.gemma2_lightweight import LightweightReranker, Plan
from rerankd.types import EncodedPair

log = logging.getLogger(__name__)


class LightweightEngine(PackedEngine):
    def __init__(self, model: LightweightReranker, device, dtype, *, attention: str = "auto",
                 compile: str = "off", **kwargs) -> None:  # fmt: skip
        if attention not in ("auto", "sdpa") or compile == "on":
            log.warning("gemma2-lightweight runs eager SDPA attention; ignoring --attention "
                        "%s / --compile %s", attention, compile)  # fmt: skip
        super().__init__(model, device, dtype, attention="sdpa", compile="off", **kwargs)

    @torch.inference_mode()
    def forward(self, pairs: list[EncodedPair], groups: list[int] | None) -> list[float]:
        ids = torch.tensor(
            [t for pair in pairs for t in pair.input_ids], dtype=torch.long, device=self._device
        )
        plans = [self._plan(pair) for pair in pairs]
        return self.model(ids, [len(pair) for pair in pairs], plans).tolist()

    def _plan(self, pair: EncodedPair) -> Plan:
        # a recipe's `LightweightPair` (recipes/bge_lightweight.py), read by its fields: the
        # engine imports no recipe module
        options = getattr(pair, "options", None)
        if options is None:
            return Plan(len(pair), 0, self.model.config.num_layers)
        return Plan(
            pair.query_length,
            pair.prompt_length,
            options.layer,
            options.head,
            options.ratio,
            frozenset(options.layers),
        )
