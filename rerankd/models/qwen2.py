"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM, e.g. mxbai-rerank-v2) → our packed decoder.

Qwen3 minus the q/k norms, plus biases on the q/k/v projections (`load_decoder` fuses them
into the q‖k‖v projection's bias when the checkpoint has them).
"""

from __future__ import annotations

from typing import Any

from rerankd.models.decoder import DecoderConfig
from rerankd.models.hf_config import UnsupportedCheckpoint, decoder_config


def qwen2_config(hf_config: Any) -> DecoderConfig:
    if getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedCheckpoint("sliding-window attention is not implemented")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedCheckpoint(f"Qwen2 activation {act!r} is not implemented")
    return decoder_config(hf_config, qk_norm=False, activation="silu")
