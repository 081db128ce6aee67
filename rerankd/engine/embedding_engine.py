"""The embedding engine: bi-encoder pairs (`EncodedTwin`) → cosine similarities.

Each distinct token sequence of a batch — every query and every document — is embedded once
(a rerank request's query once, however many documents it has), by the checkpoint's
transformers encoder (`AutoModel`) in padded, length-sorted sub-batches, then mean-pooled
over its real tokens in float32 and L2-normalized; a pair's raw score is the dot product of
its two unit vectors, i.e. their cosine. The contract is every engine's: `score(batch) -> raw
scores`, one per pair, in order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel

from rerankd.engine.base import default_batch_tokens, run_padded
from rerankd.types import Batch, EncodedTwin

log = logging.getLogger(__name__)


class EmbeddingEngine:
    """Scores bi-encoder pairs by the cosine of their mean-pooled embeddings."""

    def __init__(
        self,
        model_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.name = "embedding"
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device = device
        self.default_batch_tokens = default_batch_tokens(device, padded=True)
        self.max_padded_tokens = max_batch_tokens or self.default_batch_tokens
        # AutoModel: the bare encoder (a checkpoint with a task head loads its base model)
        self._model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.pad_id = getattr(self._model.config, "pad_token_id", None) or 0

    def score(self, batch: Batch) -> list[float]:
        """Cosines of (query, document) for each pair, in batch order."""
        index: dict[tuple[int, ...], int] = {}
        sides: list[tuple[int, int]] = []
        for pair in batch.pairs:
            if not isinstance(pair, EncodedTwin):
                raise TypeError("the embedding engine scores bi-encoder pairs (EncodedTwin) only")
            q = index.setdefault(pair.query_ids, len(index))
            d = index.setdefault(pair.document_ids, len(index))
            sides.append((q, d))
        if not sides:
            return []
        embeddings = self.embed(list(index))
        queries = embeddings[[q for q, _ in sides]]
        documents = embeddings[[d for _, d in sides]]
        cosines = (queries * documents).sum(dim=-1).clamp(-1.0, 1.0)
        return cosines.tolist()

    def embed(self, sequences: list[tuple[int, ...]]) -> torch.Tensor:
        """Unit-length mean-pooled embeddings (float32, on the CPU), one row per sequence."""
        rows = run_padded(
            self.forward, sequences, self.max_padded_tokens, self._device, _cat, "sequences"
        )
        return F.normalize(torch.stack(rows), p=2, dim=-1)

    @torch.inference_mode()
    def forward(
        self, sequences: list[tuple[int, ...]], groups: list[int] | None = None
    ) -> torch.Tensor:
        """Mean-pooled (not yet normalized) float32 embeddings of one padded sub-batch
        (`groups` unused); the seam `split_on_oom` and engine/faults.py wrap."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        summed = (hidden * weights).sum(dim=1)
        return (summed / weights.sum(dim=1).clamp(min=1e-9)).cpu()


def _cat(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Rows of two halves of a split sub-batch, in order."""
    return torch.cat([first, second])
