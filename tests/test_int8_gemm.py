"""rerankd's int8 GEMM (`rerankd.ops.int8_gemm`): parity with a float32 reference of the same
quantized arithmetic, odd shapes, per-token scales, residual, the fused act·up + quantize
epilogue, compiled graphs, the Zen 4 class (AVX512-VNNI, no AMX) emulated on this machine,
and scores of a model served through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rerankd.engine import factory
from rerankd.metrics import Metrics
from rerankd.ops import int8_gemm as g
from rerankd.ops import quantize
from rerankd.ops.cpu import CPU_CLASSES
from rerankd.ops.quantize import BRGEMM_PATH, Int8Choice
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.paths import fixture_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    g.missing_flags() != [] or g.load_kernel() is None,
    reason="rerankd's int8 GEMM needs AVX512-VNNI and a C++ compiler",
)
#: rows not a multiple of 16/32 nor of the 128-row brgemm call, K not a multiple of 64 (nor
#: of 4), N not of the 64 panel; 1,100 rows: three 512-row groups (the last partial), and
#: with N = 192 whole aligned panels, the non-temporal stores
SHAPES = [
    (1, 4, 1), (3, 100, 70), (37, 130, 65), (200, 1030, 130), (64, 1024, 192), (1100, 260, 192),
]  # fmt: skip


def _operands(shape, seed=0):
    rows, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-3, 2, rows)[:, None]
    return x, torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)


def _accumulate(q: torch.Tensor, qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The exact int32 accumulation (q - 128) @ W.T, in int64."""
    return (q[:, :k].long() - g.ZERO_POINT) @ qweight.long().T


def _reference(q, scale, quantized, k, bias=None, residual=None) -> torch.Tensor:
    """The kernel's epilogue in float32: acc · x_scale · w_scale (+ bias) (+ residual)."""
    qweight, w_scale = quantized
    out = _accumulate(q, qweight, k).float() * scale[:, None] * w_scale[None, :]
    if bias is not None:
        out = out + bias
    if residual is not None:
        out = out + residual.float()
    return out


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.float() - want).abs() / (1 + want.abs())).max())


@pytest.mark.parametrize("shape", SHAPES)
def test_int32_accumulations_are_bit_identical(shape):
    """Unit scales: the output is the int32 accumulation itself (exact in float32 here)."""
    x, weight, _ = _operands(shape)
    qweight, _ = g.quantize_weight(weight)
    packed = g.PackedInt8Weight(qweight, torch.ones(shape[2]))
    q, _ = g.quantize_per_token(x, packed.k_pad)
    got = g.int8_gemm(q, torch.ones(shape[0]), *packed.tensors(), shape[2], torch.float32)
    assert torch.equal(got, _accumulate(q, qweight, shape[1]).float())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_with_bias_and_residual_matches_the_float32_reference(shape, dtype):
    x, weight, bias = _operands(shape)
    residual = torch.randn(shape[0], shape[2]).to(dtype)
    quantized = g.quantize_weight(weight)
    layer = g.BrgemmInt8Linear(*quantized, bias, dtype)
    q, scale = g.quantize_per_token(x.to(dtype), layer.weight.k_pad)
    want = _reference(q, scale, quantized, shape[1], bias, residual)
    got = layer.plus(x.to(dtype), residual)
    assert got.dtype == dtype and got.shape == (shape[0], shape[2])
    # bf16: the float32 value (which may differ from the reference in its last bit, e.g. an
    # FMA) rounded once, so within half a bf16 step of the float32 reference
    assert _relative(got, want) <= (1e-5 if dtype == torch.float32 else 2.0**-8)
    plain = g.BrgemmInt8Linear(*quantized, None, dtype)(x.to(dtype))
    assert _relative(plain, _reference(q, scale, quantized, shape[1])) <= (
        1e-5 if dtype == torch.float32 else 2.0**-8
    )


