"""Gemma (GemmaForCausalLM, e.g. bge-reranker-v2-gemma) → our packed decoder."""

from __future__ import annotations

from typing import Any

from rerankd.models.decoder import DecoderConfig, gemma_embed_scale
from rerankd.models.hf_config import UnsupportedCheckpoint, decoder_config


def gemma_config(hf_config: Any) -> DecoderConfig:
    act = getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None)
    if act not in ("gelu_pytorch_tanh", "gelu"):  # transformers maps legacy "gelu" to tanh too
        raise UnsupportedCheckpoint(f"Gemma activation {act!r} is not implemented")
    return decoder_config(
        hf_config,
        gemma_norm=True,
        embed_scale=gemma_embed_scale(hf_config.hidden_size),
        activation="gelu_tanh",
    )
