"""A BERT / XLM-RoBERTa ColBERT encoder over packed batches: per-token embeddings.

The backbone is `models/encoder.py`'s `EncoderBackbone` (weights mapped by its `backbone_state`) without a
classification head; the projection is the checkpoint's Dense chain (PyLate) or its `linear`
layer (stanford ColBERT). Output: one embedding per token, not yet normalized (the engine
normalizes in float32 and picks the rows MaxSim uses). Bidirectional attention: a sequence's
tokens see its own keys only; a query's expansion tokens may be hidden as keys (`keys`).
The engine chooses the attention kernel (`set_kernels`); the per-token work runs eager.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from rerankd.models.encoder import EncoderBackbone, EncoderConfig, backbone_state
from rerankd.models.kernels import Kernels, refuse_unless
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import Checkpoint
from rerankd.ops.attention import ATTENTION
from rerankd.ops.batch import PackedBatch

#: where the backbone's tensors may live: PyLate saves the bare model (no prefix); stanford's
#: HF_ColBERT nests it under the base model's prefix
_BACKBONE_PREFIXES = ("", "bert.", "roberta.", "model.")


@dataclass
class Projection:
    """One Dense layer: y = x Wᵀ + b (+ the residual, when the layer has one)."""

    weight: Tensor  # (out, in)
    bias: Tensor | None = None
    residual: Tensor | None = None  # (out, in) or None; `identity` when in == out
    identity_residual: bool = False


# ---------------------------------------------------------------------------------------


class ColbertEncoder(EncoderBackbone):
    """Embeddings + layers + projection → (T, dim) token embeddings of a packed batch."""

    #: no compiled per-token functions: eager only (models/kernels.py's contract)
    compiles = False

    def __init__(self, config: EncoderConfig, projections: list[Projection]) -> None:
        super().__init__(config)
        self.projections = projections
        self.kernels = Kernels()

    def set_kernels(self, kernels: Kernels) -> None:
        """Run the engine's choice of attention kernel (models/kernels.py; eager only) for
        every batch whose keys are not limited (those run `_key_limited`'s SDPA)."""
        refuse_unless(self, kernels)
        self.kernels = kernels

    def forward(self, batch: PackedBatch, keys: list[int] | None = None) -> Tensor:
        """`keys[i]`: sequence i's tokens attend to its first keys[i] tokens only (None: all)."""
        self._use_attention(
            ATTENTION[self.kernels.attention] if keys is None else _key_limited(keys)
        )
        x = self.embed(batch)
        for layer in self.layers:
            x = layer(x, batch)  # (T, hidden)
        return project(x, self.projections)  # (T, dim)


def project(x: Tensor, projections: list[Projection]) -> Tensor:
    """The Dense chain: (…, hidden) → (…, dim)."""
    for p in projections:
        y = F.linear(x, p.weight, p.bias)
        if p.residual is not None:
            y = y + F.linear(x, p.residual)
        elif p.identity_residual:
            y = y + x
        x = y
    return x


def _key_limited(keys: list[int]):
    """SDPA per sequence where every token attends to the sequence's first `keys[i]` tokens
    (a query whose [MASK] expansion tokens are not attended to: they still attend to it)."""

    def attend(q, k, v, batch: PackedBatch, prefix_kv, causal: bool, scale: float, out=None):
        out = torch.empty_like(q) if out is None else out
        for start, length, n in zip(batch.starts, batch.lengths, keys, strict=True):
            qi = q[start : start + length].transpose(0, 1)[None]  # (1, H, L, D)
            ki = k[start : start + n].transpose(0, 1)[None]  # (1, H, n, D)
            vi = v[start : start + n].transpose(0, 1)[None]
            oi = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
            out[start : start + length] = oi[0].transpose(0, 1)
        return out

    return attend


# --- checkpoint mapping -----------------------------------------------------------------------


def load_colbert_encoder(
    checkpoint: Checkpoint,
    config: EncoderConfig,
    dense_dirs: list[Path],
    dtype: torch.dtype,
    device: torch.device,
) -> ColbertEncoder:
    """Map a BERT/XLM-R backbone (bare, or under HF_ColBERT's prefix) and its projection."""
    base = next(
        (p for p in _BACKBONE_PREFIXES if f"{p}embeddings.word_embeddings.weight" in checkpoint),
        None,
    )
    if base is None:
        raise UnsupportedCheckpoint("no BERT/XLM-R embeddings in the checkpoint")

    def get(name: str) -> Tensor:
        return checkpoint.get(name).to(device=device, dtype=dtype)

    state = backbone_state(get, base, config.num_layers)
    projections = load_projections(dense_dirs, checkpoint, dtype, device)
    with torch.device("meta"):
        model = ColbertEncoder(config, [])
    model.load_state_dict(state, strict=True, assign=True)
    model.projections = projections
    return model.eval()


def load_projections(
    dense_dirs: list[Path],
    checkpoint: Checkpoint | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Projection]:
    """PyLate's Dense modules (each directory's config.json + model.safetensors), in order;
    with none, stanford's `linear.weight` from the backbone's checkpoint (no bias)."""
    out = []
    for path in dense_dirs:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        weights = _dense_weights(path)

        def get(name: str, w=weights) -> Tensor | None:
            return w[name].to(device=device, dtype=dtype) if name in w else None

        residual = bool(config.get("use_residual", False))
        square = config.get("in_features") == config.get("out_features")
        out.append(
            Projection(
                weight=get("linear.weight"),
                bias=get("linear.bias"),
                residual=get("residual.weight") if residual and not square else None,
                identity_residual=residual and square,
            )
        )
    if not dense_dirs:
        if checkpoint is None or "linear.weight" not in checkpoint:
            raise UnsupportedCheckpoint("a ColBERT checkpoint without a projection layer")
        out.append(
            Projection(weight=checkpoint.get("linear.weight").to(device=device, dtype=dtype))
        )
    return out


def _dense_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in the Dense module {str(path)!r}")
