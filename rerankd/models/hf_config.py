"""Reading Hugging Face decoder configs into our `DecoderConfig`, or saying why we can't."""

from __future__ import annotations

from typing import Any

from rerankd.models.decoder import DecoderConfig


class UnsupportedCheckpoint(Exception):
    """Our own model code does not cover this checkpoint; use the transformers engine."""


def rope_theta(hf_config: Any) -> float:
    """RoPE base from transformers 4 (`rope_theta`) or 5 (`rope_parameters`) configs; only
    the default RoPE type is implemented."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = (
        params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    if rope_type != "default":
        raise UnsupportedCheckpoint(f"RoPE type {rope_type!r} is not implemented")
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise UnsupportedCheckpoint("config has no rope_theta")
    return float(theta)


def decoder_config(hf_config: Any, **family: Any) -> DecoderConfig:
    """The fields every Llama-family decoder config shares, plus the family's own."""
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
        **family,
    )