def test_scales_are_per_token():
    """Each row has its own scale (max |row| / 127): a row's output does not depend on the
    others, and small rows keep their precision next to a large one."""
    x, weight, _ = _operands((48, 256, 96))
    x[5] *= 1e4
    q, scale = g.quantize_per_token(x)
    assert torch.equal(scale, x.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
    assert int(q.min()) >= 1 and int(q.max()) <= 255  # the symmetric grid, shifted by 128
    layer = g.BrgemmInt8Linear(*g.quantize_weight(weight), None, torch.float32)
    full = layer(x)
    for rows in (slice(0, 5), slice(6, 48), slice(5, 6)):
        assert torch.equal(layer(x[rows]), full[rows])
    exact = x.double() @ weight.double().T
    error = (full.double() - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)
    assert float(error.max()) < 0.05  # per tensor, the small rows would be all zeros


def test_zero_rows_stay_exactly_zero():
    """Padding rows (the decoder pads streams with zero rows) give zero outputs and zeros
    after the gated kernel too, so they never move another row's result."""
    x, weight, _ = _operands((16, 64, 64))
    x[10:] = 0
    layer = g.BrgemmInt8Linear(*g.quantize_weight(weight), None, torch.bfloat16)
    assert not layer(x.bfloat16())[10:].any()
    gated = g.BrgemmInt8GatedLinear(g.quantize_weight(torch.cat([weight, weight])), "silu")
    assert not layer(gated(x.bfloat16()))[10:].any()


def test_bf16_conversion_is_the_same_with_and_without_avx512_bf16():
    """`vcvtneps2bf16` (CPUs with AVX512-BF16) and ATen's integer rounding give the same bits."""
    kernel = g.load_kernel()
    if not kernel.native_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    x, weight, bias = _operands((300, 256, 192))
    layer = g.BrgemmInt8Linear(*g.quantize_weight(weight), bias, torch.bfloat16)
    residual = torch.randn(300, 192).bfloat16()
    native = layer.plus(x.bfloat16(), residual)
    kernel.set_native_bf16(False)
    try:
        emulated = layer.plus(x.bfloat16(), residual)
    finally:
        kernel.set_native_bf16(True)
    assert torch.equal(native, emulated)


_ACT = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "gelu": F.gelu}


def _check_fused_rows(fused: torch.Tensor, want: torch.Tensor, inner: int) -> None:
    """Fused rows against `want` (T, inner) quantized per token in torch: scales ≤ 1e-5
    relative; a value on a rounding boundary may land one step away (the kernel's exp/erf
    may differ in the last bits), allowed for 1 in 1,000; padding columns are the zero
    point, the bytes after the scale zeros."""
    rows, width = want.shape[0], g.padded_k(inner)
    assert fused.shape == (rows, g.fused_width(inner)) and fused.dtype == torch.uint8
    assert fused.shape[1] % g.ROW_ALIGN == 0 and not fused[:, width + g.SCALE_BYTES :].any()
    want_q, want_scale = g.quantize_per_token(want, width)
    got_q, got_scale = g.split_fused_rows(fused, inner)
    assert _relative(got_scale, want_scale) <= 1e-5
    steps = (got_q.int() - want_q[:, :inner].int()).abs()
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) <= 1e-3
    assert torch.equal(fused[:, inner:width], torch.full_like(fused[:, inner:width], 128))


@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(37, 130, 70), (64, 1024, 4096), (3, 64, 5), (300, 96, 130)])
def test_activated_epilogue_quantizes_act_of_the_biased_output_per_token(activation, shape):
    """An encoder's `act(x W + b)` computed in the epilogue and written as fused rows for the
    next GEMM (no pass over the (T, I) activations), against torch's float32 arithmetic."""
    rows, k, inner = shape
    x, _, _ = _operands((rows, k, 1))
    quantized = g.quantize_weight(torch.randn(inner, k))
    bias = torch.randn(inner)
    linear = g.BrgemmInt8Linear(*quantized, bias, torch.float32)
    q, scale = g.quantize_per_token(x, linear.weight.k_pad)
    want = _ACT[activation](_reference(q, scale, quantized, k) + bias)
    _check_fused_rows(linear.activated(x, activation), want, inner)


