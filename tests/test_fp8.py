"""Opt-in fp8 (`--quantize fp8`), on CPU: the module and the model swap.

`torch._scaled_mm` runs on CPU (a reference implementation), so the arithmetic is pinned
here: per-output-channel weight scales, per-token activation scales, e4m3's rounding, zero
rows, bias, and a whole tiny model keeping its ranking where scores are clearly apart.
Serving fp8 needs CUDA 8.9+ and is refused on CPU (tested); its speed and its fidelity on
the real shapes are measured on the GPU machine (tests/gpu/test_fp8_cuda.py,
benchmarks/bench_gpu.py --quantize fp8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.ops.fp8 import (
    E4M3_MAX,
    Fp8Linear,
    fp8_refusal,
    probe_fp8,
    quantize_fp8,
    quantize_rows,
)
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch

QUERY = "what is the capital of china?"
DOCS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。",
    "The capital of France is Paris, a city on the Seine.",
    "yes no yes no maybe",
    "Photosynthesis turns light into chemical energy in plants.",
]

#: e4m3 keeps 3 mantissa bits: a normal value is off by at most half a step, 2^-4 relative
_REL = 2.0**-4
#: below 2^-6 (e4m3's smallest normal, times the row's scale) the step is fixed: 2^-9
_SUBNORMAL_STEP = 2.0**-9


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst |fp8 product - float product| per output, from each operand's rounding bound
    (relative for normals, absolute half a subnormal step times the row's scale)."""
    x, w = x.double(), w.double()
    sx = x.abs().amax(1, keepdim=True) / E4M3_MAX
    sw = w.abs().amax(1, keepdim=True) / E4M3_MAX
    ex = _REL * x.abs() + _SUBNORMAL_STEP / 2 * sx
    ew = _REL * w.abs() + _SUBNORMAL_STEP / 2 * sw
    return ex @ w.abs().T + x.abs() @ ew.T + ex @ ew.T


def _exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The product of the quantized operands, dequantized, in float64."""
    qx, sx = quantize_rows(x)
    qw, sw = quantize_rows(w)
    return (qx.double() * sx.double()) @ (qw.double() * sw.double()).T


def test_rows_quantize_onto_e4m3_with_amax_at_448():
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(1), torch.full((8,), E4M3_MAX))
    back = q.double() * scale.double()
    assert ((back - x.double()).abs() <= _REL * x.abs() + _SUBNORMAL_STEP * scale).all()


def test_fp8_linear_computes_the_e4m3_arithmetic_and_is_close_to_float32():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 128, generator=gen), torch.randn(96, 128, generator=gen)
    layer = Fp8Linear(w, None)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (37, 96)
    # the quantized operands' product exactly (float32 accumulation order aside) ...
    torch.testing.assert_close(got.double(), _exact(x, w), rtol=1e-5, atol=1e-4)
    # ... which is within e4m3's rounding of the float32 linear
    error = (got.double() - (x.double() @ w.double().T)).abs()
    assert (error <= _bound(x, w)).all()
    # and typically far inside it: a few percent of the outputs' spread
    assert error.max() < 0.1 * (x @ w.T).abs().max()


def test_activation_scales_are_per_token():
    """A loud token does not cost the others resolution: every row's output is the one it
    gets alone (a per-tensor scale would flatten the quiet rows to zero)."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 64, generator=gen), torch.randn(32, 64, generator=gen)
    loud = x.clone()
    loud[2] *= 1e4
    layer = Fp8Linear(w, None)
    together, alone = layer(loud), torch.cat([layer(row[None]) for row in loud])
    # (equal up to the float32 accumulation order, which may change with the row count)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    quiet = [0, 1, 3, 4, 5]
    torch.testing.assert_close(together[quiet], layer(x)[quiet], rtol=1e-4, atol=1e-5)


def test_weight_scales_are_per_output_channel():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 64, generator=gen), torch.randn(32, 64, generator=gen)
    loud = w.clone()
    loud[7] *= 1e4
    kept = [i for i in range(32) if i != 7]
    torch.testing.assert_close(
        Fp8Linear(loud, None)(x)[:, kept], Fp8Linear(w, None)(x)[:, kept], rtol=1e-6, atol=1e-5
    )


def test_zero_rows_give_zero_outputs_and_no_nan():
    w = torch.randn(32, 64)
    x = torch.randn(4, 64)
    x[1] = 0.0  # a padding row
    out = Fp8Linear(w, None)(x)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(32))
    biased = Fp8Linear(w, torch.randn(32))
    assert torch.equal(biased(torch.zeros(3, 64)), biased.bias.expand(3, 32))


