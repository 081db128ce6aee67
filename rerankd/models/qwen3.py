"""Qwen3 (Qwen3ForCausalLM / Qwen3ForSequenceClassification) → our packed decoder."""

from __future__ import annotations

from typing import Any

from rerankd.models.decoder import DecoderConfig
from rerankd.models.hf_config import UnsupportedCheckpoint, decoder_config


def qwen3_config(hf_config: Any) -> DecoderConfig:
    if getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedCheckpoint("sliding-window attention is not implemented")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedCheckpoint(f"Qwen3 activation {act!r} is not implemented")
    return decoder_config(hf_config, qk_norm=True, activation="silu")
