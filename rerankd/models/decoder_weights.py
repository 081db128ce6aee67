"""Map Hugging Face decoder checkpoints (Qwen3, Qwen2, Gemma) onto decoder.py, fusing projections.

Built on the meta device and loaded with `assign=True` from memory-mapped safetensors, so
a model never needs twice its size in memory while loading.
"""

from __future__ import annotations

import torch
from torch import nn

from rerankd.models.decoder import Decoder, DecoderConfig, DecoderReranker, rope_inv_freq
from rerankd.models.weights import Checkpoint, strip_prefix
from rerankd.types import ScoreHead

_BASE_PREFIXES = ("model.", "")


def load_decoder(
    checkpoint: Checkpoint, config: DecoderConfig, dtype: torch.dtype, device: torch.device
) -> Decoder:
    def get(name: str) -> torch.Tensor:
        return checkpoint.get(strip_prefix(checkpoint, name, _BASE_PREFIXES)).to(
            device=device, dtype=dtype
        )

    state = {"embed_tokens.weight": get("embed_tokens.weight"), "norm.weight": get("norm.weight")}
    # Qwen2: biases on q/k/v (never on o): fused like the weights
    qkv_bias = _has(checkpoint, "layers.0.self_attn.q_proj.bias")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        state[attn + "wqkv.weight"] = torch.cat([get(attn + f"{n}_proj.weight") for n in "qkv"])
        if qkv_bias:
            state[attn + "wqkv.bias"] = torch.cat([get(attn + f"{n}_proj.bias") for n in "qkv"])
        state[attn + "wo.weight"] = get(attn + "o_proj.weight")
        if config.qk_norm:
            state[attn + "q_norm.weight"] = get(attn + "q_norm.weight")
            state[attn + "k_norm.weight"] = get(attn + "k_norm.weight")
        state[mlp + "w13.weight"] = torch.cat(
            [get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]
        )
        state[mlp + "w2.weight"] = get(mlp + "down_proj.weight")
        state[p + "input_layernorm.weight"] = get(p + "input_layernorm.weight")
        state[p + "post_attention_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
    with torch.device("meta"):
        model = Decoder(config)
        if qkv_bias:
            for layer in model.layers:
                wqkv = layer.self_attn.wqkv
                layer.self_attn.wqkv = nn.Linear(wqkv.in_features, wqkv.out_features, bias=True)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config, device)  # non-persistent buffer: rebuild off meta
    return model.eval()


def _has(checkpoint: Checkpoint, name: str) -> bool:
    """Whether the checkpoint holds base-model tensor `name` (under any known prefix)."""
    return any(prefix + name in checkpoint for prefix in _BASE_PREFIXES)


def load_decoder_reranker(
    checkpoint: Checkpoint,
    config: DecoderConfig,
    head: ScoreHead,
    dtype: torch.dtype,
    device: torch.device,
) -> DecoderReranker:
    decoder = load_decoder(checkpoint, config, dtype, device)
    bias = None
    if head.kind == "lm_rows":
        name = (
            "lm_head.weight"
            if "lm_head.weight" in checkpoint
            else strip_prefix(checkpoint, "embed_tokens.weight", _BASE_PREFIXES)
        )  # tied embeddings
        rows = [head.positive_token_id] + (
            [head.negative_token_id] if head.negative_token_id is not None else []
        )
        weight = checkpoint.rows(name, rows).float()
        weight = weight[:1] - weight[1:2] if len(rows) == 2 else weight[:1]
    else:
        weight = checkpoint.get("score.weight").float()
        if weight.shape[0] != 1:
            raise ValueError(f"expected a one-label score head, got {weight.shape[0]} labels")
        if "score.bias" in checkpoint:
            bias = checkpoint.get("score.bias").float().to(device)
    return DecoderReranker(decoder, weight.to(device), bias)