def test_the_next_gemm_reads_activated_rows_and_adds_its_residual():
    x, _, _ = _operands((40, 256, 1))
    first = g.BrgemmInt8Linear(
        *g.quantize_weight(torch.randn(96, 256)), torch.randn(96), torch.bfloat16
    )
    second_q = g.quantize_weight(torch.randn(256, 96))
    second = g.BrgemmInt8Linear(*second_q, None, torch.bfloat16)
    rows = first.activated(x.bfloat16(), "gelu")
    residual = torch.randn(40, 256).bfloat16()
    q, scale = g.split_fused_rows(rows, 96)
    want = _reference(q, scale, second_q, 96) + residual.float()
    got = second.plus(rows, residual)
    assert got.dtype == torch.bfloat16
    assert bool(((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-2).all())


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("shape", [(37, 130, 70), (64, 1024, 3072), (3, 64, 5), (300, 96, 130)])
def test_gated_epilogue_quantizes_act_times_up_per_token(activation, shape):
    """act(x Wg) · (x Wu) in float32, then quantized per token: the kernel's uint8 rows and
    scales against the same arithmetic in torch (its exp may differ in the last bits, so a
    value on a rounding boundary may land one step away: allowed for 1 in 1,000)."""
    rows, k, inner = shape
    x, _, _ = _operands((rows, k, 1))
    w13 = torch.randn(2 * inner, k)
    quantized = g.quantize_weight(w13)
    gated = g.BrgemmInt8GatedLinear(quantized, activation)
    q, scale = g.quantize_per_token(x, gated.gate.k_pad)
    gate = _reference(q, scale, (quantized[0][:inner], quantized[1][:inner]), k)
    up = _reference(q, scale, (quantized[0][inner:], quantized[1][inner:]), k)
    _check_fused_rows(gated(x), _ACT[activation](gate) * up, inner)


def test_down_gemm_reads_fused_rows_as_separate_scales():
    x, _, _ = _operands((40, 256, 1))
    gated = g.BrgemmInt8GatedLinear(g.quantize_weight(torch.randn(2 * 300, 256)), "silu")
    fused = gated(x.bfloat16())
    down = g.BrgemmInt8Linear(*g.quantize_weight(torch.randn(256, 300)), None, torch.bfloat16)
    residual = torch.randn(40, 256).bfloat16()
    width = g.padded_k(300)
    q = fused[:, :width].contiguous()
    scale = fused[:, width : width + g.SCALE_BYTES].contiguous().view(torch.float32)
    separate = g.int8_gemm(
        q, scale[:, 0], *down.weight.tensors(), 256, torch.bfloat16, None, residual
    )
    assert torch.equal(down.plus(fused, residual), separate)


def test_the_ops_compile_into_one_graph():
    """Custom ops with fake implementations: a decoder-like MLP compiles without breaks."""
    weight = torch.randn(2 * 96, 64)
    gated = g.BrgemmInt8GatedLinear(g.quantize_weight(weight), "silu")
    down = g.BrgemmInt8Linear(*g.quantize_weight(torch.randn(64, 96)), None, torch.bfloat16)

    def mlp(x):
        return down.plus(gated(x * 2.0), x)  # x * 2: exact, fused with the quantization

    x = torch.randn(48, 64).bfloat16()
    compiled = torch.compile(mlp, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), mlp(x))
    assert torch.equal(compiled(x[:32]), mlp(x[:32]))  # another row count, same graph


def test_agreement_probe_passes_here_and_fails_on_a_broken_kernel(monkeypatch):
    x, weight, bias = _operands((32, 256, 256))
    residual = torch.randn(32, 256)
    assert g.agrees(x, weight, bias, residual, 1e-4)
    real = g.int8_gemm

    def off_by_one_step(q, scale, *args, **kwargs):
        return real(q, None if scale is None else scale * 1.01, *args, **kwargs)

    monkeypatch.setattr(g, "int8_gemm", off_by_one_step)
    assert not g.agrees(x, weight, bias, residual, 1e-4)


