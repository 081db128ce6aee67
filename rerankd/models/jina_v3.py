"""jina-reranker-v3's model (`JinaForRanking`): our Qwen3 decoder and Jina's projector.

The checkpoint is a Qwen3-0.6B (`model.*` tensors, tied embeddings, no LM head needed) plus
`projector.0.weight` (hidden/2, hidden) and `projector.2.weight` (dim, hidden/2): Linear →
ReLU → Linear, no biases (dim 512 on the hub). The model returns the projected embeddings of
the final (normed) hidden states at the rows it is asked for; which rows, and the cosine
scoring over windows, are the engine's (engine/listwise.py). It knows nothing of text.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rerankd.models.decoder import Decoder, DecoderConfig
from rerankd.models.decoder_weights import load_decoder
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import Checkpoint
from rerankd.ops.batch import PackedBatch

PROJECTOR = ("projector.0.weight", "projector.2.weight")


class JinaV3Ranker(nn.Module):
    def __init__(self, decoder: Decoder, w1: Tensor, w2: Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        # the projector runs in float32 on the few rows read (one per document and window)
        self.register_buffer("w1", w1.float(), persistent=False)  # (hidden/2, hidden)
        self.register_buffer("w2", w2.float(), persistent=False)  # (dim, hidden/2)

    def forward(self, batch: PackedBatch, rows: Tensor) -> Tensor:
        """Projected embeddings (R, dim), float32, at flat stream rows `rows` (R,)."""
        hidden = self.decoder(batch)[rows]  # (R, hidden), before the final norm
        h = self.decoder.norm(hidden).float()
        return F.relu(h @ self.w1.T) @ self.w2.T  # (R, hidden) -> (R, hidden/2) -> (R, dim)


def load_jina_v3(
    checkpoint: Checkpoint, hf_config: Any, dtype: torch.dtype, device: torch.device
) -> JinaV3Ranker:
    """The ranker from a `JinaForRanking` checkpoint; UnsupportedCheckpoint when its backbone
    is not a Qwen3 our decoder runs or it has no projector."""
    missing = [name for name in PROJECTOR if name not in checkpoint]
    if missing:
        raise UnsupportedCheckpoint(f"no projector tensors {missing} in the checkpoint")
    config = DecoderConfig.from_hf_config(hf_config, model_type="qwen3")
    decoder = load_decoder(checkpoint, config, dtype, device)
    w1, w2 = (checkpoint.get(name).to(device) for name in PROJECTOR)
    if w1.shape[1] != config.hidden_size or w2.shape[1] != w1.shape[0]:
        raise UnsupportedCheckpoint(
            f"projector shapes {tuple(w1.shape)} and {tuple(w2.shape)} do not chain from "
            f"hidden size {config.hidden_size}"
        )
    return JinaV3Ranker(decoder, w1, w2).eval()
