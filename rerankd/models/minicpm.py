"""MiniCPM with one score head per layer (bge-reranker-v2-minicpm-layerwise) on our decoder.

The checkpoint's `LayerWiseMiniCPMForCausalLM` (FlagEmbedding's modeling_minicpm_reranker.py,
also shipped as the checkpoint's remote code, which rerankd never runs) is a Llama-shaped
decoder with MiniCPM's two scalings, plus heads:
- embeddings × `scale_emb`;
- each residual branch (attention, MLP) × `scale_depth / sqrt(num_layers)`;
- `head_type` "simple": `lm_head[L - start_layer]` is a Linear(hidden, 1) (one for every layer
  when not `head_multi`), and the score at layer L is that head applied to the *final* norm of
  the last token's hidden state after L layers. L runs from `start_layer` to `num_layers`.
  `dim_model_base` divides only the "raw"/"complex" vocabulary heads, which give no reranker
  score; a "simple" head reads the normed state as it is.

Block, Attention, MLP and RMSNorm are decoder.py's, unchanged: the residual scale is folded
into `o_proj` and `down_proj` when loading (``x + s·(W y) = x + (sW) y``), the embedding scale
is `DecoderConfig.embed_scale`. What this module adds is the forward: it stops after the
deepest layer any sequence of the batch asks for, and reads each sequence's score after its
own layer. It knows nothing about requests; the engine passes each sequence's layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rerankd.models.decoder import Decoder, DecoderConfig, LayerHeads
from rerankd.models.decoder_weights import load_decoder
from rerankd.models.kernels import Kernels
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.weights import Checkpoint
from rerankd.ops.attention_speed import AttentionShape
from rerankd.ops.batch import PackedBatch


@dataclass
class LayerwiseConfig(LayerHeads):
    decoder: DecoderConfig
    #: scale_depth / sqrt(num_layers), applied to each residual branch
    residual_scale: float
    #: the first layer with a score head; heads run from here to `num_layers` inclusive
    start_layer: int
    #: one head per layer (the checkpoint's), else one head shared by every layer
    head_multi: bool = True

    def head_index(self, layer: int) -> int:
        return layer - self.start_layer if self.head_multi else 0

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> LayerwiseConfig:
        head_type = getattr(hf_config, "head_type", "simple")
        if head_type != "simple":  # vocabulary heads: the reference itself gives no score
            raise UnsupportedCheckpoint(f"MiniCPM layerwise head_type {head_type!r}")
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedCheckpoint(f"MiniCPM activation {act!r} is not implemented")
        decoder = DecoderConfig.llama_like(
            hf_config, embed_scale=float(getattr(hf_config, "scale_emb", 1)), activation="silu"
        )
        start = int(getattr(hf_config, "start_layer", 8))  # the reference config's default
        if not 0 <= start <= decoder.num_layers:
            raise UnsupportedCheckpoint(f"start_layer {start} outside 0..{decoder.num_layers}")
        return cls(
            decoder=decoder,
            residual_scale=float(getattr(hf_config, "scale_depth", 1))
            / math.sqrt(decoder.num_layers),
            start_layer=start,
            head_multi=bool(getattr(hf_config, "head_multi", True)),
        )


# ---------------------------------------------------------------------------------------


class LayerwiseReranker(nn.Module):
    """Decoder + per-layer heads: raw scores (N,) in float32, each after its sequence's layer.

    Only the decoder's layers up to the deepest one asked for run; the final norm and a head
    touch only the N last-token rows, never every token.
    """

    compiles = Decoder.compiles  # its kernels are the decoder's

    def __init__(self, decoder: Decoder, heads: Tensor, config: LayerwiseConfig) -> None:
        super().__init__()
        self.decoder = decoder
        self.config = config
        self.register_buffer("heads", heads.float(), persistent=False)  # (H, hidden)

    def set_kernels(self, kernels: Kernels) -> None:
        self.decoder.set_kernels(kernels)

    @property
    def attention_shape(self) -> AttentionShape:
        return self.decoder.attention_shape

    def forward(self, batch: PackedBatch, layers: Sequence[int | None] | None = None) -> Tensor:
        """`layers[i]`: the layer sequence i is scored after (None: the last layer)."""
        d, c = self.decoder, self.config
        n = batch.num_sequences
        wanted = [c.num_layers if w is None else w for w in (layers or [None] * n)]
        if any(w not in c.layers for w in wanted):
            raise ValueError(f"layers {sorted(set(wanted))} outside {c.layers}; this is a bug")
        deepest = max(wanted, default=c.start_layer)
        by_layer: dict[int, list[int]] = {}
        for i, w in enumerate(wanted):
            by_layer.setdefault(w, []).append(i)
        # the same stream as `Decoder.forward`: shared prefixes first, then the sequences'
        # own tokens, then padding rows up to the row multiple
        x, stream = d.start(batch)
        rows = batch.last + stream.shared  # (N,) each sequence's last token in x
        keep = stream.keep  # the last layer skips the prefix rows
        scores = torch.empty(n, dtype=torch.float32, device=x.device)
        self._read(x, rows, by_layer.get(0), 0, scores)
        for index in range(deepest):
            last = index == deepest - 1
            x = d.layers[index](x, stream, keep if last else 0)
            if last:
                rows = rows - keep
            self._read(x, rows, by_layer.get(index + 1), index + 1, scores)
        return scores

    def _read(self, x: Tensor, rows: Tensor, which: list[int] | None, layer: int, out: Tensor):
        """Scores of sequences `which` after `layer` layers: head · final_norm(h_last)."""
        if not which:
            return
        at = torch.tensor(which, device=x.device)
        h = self.decoder.norm(x[rows[at]]).float()  # (n, hidden)
        out[at] = h @ self.heads[self.config.head_index(layer)]  # (n, hidden) x (hidden,) -> (n,)


def load_layerwise(
    checkpoint: Checkpoint, config: LayerwiseConfig, dtype: torch.dtype, device: torch.device
) -> LayerwiseReranker:
    """The checkpoint's decoder (``model.*``, fused as every decoder) with the residual scale
    folded into each block's output projections, and its heads stacked (H, hidden)."""
    decoder = load_decoder(checkpoint, config.decoder, dtype, device)
    s = config.residual_scale
    for block in decoder.layers:
        for linear in (block.self_attn.wo, block.mlp.w2):
            linear.weight = nn.Parameter(linear.weight * s, requires_grad=False)
    if config.head_multi:
        names = [f"lm_head.{k}.linear_head.weight" for k in range(len(config.layers))]
    else:
        names = ["lm_head.linear_head.weight"]
    heads = torch.cat([checkpoint.get(name).float() for name in names])  # (H, hidden)
    if heads.shape != (len(names), config.decoder.hidden_size):
        raise UnsupportedCheckpoint(f"score heads of shape {tuple(heads.shape)}")
    return LayerwiseReranker(decoder, heads.to(device), config).eval()
