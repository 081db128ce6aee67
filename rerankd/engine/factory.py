"""Builds the packed engine for a checkpoint: which of our model implementations serves it (by
`config.model_type`), loaded, prepacked or quantized, and wrapped in `PackedEngine`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rerankd.engine.layerwise import LayerwiseEngine
from rerankd.engine.lightweight import LightweightEngine
from rerankd.engine.packed_engine import PackedEngine
from rerankd.models.decoder import DECODER_TYPES, DecoderConfig
from rerankd.models.decoder_weights import load_decoder_reranker
from rerankd.models.encoder import EncoderConfig, load_encoder
from rerankd.models.gemma2_lightweight import LightweightConfig, load_lightweight
from rerankd.models.loader import UnsupportedCheckpoint
from rerankd.models.minicpm import LayerwiseConfig, load_layerwise
from rerankd.models.modernbert import ModernBertConfig, load_modernbert
from rerankd.models.weights import Checkpoint, open_checkpoint
from rerankd.ops.fp8 import fp8_refusal, probe_fp8, quantize_fp8
from rerankd.ops.prepack import ONEDNN_ROW_MULTIPLE, prepack_linears
from rerankd.ops.quantize import Int8Choice, choose_int8, quantize_int8
from rerankd.types import ScoreHead

ENCODERS = ("bert", "xlm-roberta", "roberta", "camembert")
#: decoders with one score head per layer (bge-reranker-v2-minicpm-layerwise)
LAYERWISE = ("minicpm",)
#: Gemma2 with token compression and per-layer heads (bge-reranker-v2.5-gemma2-lightweight)
LIGHTWEIGHT = ("cost_wise_gemma",)

__all__ = ["UnsupportedCheckpoint", "build_packed_engine"]


@dataclass(frozen=True)
class _Quantization:
    """What `--quantize` runs here, decided (or refused) before loading."""

    mode: str
    #: the activation dtype (the torch.ao int8 fallback takes float32)
    dtype: torch.dtype
    int8: Int8Choice | None = None
    #: fp8: the bias rides the scaled GEMM's epilogue
    fp8_fuse_bias: bool = False


@dataclass(frozen=True)
class _Implementation:
    """Our model code for one checkpoint: its config, how to load it, and its engine."""

    config: Any
    load: Callable[[Checkpoint], nn.Module]
    #: shared prompt prefixes computed once (causal models whose positions stay as packed)
    share_prefix: bool
    engine: type[PackedEngine] = PackedEngine
    #: a decoder stream (`model.decoder`): prepacked in bf16, padded for oneDNN linears
    decoder: bool = False
    #: bf16 on CPU: every linear prepacked, biased ones too (bias, GELU and residual adds
    #: on the GEMM's accumulator; the BERT/XLM-R and ModernBERT encoders)
    prepack: bool = False


def build_packed_engine(
    model_dir: Path,
    hf_config: Any,
    head: ScoreHead,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str = "none",
    compile: str = "off",
    attention: str = "auto",
    cuda_graphs: str = "off",
) -> PackedEngine:
    """Our packed engine for this checkpoint, or UnsupportedCheckpoint saying why not."""
    q = _quantization(quantize, device, dtype)
    impl = _implementation(hf_config, head, q, device)
    with open_checkpoint(model_dir) as checkpoint:
        try:
            model = impl.load(checkpoint)
        except KeyError as exc:  # unusual tensor names: the generic engine copes
            raise UnsupportedCheckpoint(f"unexpected checkpoint layout ({exc})") from exc
    model, dtype = _fast_linears(model, impl, q, device)
    engine = impl.engine(
        model,
        device,
        dtype,
        share_prefix=impl.share_prefix,
        vocab_size=impl.config.vocab_size,
        compile=compile,
        quantized=q.mode != "none",
        attention=attention,
        cuda_graphs=cuda_graphs,
    )
    if q.mode == "int8":
        engine.dtype = f"int8-dynamic ({engine.dtype} activations)"
    elif q.mode == "fp8":
        engine.dtype = f"fp8-e4m3 ({engine.dtype} activations)"
    return engine


def _quantization(quantize: str, device: torch.device, dtype: torch.dtype) -> _Quantization:
    """int8: the implementation `choose_int8` finds (none fast and correct here: serve as
    without); fp8: refused before loading unless CUDA 8.9+ with bf16 activations."""
    if quantize == "int8":
        if device.type != "cpu":
            raise ValueError("--quantize int8 runs on CPU only")
        choice = choose_int8(dtype)
        if choice.path == "none":
            return _Quantization("none", dtype)
        # the torch.ao fallback's int8 linears take float32
        return _Quantization("int8", dtype if choice.w8a8 else torch.float32, choice)
    if quantize == "fp8":
        refusal = fp8_refusal(device)
        if refusal is not None:
            raise ValueError(f"--quantize fp8: {refusal}")
        if dtype != torch.bfloat16:  # the row-wise scaled GEMM writes bf16 only on CUDA
            raise ValueError(f"--quantize fp8 runs bf16 activations; got --dtype {dtype}")
        fuse_bias, _ = probe_fp8(device, dtype)  # RuntimeError: the kernel is broken here
        return _Quantization("fp8", dtype, fp8_fuse_bias=fuse_bias)
    return _Quantization(quantize, dtype)


def _implementation(
    hf_config: Any, head: ScoreHead, q: _Quantization, device: torch.device
) -> _Implementation:
    """Which of our model implementations serves `hf_config`'s `model_type` with `head`."""
    model_type = getattr(hf_config, "model_type", None)
    dtype = q.dtype
    if model_type in DECODER_TYPES:
        config = DecoderConfig.from_hf_config(hf_config)
        return _Implementation(
            config,
            lambda ckpt: load_decoder_reranker(ckpt, config, head, dtype, device),
            share_prefix=True,
            decoder=True,
        )
    if model_type in LIGHTWEIGHT and head.kind == "layers":
        if q.mode != "none":
            raise ValueError("gemma2-lightweight: --quantize is not implemented; drop it")
        config = _own_config(LightweightConfig, hf_config, "lightweight")
        load = lambda ckpt: load_lightweight(ckpt, config, dtype, device)  # noqa: E731
        # compression renumbers positions (engine/lightweight.py): no shared prefixes
        return _Implementation(config, load, share_prefix=False, engine=LightweightEngine)
    if model_type in LAYERWISE and head.kind == "layers":
        config = _own_config(LayerwiseConfig, hf_config, "layerwise")
        load = lambda ckpt: load_layerwise(ckpt, config, dtype, device)  # noqa: E731
        return _Implementation(config, load, True, engine=LayerwiseEngine, decoder=True)
    if model_type in ENCODERS and head.kind == "classifier":
        config = EncoderConfig.from_hf_config(hf_config)
        load = lambda ckpt: load_encoder(ckpt, config, dtype, device)  # noqa: E731
        # bidirectional attention: a shared prefix would see the documents, so never share
        return _Implementation(config, load, share_prefix=False, prepack=True)
    if model_type == "modernbert" and head.kind == "classifier":
        config = ModernBertConfig.from_hf_config(hf_config)
        load = lambda ckpt: load_modernbert(ckpt, config, dtype, device)  # noqa: E731
        # bidirectional, as above; prepacked bf16 linears: 1.3-2x per request (base shape)
        return _Implementation(config, load, share_prefix=False, prepack=True)
    raise UnsupportedCheckpoint(f"no packed implementation for model_type {model_type!r}")