@pytest.mark.parametrize("fuse_bias", [True, False], ids=["epilogue", "separate-add"])
def test_bias_is_added_once_either_way(fuse_bias):
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((9, 64), (48, 64), (48,)))
    got = Fp8Linear(w, b, fuse_bias=fuse_bias)(x)
    torch.testing.assert_close(got.double(), _exact(x, w) + b.double(), rtol=1e-5, atol=1e-4)


def test_bf16_activations_give_bf16_outputs_and_leading_dims_are_kept():
    w = torch.randn(32, 64).bfloat16()
    x = torch.randn(2, 3, 64).bfloat16()
    out = Fp8Linear(w, torch.randn(32).bfloat16())(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 32)


def test_the_startup_probe_passes_where_the_kernel_is_right():
    for dtype in (torch.float32, torch.bfloat16):
        fused, worst = probe_fp8(torch.device("cpu"), dtype)
        assert fused and worst < 2.0**-7


def test_the_startup_probe_refuses_a_wrong_kernel(monkeypatch):
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: 1.01 * real(*a, **k))
    with pytest.raises(RuntimeError, match="disagrees with the e4m3 arithmetic"):
        probe_fp8(torch.device("cpu"), torch.float32)
    # 16-bit outputs allow for fp8 tensor cores' accumulation (2^-5), not for a wrong scale
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: 1.1 * real(*a, **k))
    with pytest.raises(RuntimeError, match="bias fused: disagrees.*bias added: disagrees"):
        probe_fp8(torch.device("cpu"), torch.bfloat16)


def test_the_startup_probe_refuses_a_kernel_that_drops_the_bias(monkeypatch):
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, bias=None, **k: real(*a, **k))
    fused, _ = probe_fp8(torch.device("cpu"), torch.bfloat16)
    assert not fused  # the bias is then added after the GEMM, where it is not lost


def test_swap_covers_fused_gate_up_and_leaves_unaligned_heads():
    class Block(nn.Module):
        GATED_LINEAR = "w13"
        activation = "silu"

        def __init__(self):
            super().__init__()
            self.w13 = nn.Linear(64, 256, bias=False)
            self.w2 = nn.Linear(128, 64, bias=True)
            self.head = nn.Linear(64, 1)  # a 1-column score head: not 16-aligned

    block = Block()
    assert quantize_fp8(block) == 2
    assert isinstance(block.w13, Fp8Linear) and isinstance(block.w2, Fp8Linear)
    assert block.w2.bias is not None and type(block.head) is nn.Linear
    # the model splits a plain gate ‖ up output itself: the fp8 one must not claim fusion
    assert not getattr(block.w13, "fuses_activation", False)


def test_serving_fp8_on_cpu_is_refused_with_the_reason(qwen3_dir):
    assert "on CPU use --quantize int8" in fp8_refusal(torch.device("cpu"))
    settings = Settings(model=str(qwen3_dir), device="cpu", engine="packed", quantize="fp8")
    with pytest.raises((ModelLoadError, ValueError), match="fp8 serves on CUDA"):
        load_model(settings, Metrics())


def _scores(engine, recipe) -> list[float]:
    pairs = recipe.encode([QUERY] * len(DOCS), DOCS)
    return engine.score(Batch(pairs, [0] * len(pairs)))


@pytest.mark.parametrize("fixture", ["qwen3_dir", "gemma_dir", "xlmr_dir"])
def test_a_quantized_tiny_model_keeps_its_ranking_where_scores_are_clearly_apart(fixture, request):
    settings = Settings(
        model=str(request.getfixturevalue(fixture)),
        device="cpu",
        dtype="float32",
        engine="packed",
        compile="off",
        attention="sdpa",
    )
    served = load_model(settings, Metrics())
    engine = served.scheduler.engine
    before = _scores(engine, served.recipe)
    swapped = quantize_fp8(engine.model)  # the test-only path: CPU's reference _scaled_mm
    assert swapped >= 8  # every layer's q/k/v, output, gate ‖ up and down projections
    after = _scores(engine, served.recipe)
    worst = max(abs(a - b) for a, b in zip(before, after, strict=True))
    # tiny random fixtures are a worst case (64-wide dot products, logits that cancel):
    # raw scores moved 0.28-0.32 here, probabilities 0.05-0.07; the bound is int8's
    # (tests/test_quantize.py)
    moved = max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(before, after, strict=True))
    assert worst > 0 and moved < 0.15
    apart = [
        (i, j)
        for i in range(len(DOCS))
        for j in range(len(DOCS))
        if before[i] - before[j] > 2 * worst
    ]
    assert apart, "no clearly separated pair to check: this test checks nothing"
    for i, j in apart:  # clearly apart: the order holds
        assert after[i] > after[j], (i, j, before, after)


def test_a_non_contiguous_input_gives_the_contiguous_inputs_output():
    layer = Fp8Linear(torch.randn(32, 64), torch.randn(32))
    x = torch.randn(64, 9).t()  # (9, 64), column-major
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))
