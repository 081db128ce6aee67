"""Builds the packed engine for a checkpoint: which of our model implementations serves it (by
`config.model_type`), loaded, prepacked or quantized, and wrapped in `PackedEngine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rerankd.engine.layerwise import LayerwiseEngine
from rerankd.engine.lightweight import LightweightEngine
from rerankd.engine.packed_engine import PackedEngine
from rerankd.models.decoder_weights import load_decoder_reranker
from rerankd.models.encoder import EncoderConfig, load_encoder
from rerankd.models.gemma import gemma_config
from rerankd.models.gemma2_lightweight import LightweightConfig, load_lightweight
from rerankd.models.hf_config import UnsupportedCheckpoint
from rerankd.models.minicpm import LayerwiseConfig, load_layerwise
from rerankd.models.modernbert import ModernBertConfig, load_modernbert
from rerankd.models.qwen2 import qwen2_config
from rerankd.models.qwen3 import qwen3_config
from rerankd.models.weights import open_checkpoint
from rerankd.ops.fp8 import fp8_refusal, probe_fp8, quantize_fp8
from rerankd.ops.prepack import prepack_linears
from rerankd.ops.quantize import choose_int8, quantize_int8
from rerankd.recipes import ScoreHead

DECODERS = {"qwen3": qwen3_config, "qwen2": qwen2_config, "gemma": gemma_config}
ENCODERS = ("bert", "xlm-roberta", "roberta", "camembert")
#: decoders with one score head per layer (bge-reranker-v2-minicpm-layerwise)
LAYERWISE = ("minicpm",)
#: Gemma2 with token compression and per-layer heads (bge-reranker-v2.5-gemma2-lightweight)
LIGHTWEIGHT = ("cost_wise_gemma",)

__all__ = ["UnsupportedCheckpoint", "build_packed_engine"]

#: oneDNN linears (prepacked bf16, W8A8 int8) JIT-compile GEMM kernels per new row count
#: (~1 ms per linear; most of a small request's time on the tiny fixture: forward 18 -> 9 ms
#: with padding); padding the token stream to 16 rows makes row counts recur for <= 15
#: extra rows per batch
ONEDNN_ROW_MULTIPLE = 16


def build_packed_engine(
    model_dir: Path,
    hf_config: Any,
    head: ScoreHead,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str = "none",
    compile: str = "off",
    attention: str = "auto",
) -> PackedEngine:
    """Our packed engine for this checkpoint, or UnsupportedCheckpoint saying why not."""
    if quantize == "int8":
        if device.type != "cpu":
            raise ValueError("--quantize int8 runs on CPU only")
        choice = choose_int8(dtype)
        w8a8 = choice.w8a8
        if choice.path == "none":  # no int8 path here is correct and fast: serve as without
            quantize = "none"
        elif not w8a8:
            dtype = torch.float32  # the torch.ao fallback's int8 linears take float32
    if quantize == "fp8":  # refused before loading: CUDA 8.9+ and bf16 activations only
        refusal = fp8_refusal(device)
        if refusal is not None:
            raise ValueError(f"--quantize fp8: {refusal}")
        if dtype != torch.bfloat16:  # the row-wise scaled GEMM writes bf16 only on CUDA
            raise ValueError(f"--quantize fp8 runs bf16 activations; got --dtype {dtype}")
        fuse_bias, _ = probe_fp8(device, dtype)  # RuntimeError: the kernel is broken here
    model_type = getattr(hf_config, "model_type", None)
    if model_type in DECODERS:
        config = DECODERS[model_type](hf_config)
        load = lambda ckpt: load_decoder_reranker(ckpt, config, head, dtype, device)  # noqa: E731
        share_prefix = True
    elif model_type in LIGHTWEIGHT and head.kind == "layers":
        if quantize != "none":
            raise ValueError("gemma2-lightweight: --quantize is not implemented; drop it")
        try:
            config = LightweightConfig.from_hf_config(hf_config)
        except UnsupportedCheckpoint as exc:  # no other engine runs it: say so, no fallback
            raise ValueError(f"cannot serve this lightweight checkpoint: {exc}") from exc
        load = lambda ckpt: load_lightweight(ckpt, config, dtype, device)  # noqa: E731
        share_prefix = False  # compression renumbers positions (engine/lightweight.py)
    elif model_type in LAYERWISE and head.kind == "layers":
        try:
            config = LayerwiseConfig.from_hf_config(hf_config)
        except UnsupportedCheckpoint as exc:  # no other engine runs it: say so, no fallback
            raise ValueError(f"cannot serve this layerwise checkpoint: {exc}") from exc
        load = lambda ckpt: load_layerwise(ckpt, config, dtype, device)  # noqa: E731
        share_prefix = True
    elif model_type in ENCODERS and head.kind == "classifier":
        config = EncoderConfig.from_hf_config(hf_config)
        load = lambda ckpt: load_encoder(ckpt, config, dtype, device)  # noqa: E731
        # bidirectional attention: a shared prefix would see the documents, so never share
        share_prefix = False
    elif model_type == "modernbert" and head.kind == "classifier":
        config = ModernBertConfig.from_hf_config(hf_config)

        def load(ckpt):
            model = load_modernbert(ckpt, config, dtype, device)
            if quantize == "none":  # bf16 CPU: oneDNN-prepacked linears, 1.3-2x per request
                prepack_linears(model, device, dtype)  # (base shape, W-CPU); a no-op elsewhere
            return model

        share_prefix = False  # bidirectional, as the encoders above
    else:
        raise UnsupportedCheckpoint(f"no packed implementation for model_type {model_type!r}")
    with open_checkpoint(model_dir) as checkpoint:
        try:
            model = load(checkpoint)
        except KeyError as exc:  # unusual tensor names: the generic engine copes
            raise UnsupportedCheckpoint(f"unexpected checkpoint layout ({exc})") from exc
    onednn = False
    decoder = model_type in DECODERS or model_type in LAYERWISE
    if decoder and quantize == "none":
        onednn = prepack_linears(model, device, dtype) > 0
    if quantize == "int8":
        model, dtype = quantize_int8(model, dtype, choice)
        onednn = w8a8
    if quantize == "fp8":
        quantize_fp8(model, fuse_bias)
    if onednn and decoder:
        model.decoder.set_row_multiple(ONEDNN_ROW_MULTIPLE)
    engine_class = LayerwiseEngine if model_type in LAYERWISE else PackedEngine
    if model_type in LIGHTWEIGHT:
        engine_class = LightweightEngine
    engine = engine_class(
        model,
        device,
        dtype,
        share_prefix=share_prefix,
        vocab_size=config.vocab_size,
        compile=compile,
        quantized=quantize != "none",
        attention=attention,
    )
    if quantize == "int8":
        engine.dtype = f"int8-dynamic ({engine.dtype} activations)"
    elif quantize == "fp8":
        engine.dtype = f"fp8-e4m3 ({engine.dtype} activations)"
    return engine
