"""oneDNN-prepacked linear layers (bf16 on CPU) give exactly F.linear's outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rerankd.ops.prepack import (
    PrepackedGatedLinear,
    PrepackedLinear,
    activated_linear,
    prepack_linears,
    prepack_supported,
    residual_linear,
)

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not prepack_supported(CPU, torch.bfloat16), reason="this torch build has no oneDNN prepack"
)


@pytest.mark.parametrize("tokens", [1, 7, 300, 1024, 1500])
def test_prepacked_linear_equals_f_linear_for_any_token_count(tokens):
    torch.manual_seed(tokens)
    weight = (torch.randn(96, 64) * 0.05).bfloat16()
    x = torch.randn(tokens, 64).bfloat16()
    assert torch.equal(PrepackedLinear(weight)(x), F.linear(x, weight))


@pytest.mark.parametrize("tokens", [1, 7, 300, 1500])
def test_prepacked_linear_with_bias_equals_f_linear(tokens):
    """The bias is added on the float32 accumulator, and the result is still F.linear's."""
    torch.manual_seed(tokens)
    weight = (torch.randn(96, 64) * 0.05).bfloat16()
    bias = torch.randn(96).bfloat16()
    x = torch.randn(tokens, 64).bfloat16()
    assert torch.equal(PrepackedLinear(weight, bias)(x), F.linear(x, weight, bias))


def test_prepack_swaps_every_bf16_linear_and_keeps_outputs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 32, bias=True), nn.Linear(32, 8, bias=False)).bfloat16()
    x = torch.randn(5, 16).bfloat16()
    expected = model(x)
    assert prepack_linears(model, CPU, torch.bfloat16) == 2
    assert all(type(m) is PrepackedLinear for m in model)
    assert torch.equal(model(x), expected)
    # float32 keeps F.linear (the exact reference path)
    plain = nn.Sequential(nn.Linear(16, 32, bias=False))
    assert prepack_linears(plain, CPU, torch.float32) == 0


def test_the_packed_decoder_uses_prepacked_linears_in_bf16(qwen3_dir):
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    def linears(dtype: str) -> set[type]:
        settings = Settings(model=str(qwen3_dir), dtype=dtype, device="cpu", compile="off")
        model = load_model(settings, Metrics()).scheduler.engine.model
        return {
            type(m)
            for m in model.modules()
            if isinstance(m, nn.Linear | PrepackedLinear | PrepackedGatedLinear)
        }

    assert linears("bfloat16") == {PrepackedLinear, PrepackedGatedLinear}
    assert linears("float32") == {nn.Linear}


def test_the_packed_encoder_prepacks_its_biased_linears_in_bf16(xlmr_dir):
    """XLM-R/BERT linears all have biases: without them prepacked, bf16 encoders ran
    `addmm` (13 % of a forward copying the bias) plus separate GELU and residual passes."""
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    def linears(dtype: str) -> set[type]:
        settings = Settings(model=str(xlmr_dir), dtype=dtype, device="cpu", compile="off")
        model = load_model(settings, Metrics()).scheduler.engine.model
        return {type(m) for m in model.modules() if isinstance(m, nn.Linear | PrepackedLinear)}

    assert linears("bfloat16") == {PrepackedLinear}
    assert linears("float32") == {nn.Linear}


# --- oneDNN epilogues: the glue around the GEMMs done on the float32 accumulator ----------


