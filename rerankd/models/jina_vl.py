"""jina-reranker-m0's score head, read from its checkpoint without running its code.

`JinaVLForRanking` (the checkpoint's own modeling.py) is transformers' Qwen2-VL with the LM
head replaced by `score = Sequential(Linear(h, h), ReLU(), Linear(h, 1))`, read at the last
position. The backbone loads through transformers' own Qwen2-VL class (its legacy weight
names `model.*` / `visual.*` are mapped by transformers); this module reads the two `score.*`
linears, which transformers ignores as unexpected keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

#: the head's tensors, in the checkpoint's names (vLLM maps the same ones)
SCORE_KEYS = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")


class ScoreMLP(nn.Module):
    """logit + offset = w2 · relu(W1 h + b1) + b2 + offset; `offset` folded into b2."""

    def __init__(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, offset: float = 0.0):
        super().__init__()
        if w2.shape[0] != 1:
            raise ValueError(f"the score head has {w2.shape[0]} outputs, not 1")
        self.w1, self.b1 = nn.Parameter(w1, False), nn.Parameter(b1, False)
        self.w2, self.b2 = nn.Parameter(w2, False), nn.Parameter(b2 + offset, False)

    def forward(self, h: Tensor) -> Tensor:
        x = torch.relu(h @ self.w1.T + self.b1)  # (B, hidden) x (hidden, hidden)
        return (x @ self.w2.T + self.b2)[:, 0]  # (B, hidden) x (hidden, 1) -> (B,)


def load_score_mlp(model_dir: Path | str, offset: float = 0.0) -> ScoreMLP:
    """The float32 score head of the checkpoint in `model_dir` (single or sharded
    safetensors); KeyError naming what is missing."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    found: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for key in SCORE_KEYS:
                if key in names:
                    found[key] = f.get_tensor(key).float()
    missing = [k for k in SCORE_KEYS if k not in found]
    if missing:
        raise KeyError(f"the checkpoint has no score head tensors {missing} (in {model_dir})")
    return ScoreMLP(*(found[k] for k in SCORE_KEYS), offset=offset)