def _own_config(config_class: Any, hf_config: Any, family: str) -> Any:
    """The config of a family only our engine runs: no fallback, so unsupported is an error."""
    try:
        return config_class.from_hf_config(hf_config)
    except UnsupportedCheckpoint as exc:
        raise ValueError(f"cannot serve this {family} checkpoint: {exc}") from exc


def _fast_linears(
    model: nn.Module, impl: _Implementation, q: _Quantization, device: torch.device
) -> tuple[nn.Module, torch.dtype]:
    """The model with its linears prepacked (bf16 on CPU: decoders and encoders) or
    quantized, the decoder stream padded for oneDNN's row counts; and the activation dtype
    the engine runs."""
    dtype, onednn = q.dtype, False
    if (impl.decoder or impl.prepack) and q.mode == "none":  # a no-op off CPU / in float32
        onednn = prepack_linears(model, device, dtype) > 0
    if q.mode == "int8":
        model, dtype = quantize_int8(model, dtype, q.int8)
        onednn = q.int8 is not None and q.int8.w8a8
    if q.mode == "fp8":
        quantize_fp8(model, q.fp8_fuse_bias)
    if onednn and impl.decoder:
        model.decoder.set_row_multiple(ONEDNN_ROW_MULTIPLE)
    return model, dtype
