"""models/decoder.py: each family's Hugging Face config read into `DecoderConfig` (or refused
with the reason), and the engine's kernel choice as the decoder takes it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GemmaConfig, Qwen2Config, Qwen3Config

from rerankd.models.decoder import (
    EAGER_TOKENS,
    Decoder,
    DecoderConfig,
    TokenFunctions,
    project_tokens,
)
from rerankd.models.kernels import Kernels
from rerankd.models.loader import UnsupportedCheckpoint

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
)


def _qwen3(**overrides) -> Qwen3Config:
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    return Qwen3Config(**{**SHAPE, "rope_parameters": rope, **overrides})


def test_qwen3_qwen2_and_gemma_configs_read_into_their_decoder_shapes():
    qwen3 = DecoderConfig.from_hf_config(_qwen3())
    assert (qwen3.num_layers, qwen3.num_heads, qwen3.num_kv_heads, qwen3.head_dim) == (2, 4, 2, 16)
    assert qwen3.qk_norm and not qwen3.gemma_norm and qwen3.activation == "silu"
    assert qwen3.rope_theta == 1000000.0 and qwen3.embed_scale == 1.0
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    qwen2 = DecoderConfig.from_hf_config(Qwen2Config(**SHAPE, rope_parameters=rope))
    assert not qwen2.qk_norm and qwen2.activation == "silu" and qwen2.rope_theta == 10000.0
    gemma = DecoderConfig.from_hf_config(GemmaConfig(**SHAPE, hidden_activation="gelu"))
    assert gemma.gemma_norm and gemma.activation == "gelu_tanh"
    assert gemma.embed_scale == math.sqrt(64) and not gemma.qk_norm


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (_qwen3(use_sliding_window=True), "sliding-window attention"),
        (_qwen3(hidden_act="gelu"), "Qwen3 activation 'gelu'"),
        (_qwen3(attention_bias=True), "attention biases"),
        (_qwen3(rope_parameters={"rope_type": "linear", "factor": 2.0}), "RoPE type 'linear'"),
        (GemmaConfig(**SHAPE, hidden_act="relu"), "Gemma activation 'relu'"),
    ],
)
def test_what_our_decoder_does_not_implement_is_refused_with_the_reason(config, reason):
    with pytest.raises(UnsupportedCheckpoint, match=reason):
        DecoderConfig.from_hf_config(config)


def test_an_unknown_model_type_is_refused_and_a_named_family_overrides_the_config():
    config = _qwen3()
    config.model_type = "not-a-decoder"  # e.g. a wrapper's own type over a Qwen3 backbone
    with pytest.raises(UnsupportedCheckpoint, match="not-a-decoder"):
        DecoderConfig.from_hf_config(config)
    assert DecoderConfig.from_hf_config(config, model_type="qwen3").qk_norm


def test_the_decoder_runs_the_kernels_the_engine_hands_it():
    decoder = Decoder(DecoderConfig.from_hf_config(_qwen3()))
    assert decoder.kernels == Kernels() and decoder.tokens is EAGER_TOKENS
    decoder.set_kernels(Kernels("sdpa", compiled=True))
    compiled = decoder.tokens
    assert compiled.project is not project_tokens  # torch.compile's wrapper
    decoder.set_kernels(Kernels("sdpa"))
    assert decoder.tokens is EAGER_TOKENS
    decoder.set_kernels(Kernels("sdpa", compiled=True))
    assert decoder.tokens is compiled  # compiled once per model, not per switch
    with pytest.raises(ValueError, match="no-such-kernel"):
        decoder.set_kernels(Kernels("no-such-kernel"))
    assert decoder.kernels == Kernels("sdpa", compiled=True)  # a refused choice changes nothing


def test_a_forward_uses_the_attention_kernel_chosen(monkeypatch):
    from rerankd.ops import attention
    from rerankd.ops.batch import pack
    from rerankd.types import EncodedPair

    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(len(args[0]))
        return attention.ATTENTION["sdpa"](*args, **kwargs)

    monkeypatch.setitem(attention.ATTENTION, "counting", counting_sdpa)
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig.from_hf_config(_qwen3())).eval()
    batch = pack(
        [EncodedPair(tuple(range(1, 20))), EncodedPair(tuple(range(5, 9)))],
        None,
        torch.device("cpu"),
    )
    with torch.inference_mode():
        expected = decoder(batch)
        decoder.set_kernels(Kernels("counting"))
        got = decoder(batch)
    assert calls == [23, 23]  # once per layer, over the whole stream
    assert torch.equal(got, expected)


@pytest.mark.parametrize("row_multiple", [1, 16])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_the_last_layer_computes_only_the_last_tokens_and_gives_the_same_states(
    monkeypatch, shared_prefix, row_multiple
):
    """`last_only`: the last layer's attention, output projection and MLP run for each
    sequence's last token only (N rows, padded to the stream's row multiple), and those
    rows' hidden states equal the full forward's (float32)."""
    from rerankd.ops import attention
    from rerankd.ops.batch import pack
    from rerankd.types import EncodedPair

    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig.from_hf_config(_qwen3(num_hidden_layers=3))).eval()
    decoder.set_row_multiple(row_multiple)
    common = tuple(range(100, 112))
    pairs = [EncodedPair(common + tuple(range(i, i + n))) for i, n in enumerate((7, 1, 30, 3, 12))]
    pairs.append(EncodedPair(tuple(range(40, 49))))  # its own group: no prefix
    batch = pack(pairs, [0, 0, 0, 0, 0, 1] if shared_prefix else None, torch.device("cpu"))
    assert bool(batch.prefixes) == shared_prefix
    finished = []

    def counting_finish(block, x, y):
        finished.append(len(x))
        return EAGER_TOKENS.finish(block, x, y)

    monkeypatch.setattr(attention, "ONE_QUERY_GROUP", 4)  # two groups: a copy and a view
    with torch.inference_mode():
        expected = decoder(batch)[batch.last]
        decoder.tokens = TokenFunctions(EAGER_TOKENS.project, counting_finish)
        got = decoder(batch, last_only=True)
    rows = len(batch.input_ids) + sum(batch.prefix_lengths)
    padded = rows + -rows % row_multiple
    # two full layers over the padded stream, then 6 rows (row multiple 1) or 16
    assert finished == [padded, padded, 6 if row_multiple == 1 else 16]
    assert got.shape == (6, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
