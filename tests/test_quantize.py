"""Opt-in int8: the quantized engine really runs int8 linears, and scores stay close.

Unit tests pin the W8A8 layers to the int8 arithmetic they stand for (quantized operands,
exact integer products, float scales); model tests bound how far int8 moves the scores of
the tiny fixtures, eager and compiled, and check the torch.ao fallback still serves."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from rerankd.engine import quantize
from rerankd.engine.quantize import (
    Int8GatedLinear,
    Int8Linear,
    onednn_int8_supported,
    quantize_per_tensor,
    quantize_weight,
)
from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.paths import fixture_dir

DOCS = [
    "Beijing is the capital of China.",
    "Gravity is a force.",
    "北京是中国的首都",
    "Paris is in France",
    "yes no",
]

needs_onednn_int8 = pytest.mark.skipif(
    not onednn_int8_supported(torch.float32), reason="oneDNN int8 linear not available here"
)


def _int8_reference(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """What an int8 linear computes: quantized operands, their product, the scales."""
    qx, sx = quantize_per_tensor(x)
    qw, sw = quantize_weight(weight)
    out = (qx.double() @ qw.double().T) * sx.double() * sw.double()
    return (out if bias is None else out + bias.double()).float()


def test_activation_quantization_is_symmetric_and_within_half_a_step():
    x = torch.randn(64, 48) * torch.linspace(0.1, 30, 48)
    q, scale = quantize_per_tensor(x)
    assert q.dtype == torch.int8 and scale.shape == ()
    assert q.abs().max().item() == 127  # the largest |x| maps to the end of the grid
    assert (q.float() * scale - x).abs().max() <= scale / 2 * (1 + 1e-5)
    zero, zero_scale = quantize_per_tensor(torch.zeros(3, 4))
    assert not zero.any() and zero_scale > 0


def test_weight_quantization_is_per_output_channel():
    weight = torch.randn(6, 10) * torch.tensor([1e-3, 1, 10, 100, 0.5, 2.0])[:, None]
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses its full grid
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


@needs_onednn_int8
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_int8_product_in_float32(bias):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 64, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    x = torch.randn(3, 7, 64, generator=gen)  # leading dims are kept
    got = Int8Linear(weight, b)(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, _int8_reference(x, weight, b), atol=1e-4, rtol=1e-4)


@needs_onednn_int8
def test_int8_linear_in_bf16_and_its_residual_epilogue():
    if not onednn_int8_supported(torch.bfloat16):
        pytest.skip("oneDNN int8 linear with bf16 output not available here")
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 48, generator=gen)
    x = torch.randn(20, 48, generator=gen).bfloat16()
    residual = torch.randn(20, 32, generator=gen).bfloat16()
    layer = Int8Linear(weight, None)
    expected = _int8_reference(x, weight)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=1e-2)
    kept = residual.clone()
    summed = layer.plus(x, residual)
    assert torch.equal(residual, kept)  # the epilogue reads the residual, never writes it
    torch.testing.assert_close(summed.float(), expected + residual.float(), atol=0.1, rtol=1e-2)


@needs_onednn_int8
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_int8_gated_linear_quantizes_once_and_applies_the_activation(activation):
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(2 * 24, 32, generator=gen)
    x = torch.randn(9, 32, generator=gen)
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    gate, up = _int8_reference(x, w13[:24]), _int8_reference(x, w13[24:])
    got = Int8GatedLinear(w13, activation)(x)
    torch.testing.assert_close(got, act(gate) * up, atol=1e-4, rtol=1e-4)


def _scores(name: str, quantize: str, dtype: str = "float32", compile: str = "off"):
    settings = Settings(
        model=str(fixture_dir(name)), dtype=dtype, quantize=quantize, compile=compile
    )
    model = load_model(settings, Metrics())
    pairs = model.recipe.encode(["capital of china"] * len(DOCS), DOCS)
    return model, model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


def _assert_close_to(exact: list[float], quantized: list[float]) -> None:
    assert quantized != exact  # really a different computation
    # tiny random fixtures are a worst case for int8; real models move far less
    assert max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(exact, quantized, strict=True)) < 0.15
    best = max(range(len(exact)), key=exact.__getitem__)
    if exact[best] - sorted(exact)[-2] > 0.3:
        assert max(range(len(quantized)), key=quantized.__getitem__) == best


def _int8_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.scheduler.engine.model.modules() if isinstance(m, Int8Linear)]


@needs_onednn_int8
@pytest.mark.parametrize("name", ["qwen3", "gemma", "xlmr", "bert"])
def test_int8_scores_stay_close_to_float32(name):
    _, exact = _scores(name, "none")
    model, quantized = _scores(name, "int8")
    engine = model.scheduler.engine
    assert engine.dtype == "int8-dynamic (float32 activations)"
    assert _int8_layers(model)
    assert not [m for m in engine.model.modules() if type(m) is torch.nn.Linear]
    _assert_close_to(exact, quantized)


@needs_onednn_int8
def test_int8_with_bf16_activations_stays_close_to_bf16():
    if not onednn_int8_supported(torch.bfloat16):
        pytest.skip("oneDNN int8 linear with bf16 output not available here")
    _, exact = _scores("qwen3", "none", dtype="bfloat16")
    model, quantized = _scores("qwen3", "int8", dtype="bfloat16")
    assert model.scheduler.engine.dtype == "int8-dynamic (bfloat16 activations)"
    assert any(isinstance(m, Int8GatedLinear) for m in model.scheduler.engine.model.modules())
    _assert_close_to(exact, quantized)


@needs_onednn_int8
def test_compiled_int8_runs_compiled_and_agrees_with_eager_int8():
    _, eager = _scores("qwen3", "int8")
    model, compiled = _scores("qwen3", "int8", compile="auto")  # auto compiles int8 on CPU
    assert model.scheduler.engine.compiled is True
    # the same int8 computation up to where an activation rounds at an int8 step boundary
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 0.25


def test_without_onednn_int8_the_torch_ao_fallback_serves_float32(monkeypatch):
    from rerankd.models import registry

    monkeypatch.setattr(registry, "onednn_int8_supported", lambda dtype: False)
    monkeypatch.setattr(quantize, "onednn_int8_supported", lambda dtype: False)
    _, exact = _scores("qwen3", "none")
    model, quantized = _scores("qwen3", "int8", dtype="bfloat16")
    engine = model.scheduler.engine
    assert engine.dtype == "int8-dynamic (float32 activations)"
    linears = [m for m in engine.model.modules() if type(m).__name__ == "Linear"]
    assert linears and all("quantized" in type(m).__module__ for m in linears)
    _assert_close_to(exact, quantized)


def test_int8_needs_the_packed_engine():
    settings = Settings(model=str(fixture_dir("qwen3")), quantize="int8", engine="transformers")
    with pytest.raises(ModelLoadError, match="packed engine"):
        load_model(settings, Metrics())


@needs_onednn_int8
def test_int8_padding_rows_never_move_activation_scales(monkeypatch):
    """Padding rows stay zero through every layer, so the per-tensor activation scales and
    with them every int8 score are the same padded or not."""
    model, padded = _scores("qwen3", "int8")
    decoder = model.scheduler.engine.model.decoder
    assert decoder.row_multiple > 1
    pairs = model.recipe.encode(["capital of china"] * len(DOCS), DOCS)
    assert sum(len(p) for p in pairs) % decoder.row_multiple, "the batch must need padding"
    with _padding_rows_checked(decoder, sum(len(p) for p in pairs)) as checked:
        model.scheduler.engine.score(Batch(pairs))  # unshared: the stream is every token
    assert len(checked) == len(decoder.layers)
    monkeypatch.setattr(decoder, "row_multiple", 1)
    unpadded = model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))
    assert padded == pytest.approx(unpadded, abs=1e-5)


@contextmanager
def _padding_rows_checked(decoder, real_rows: int):
    """Hooks every layer: the rows after the stream's first `real_rows` must leave it
    exactly zero. Yields the list of layers checked."""
    checked: list = []

    def check(layer, args, out):
        padding = len(args[0]) - real_rows
        assert padding > 0 and not out[len(out) - padding :].any()
        checked.append(layer)

    handles = [layer.register_forward_hook(check) for layer in decoder.layers]
    try:
        yield checked
    finally:
        for handle in handles:
            handle.remove()