@pytest.mark.parametrize(
    ("amx", "ours_ms", "onednn_ms", "winner"),
    [
        (True, 10.0, 12.0, BRGEMM_PATH),
        (True, 11.3, 10.0, BRGEMM_PATH),  # 13 % slower: the epilogues save 14 % on AMX
        (True, 11.5, 10.0, "w8a8-uint8"),
        (False, 10.4, 10.0, BRGEMM_PATH),  # 4 %: they save 5 % elsewhere
        (False, 10.6, 10.0, "w8a8-uint8"),
    ],
)
def test_the_layer_race_takes_ours_unless_slower_than_its_epilogues_save(
    amx, ours_ms, onednn_ms, winner, monkeypatch
):
    """Both sides run a decoder layer's linears; rerankd's kernel serves unless it is slower
    than oneDNN's by more than its fused epilogues save on this CPU class
    (`_EPILOGUE_SAVING`: measured 14 % of oneDNN's GEMM time on AMX); the loser is refused
    with both times."""
    ran = []

    def timed(runs, repeats, budget_s=0.0):
        for run in runs.values():
            ran.append(run())
        return {BRGEMM_PATH: ours_ms / 1e3, "w8a8-uint8": onednn_ms / 1e3}

    monkeypatch.setattr(quantize, "_best_times", timed)
    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: amx)
    refused = []
    ours, onednn = (BRGEMM_PATH, ("brgemm:x",), 1.7), ("w8a8-uint8", ("brg_matmul:x",), 1.6)
    assert quantize._layer_race(torch.bfloat16, ours, onednn, refused)[0] == winner
    hidden = quantize._LAYER_SHAPE[:2]
    assert [tuple(out.shape) for out in ran] == [hidden, hidden]  # both ran down + residual
    loser = onednn[0] if winner == BRGEMM_PATH else BRGEMM_PATH
    ms = f"({ours_ms:.2f} ms ours vs {onednn_ms:.2f} ms oneDNN)"
    saving = "14%" if amx else "5%"
    why = (
        f"rerankd's kernel within {saving} of it on a decoder layer's GEMMs "
        f"{quantize._LAYER_SHAPE} {ms}, which its fused epilogues save on this CPU class"
        if winner == BRGEMM_PATH
        else f"more than {saving} slower on a decoder layer's GEMMs {quantize._LAYER_SHAPE} "
        f"{ms}, more than its fused epilogues save on this CPU class"
    )
    assert refused == [(loser, why)]


@pytest.mark.skipif(
    g.missing_flags() != [] or g.load_kernel() is None
    or g.load_kernel().implementation() != "brgemm:avx512_core_amx",
    reason="ATen's cpublas::pack packs int8 on AMX CPUs only",
)  # fmt: skip
def test_own_packing_is_cpublas_pack_layout():
    weight = torch.randint(-127, 128, (130, 100), dtype=torch.int8)
    assert torch.equal(
        g.load_kernel().pack_weight(weight)[0], g.load_kernel().pack_reference(weight)
    )


_ZEN4_CHECK = textwrap.dedent(
    """
    import json, torch
    from rerankd.ops import int8_gemm as g
    kernel = g.load_kernel()
    x, w = torch.randn(37, 130), torch.randn(70, 130)
    qw, sw = g.quantize_weight(w)
    packed = g.PackedInt8Weight(qw, torch.ones(70))
    q, _ = g.quantize_per_token(x, packed.k_pad)
    got = g.int8_gemm(q, torch.ones(37), *packed.tensors(), 70, torch.float32)
    acc = ((q[:, :130].long() - 128) @ qw.long().T).float()
    print(json.dumps({"implementation": kernel.implementation(), "exact": torch.equal(got, acc)}))
    """
)


