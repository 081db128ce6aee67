"""Opt-in int8: the quantized engine really runs int8 linears, and scores stay close.

Unit tests pin the W8A8 layers to the int8 arithmetic they stand for (quantized operands,
exact integer products, float scales), with int8 and uint8 activations; the kernel choice
refuses reference kernels, wrong results and slow paths; model tests bound how far int8
moves the scores of the tiny fixtures, eager and compiled, and check the torch.ao fallback
and the no-int8 fallback still serve. Other CPU classes: tests/test_cpu_classes.py."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from rerankd.engine import factory
from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.ops import quantize
from rerankd.ops.int8_gemm import BrgemmInt8GatedLinear, BrgemmInt8Linear
from rerankd.ops.onednn_ops import onednn_implementations, parse_implementations
from rerankd.ops.quantize import (
    Int8Choice,
    Int8GatedLinear,
    Int8Linear,
    onednn_int8_supported,
    quantize_per_tensor,
    quantize_weight,
)
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


def test_uint8_activations_are_the_int8_grid_shifted_by_128():
    x = torch.randn(16, 24) * 3
    q, scale = quantize_per_tensor(x)
    u, same_scale = quantize_per_tensor(x, unsigned=True)
    assert u.dtype == torch.uint8 and torch.equal(same_scale, scale)
    assert torch.equal(u.int() - 128, q.int())


def test_weight_quantization_is_per_output_channel():
    weight = torch.randn(6, 10) * torch.tensor([1e-3, 1, 10, 100, 0.5, 2.0])[:, None]
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses its full grid
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


@needs_onednn_int8
@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_int8_product_in_float32(bias, unsigned):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 64, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    x = torch.randn(3, 7, 64, generator=gen)  # leading dims are kept
    got = Int8Linear(weight, b, unsigned=unsigned)(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, _int8_reference(x, weight, b), atol=1e-4, rtol=1e-4)


@needs_onednn_int8
@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8"])
def test_int8_linear_in_bf16_and_its_residual_epilogue(unsigned):
    if not onednn_int8_supported(torch.bfloat16):
        pytest.skip("oneDNN int8 linear with bf16 output not available here")
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 48, generator=gen)
    x = torch.randn(20, 48, generator=gen).bfloat16()
    residual = torch.randn(20, 32, generator=gen).bfloat16()
    layer = Int8Linear(weight, None, unsigned=unsigned)
    expected = _int8_reference(x, weight)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=1e-2)
    kept = residual.clone()
    summed = layer.plus(x, residual)
    assert torch.equal(residual, kept)  # the epilogue reads the residual, never writes it
    torch.testing.assert_close(summed.float(), expected + residual.float(), atol=0.1, rtol=1e-2)


@needs_onednn_int8
@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_int8_gated_linear_quantizes_once_and_applies_the_activation(activation, unsigned):
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(2 * 24, 32, generator=gen)
    x = torch.randn(9, 32, generator=gen)
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    gate, up = _int8_reference(x, w13[:24]), _int8_reference(x, w13[24:])
    got = Int8GatedLinear(w13, activation, unsigned)(x)
    torch.testing.assert_close(got, act(gate) * up, atol=1e-4, rtol=1e-4)


# --- kernel choice ----------------------------------------------------------------------

VERBOSE = """\
onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)
onednn_verbose,v1,primitive,exec,cpu,reorder,simple:any,undef,src:s8::blocked:ba::f0,,512x512,1.5
onednn_verbose,v1,primitive,exec,cpu,matmul,ref_int8:any,undef,src:s8:a:blocked:ab::f0,,256x512,1076
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_vnni,undef,src:u8,,256x512,0.8
dnnl_verbose,exec,cpu,inner_product,gemm:jit,forward_inference,src_f32::blocked:ab,,mb2ic4oc4,0.1
"""


def test_verbose_output_names_each_gemm_implementation():
    assert parse_implementations(VERBOSE) == {
        "ref_int8:any",
        "brg_matmul:avx512_core_vnni",
        "gemm:jit",
    }


@needs_onednn_int8
def test_this_torch_build_reports_the_int8_kernel_it_runs():
    """The kernel choice reads oneDNN's verbose mode at run time: it must see a real name."""
    layer = Int8Linear(torch.randn(16, 32), None)
    out, names = onednn_implementations(lambda: layer(torch.randn(4, 32)))
    assert out.shape == (4, 16)
    assert names and all(":" in name for name in names), names


@pytest.fixture
def fresh_choice(monkeypatch):
    """`choose_int8` without its cache (restored after the test)."""
    monkeypatch.setattr(quantize, "choose_int8", quantize.choose_int8.__wrapped__)
    return quantize.choose_int8