def _inputs(seed: int = 0):
    torch.manual_seed(seed)
    weight = (torch.randn(96, 64) * 0.1).bfloat16()
    x = torch.randn(37, 64).bfloat16()
    other = torch.randn(37, 96).bfloat16()
    return weight, x, other, x.float() @ weight.float().T  # exact product in float32


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within one bf16 rounding of the float32 result (relative 2^-8, plus a floor)."""
    assert got.dtype == torch.bfloat16
    tolerance = want.abs() * 2**-8 + 1e-2
    assert bool(((got.float() - want).abs() <= tolerance).all())


def test_plus_adds_the_residual_to_the_product():
    weight, x, residual, product = _inputs()
    _close(PrepackedLinear(weight).plus(x, residual), product + residual.float())


def test_every_epilogue_adds_the_bias_first():
    weight, x, other, product = _inputs(6)
    bias = torch.randn(weight.shape[0]).bfloat16()
    linear, biased = PrepackedLinear(weight, bias), product + bias.float()
    _close(linear.plus(x, other), biased + other.float())
    _close(linear.times(x, other), biased * other.float())
    _close(linear.activated(x, "gelu"), F.gelu(biased))


def test_activated_linear_falls_back_to_the_separate_pass_for_plain_linears():
    torch.manual_seed(7)
    linear = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    assert torch.equal(activated_linear(linear, x, "gelu"), F.gelu(linear(x)))
    assert torch.equal(activated_linear(linear, x, "silu"), F.silu(linear(x)))


def test_times_multiplies_the_product():
    weight, x, other, product = _inputs(1)
    _close(PrepackedLinear(weight).times(x, other), product * other.float())


@pytest.mark.parametrize(
    "activation, reference",
    [
        ("silu", F.silu),
        ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
        ("gelu", F.gelu),  # exact (erf): BERT-family encoders
    ],
)
def test_activated_applies_the_activation(activation, reference):
    weight, x, _, product = _inputs(2)
    _close(PrepackedLinear(weight).activated(x, activation), reference(product))


def test_gated_linear_is_act_of_gate_times_up():
    torch.manual_seed(3)
    w13 = (torch.randn(2 * 48, 64) * 0.1).bfloat16()
    x = torch.randn(21, 64).bfloat16()
    gate, up = (x.float() @ w13.float().T).split(48, dim=-1)
    got = PrepackedGatedLinear(w13, "silu")(x)
    # two bf16 roundings (the activated gate, then the product)
    want = F.silu(gate) * up
    assert bool(((got.float() - want).abs() <= want.abs() * 2**-7 + 1e-2).all())


def test_prepack_fuses_a_declared_gate_and_up_projection():
    class Gated(nn.Module):
        GATED_LINEAR = "w13"

        def __init__(self, activation: str) -> None:
            super().__init__()
            self.activation = activation
            self.w13 = nn.Linear(16, 2 * 8, bias=False)
            self.w2 = nn.Linear(8, 16, bias=False)

    model = Gated("silu").bfloat16()
    assert prepack_linears(model, CPU, torch.bfloat16) == 2
    assert isinstance(model.w13, PrepackedGatedLinear) and isinstance(model.w2, PrepackedLinear)
    # an activation oneDNN cannot apply keeps the plain packed projection
    other = Gated("relu_squared").bfloat16()
    prepack_linears(other, CPU, torch.bfloat16)
    assert type(other.w13) is PrepackedLinear


def test_residual_linear_is_the_plain_sum_for_unpacked_layers():
    torch.manual_seed(4)
    linear = nn.Linear(8, 8, bias=False)
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(residual_linear(residual, linear, x), residual + linear(x))


# --- custom ops: compiled code keeps the packed GEMMs inside one graph -------------------


def _tiny_block(dtype: torch.dtype):
    from rerankd.models.decoder import Block, DecoderConfig

    config = DecoderConfig(
        vocab_size=32, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
        qk_norm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    block = Block(config).to(dtype)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
    return block, config


@pytest.mark.parametrize("quantized", [False, True])
@torch.inference_mode()  # as the engine runs it
def test_compiled_layer_code_has_no_graph_break_at_a_gemm(quantized):
    """A graph break per GEMM cost the compiled layer code ~8 % of W-CPU (Dynamo's entry
    and resume code five or six times a layer); the ops must stay in the graph."""
    from rerankd.models.decoder import finish_tokens, project_tokens, rotary
    from rerankd.ops.quantize import onednn_int8_supported, quantize_int8

    if quantized and not onednn_int8_supported(torch.bfloat16):
        pytest.skip("oneDNN int8 linear not available here")
    block, config = _tiny_block(torch.bfloat16)
    if quantized:
        quantize_int8(block, torch.bfloat16)
    else:
        assert prepack_linears(block, CPU, torch.bfloat16) == 4
    x = torch.randn(48, config.hidden_size).bfloat16()
    y = torch.randn(48, config.num_heads * config.head_dim).bfloat16()
    cos, sin = rotary(torch.arange(48), torch.rand(config.head_dim // 2), torch.bfloat16)
    for fn, args in ((project_tokens, (block, x, cos, sin)), (finish_tokens, (block, x, y))):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        # (`graph_break_count` stays 0 for a break at a function's first op: read reasons)
        assert not explained.break_reasons, explained.break_reasons
        assert explained.graph_count == 1
        compiled, eager = torch.compile(fn, dynamic=True)(*args), fn(*args)
        if isinstance(eager, torch.Tensor):
            compiled, eager = (compiled,), (eager,)
        for got, want in zip(compiled, eager, strict=True):
            assert (got.float() - want.float()).abs().max() < (0.5 if quantized else 0.1)


@torch.inference_mode()
def test_compiled_encoder_layer_code_keeps_biased_gemms_in_one_graph():
    from rerankd.models.encoder import Block, EncoderConfig, finish_tokens

    config = EncoderConfig(
        vocab_size=32, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96,
        max_position_embeddings=64, type_vocab_size=1, layer_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    block = Block(config).bfloat16()
    assert prepack_linears(block, CPU, torch.bfloat16) == 4
    x, y = torch.randn(40, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(finish_tokens)(block, x, y)
    assert not explained.break_reasons, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(finish_tokens, dynamic=True)(block, x, y)
    assert (compiled.float() - finish_tokens(block, x, y).float()).abs().max() < 0.1


def test_a_freed_packed_weight_is_a_clear_error():
    from rerankd.ops.onednn_ops import packed_linear

    layer = PrepackedLinear((torch.randn(8, 16) * 0.1).bfloat16())
    handle = layer.handle
    del layer
    with pytest.raises(RuntimeError, match="no longer exists"):
        packed_linear(torch.randn(2, 16).bfloat16(), handle, 8)