def test_zen4_class_runs_the_vnni_ukernel():
    """Under the Zen 4 caps (oneDNN's ISA capped below AMX) the kernel still runs, on the
    AVX512-VNNI brgemm (oneDNN prints its capped ISA), with the same int32 results."""
    env = {**os.environ, **CPU_CLASSES["zen4"], "ONEDNN_VERBOSE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _ZEN4_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    report = json.loads(lines[-1])
    assert report["implementation"] == "brgemm:avx512_core_vnni" and report["exact"]
    isa = next(line for line in lines if ",isa:" in line)
    assert "AMX" not in isa and "DL Boost" in isa, isa
    assert any(",ukernel,exec,cpu,brgemm," in line for line in lines)


def _served(quantize: str, path: str | None, monkeypatch) -> list[float]:
    if path is not None:
        monkeypatch.setattr(
            factory, "choose_int8", lambda dtype: Int8Choice(dtype, path, speedup=1.0)
        )
    settings = Settings(model=str(fixture_dir("qwen3")), dtype="bfloat16", quantize=quantize)
    model = load_model(settings, Metrics())
    docs = [f"document {i}: " + "the capital of China is Beijing " * (i % 5 + 1) for i in range(16)]
    pairs = model.recipe.encode(["capital of china"] * len(docs), docs)
    if path == BRGEMM_PATH:
        kinds = {type(m).__name__ for m in model.scheduler.engine.model.modules()}
        assert {"BrgemmInt8Linear", "BrgemmInt8GatedLinear"} <= kinds
    return model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


def _fidelity(exact: list[float], got: list[float]) -> tuple[float, float]:
    worst = max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(exact, got, strict=True))
    pairs = [(i, j) for i in range(len(exact)) for j in range(i + 1, len(exact))]
    same = sum((exact[i] > exact[j]) == (got[i] > got[j]) for i, j in pairs) / len(pairs)
    return worst, same


def test_model_scores_stay_close_to_bf16(monkeypatch):
    """The tiny Qwen3 fixture served with the kernel: scores vs bf16 (and vs oneDNN W8A8,
    printed as the int8 benchmarks do; tiny random fixtures are a worst case for int8)."""
    exact = _served("none", None, monkeypatch)
    ours = _served("int8", BRGEMM_PATH, monkeypatch)
    onednn = _served("int8", "w8a8-uint8", monkeypatch)
    assert ours != exact
    for name, got in (("w8a8-brgemm", ours), ("w8a8-uint8", onednn)):
        worst, same = _fidelity(exact, got)
        print(f"{name} vs bf16: max |Δ score| {worst:.4f}, pairs in the same order {same:.1%}")
    worst, same = _fidelity(exact, ours)
    assert worst < 0.15 and same > 0.8


@pytest.mark.parametrize("path", [BRGEMM_PATH, "w8a8-uint8"])
def test_an_int8_encoder_applies_gelu_in_the_epilogue_and_stays_close_to_bf16(path, monkeypatch):
    """XLM-R int8: each layer's GELU is computed by its first MLP GEMM (rerankd's kernel
    writes the GELU output already quantized per token; oneDNN W8A8 applies it in its
    epilogue), not as a separate pass (compiled, that pass recomputed erf around a row
    maximum and cost as much as the GEMMs); scores stay within int8's error of bf16."""
    monkeypatch.setattr(factory, "choose_int8", lambda dtype: Int8Choice(dtype, path, speedup=1.0))
    calls = []
    for owner in (g.BrgemmInt8Linear, quantize.Int8Linear):
        original = owner.activated
        monkeypatch.setattr(
            owner,
            "activated",
            lambda self, x, act, _f=original: calls.append(act) or _f(self, x, act),
        )

    def scores(quantize_mode: str):
        settings = Settings(
            model=str(fixture_dir("xlmr")), dtype="bfloat16", quantize=quantize_mode, compile="off"
        )
        model = load_model(settings, Metrics())
        docs = [
            f"document {i}: " + "the capital of China is Beijing " * (i % 5 + 1) for i in range(12)
        ]
        pairs = model.recipe.encode(["capital of china"] * len(docs), docs)
        calls.clear()  # start-up probes ran forwards too: count one batch
        return model.scheduler.engine.score(Batch(pairs, None)), model

    exact, _ = scores("none")
    got, model = scores("int8")
    layers = len(model.scheduler.engine.model.layers)
    assert calls == ["gelu"] * layers
    worst, same = _fidelity(exact, got)
    assert worst < 0.15 and same > 0.8