@needs_onednn_int8
def test_a_reference_kernel_is_refused_and_the_next_path_taken(fresh_choice, monkeypatch):
    """As on a CPU without AMX: oneDNN reports its reference kernel for int8 activations."""
    real_probe = quantize._w8a8_probe

    def probe(dtype, unsigned):
        build = real_probe(dtype, unsigned)

        def reported_as_the_reference_kernel(shape):
            result = build(shape)
            if not unsigned:  # what oneDNN's verbose mode prints, to file descriptor 1
                os.write(1, VERBOSE.splitlines()[2].encode() + b"\n")
            return result

        return reported_as_the_reference_kernel

    monkeypatch.setattr(quantize, "_w8a8_probe", probe)
    # oneDNN's W8A8 encodings only: rerankd's own kernel (tests/test_int8_gemm.py) stays out
    monkeypatch.setattr(quantize.int8_gemm, "load_kernel", lambda: None)
    choice = fresh_choice(torch.float32)
    assert choice.path == "w8a8-uint8" and choice.unsigned and choice.speedup > 0
    assert choice.implementations and not any(i.startswith("ref") for i in choice.implementations)
    assert dict(choice.refused) == {
        "w8a8-brgemm": "kernel unavailable (needs AVX512-VNNI and a build)",
        "w8a8-int8": "oneDNN reference kernel ref_int8:any",
    }
    assert "w8a8-int8: oneDNN reference kernel" in choice.describe()


@needs_onednn_int8
def test_a_slower_int8_path_is_refused_and_the_model_served_without_int8(
    fresh_choice, monkeypatch, caplog
):
    def int8_three_times_slower(runs, repeats, budget_s=0.0):
        return {"int8": 3e-3, "base": 1e-3} if "int8" in runs else {}

    monkeypatch.setattr(quantize, "_best_times", int8_three_times_slower)
    with caplog.at_level(logging.WARNING, logger="rerankd.ops.quantize"):
        choice = fresh_choice(torch.float32)
    assert choice.path == "none" and not choice.w8a8
    refused = dict(choice.refused)
    assert set(refused) >= {"w8a8-int8", "w8a8-uint8"}
    # int8 activations may already be refused for a reference kernel (small shapes, no AMX)
    assert all(
        why.startswith("slower than the non-quantized")
        for path, why in refused.items()
        if path != "w8a8-int8"
    ), refused
    assert any(path.startswith("torch-ao") for path in refused)
    assert "no int8 path qualifies" in caplog.text
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    served, dtype = quantize.quantize_int8(model, torch.float32)
    assert served is model and type(model[0]) is torch.nn.Linear and dtype == torch.float32


def test_without_any_int8_path_the_server_serves_the_exact_model(monkeypatch):
    none = Int8Choice(torch.float32, "none", refused=(("w8a8-int8", "test"),))
    monkeypatch.setattr(quantize, "choose_int8", lambda dtype: none)
    monkeypatch.setattr(factory, "choose_int8", lambda dtype: none)
    _, exact = _scores("qwen3", "none")
    model, served = _scores("qwen3", "int8")
    engine = model.scheduler.engine
    assert not _int8_layers(model)
    assert not [m for m in engine.model.modules() if "quantized" in type(m).__module__]
    assert served == exact
    assert "int8" not in engine.dtype  # labelled as what it serves


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
    kinds = (Int8Linear, BrgemmInt8Linear)  # oneDNN W8A8 or rerankd's kernel (`choose_int8`)
    return [m for m in model.scheduler.engine.model.modules() if isinstance(m, kinds)]


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
    gated = (Int8GatedLinear, BrgemmInt8GatedLinear)
    assert any(isinstance(m, gated) for m in model.scheduler.engine.model.modules())
    _assert_close_to(exact, quantized)


@needs_onednn_int8
def test_compiled_int8_runs_compiled_and_agrees_with_eager_int8():
    _, eager = _scores("qwen3", "int8")
    model, compiled = _scores("qwen3", "int8", compile="on")
    assert model.scheduler.engine.compiled is True
    # the same int8 computation up to where an activation rounds at an int8 step boundary
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 0.25


def test_without_onednn_int8_the_torch_ao_fallback_serves_float32(monkeypatch):
    torch_ao = Int8Choice(torch.bfloat16, "torch-ao", quantize._TORCH_AO_ENGINES[0])
    monkeypatch.setattr(factory, "choose_int8", lambda dtype: torch_ao)
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
    # every layer but the last, which computes each sequence's last token only
    # (`Block.last_tokens`: its own zero rows up to the row multiple, cut off after)
    assert len(checked) == len(decoder.layers) - 1
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
