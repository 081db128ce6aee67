"""Gemma (GemmaForCausalLM, e.g. bge-reranker-v2-gemma) → our packed decoder."""

from __future__ import annotations

from typing import Any

from rerankd.models.decoder import DecoderConfig, gemma_embed_scale
from rerankd.models.qwen3 import UnsupportedCheckpoint, rope_theta


def gemma_config(hf_config: Any) -> DecoderConfig:
    act = getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None)
    if act not in ("gelu_pytorch_tanh", "gelu"):  # transformers maps legacy "gelu" to tanh too
        raise UnsupportedCheckpoint(f"Gemma activation {act!r} is not implemented")
    if getattr(hf_config, "attention_bias", False):
        raise UnsupportedCheckpoint("attention biases are not implemented")
    heads = hf_config.num_attention_heads
    return DecoderConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        intermediate_size=hf_config.intermediate_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=rope_theta(hf_config),
        gemma_norm=True,
        embed_scale=gemma_embed_scale(hf_config.hidden_size),
        activation="gelu_tanh",
    )
