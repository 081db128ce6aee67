"""Opt-in fp8 linear layers (`--quantize fp8`, CUDA GPUs of compute capability 8.9+).

W8A8 in float8 e4m3 through `torch._scaled_mm`:

- weights: quantized once at load, one scale per output channel (amax / 448, e4m3's
  largest finite value), stored (N, K) so that `.t()` is the column-major operand the
  kernel wants;
- activations: quantized at every call, one scale per token (row), so a token with large
  activations does not flatten the others' resolution (a per-tensor scale would);
- the GEMM writes the activations' dtype (bf16 when serving), the two scale vectors applied
  to its float32 accumulator; the bias rides the same call's epilogue where the probe at
  start-up (`probe_fp8`) found that this torch/GPU accepts it, else it is added after.

Where it serves: CUDA with compute capability >= 8.9 (Ada, Hopper: the GPUs with fp8 tensor
cores), chosen by `fp8_refusal`. `torch._scaled_mm` also runs on CPU (a reference
implementation, no speed-up): the module is unit-tested there (tests/test_fp8.py) and the
device check's dry run exercises it, but `--quantize fp8` refuses to *serve* on CPU, where
it would be slower than bf16 and int8 is the quantized path.

Linears whose input or output width is not a multiple of 16 stay as they are (the CUDA
kernel's alignment rule); on the decoders and encoders served here those are only score and
classifier heads of one or two outputs, which are not `nn.Linear`s of the swap or cost
nothing. What this module does not do: quantize attention (q/k/v stay bf16), embeddings,
norms or the score head.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from rerankd.ops.prepack import swap_linears

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
#: e4m3's largest finite value: amax maps onto it
E4M3_MAX = 448.0
#: smallest scale: an all-zero row (padding tokens) gets this instead of 0 (no 0/0), and its
#: quantized values stay 0
_MIN_SCALE = 1e-12
#: `_scaled_mm` on CUDA needs K and N multiples of 16
ALIGN = 16
#: fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
MIN_CAPABILITY = (8, 9)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 tensor, float32 scales (rows, 1)) with one scale per row: amax / 448.

    |x| / scale <= 448 up to float rounding; the clamp catches that rounding (a value just
    above 448 would become NaN in e4m3fn, which has no infinity)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def fp8_refusal(device: torch.device) -> str | None:
    """Why `--quantize fp8` cannot serve on `device`, or None where it can."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no torch._scaled_mm / float8_e4m3fn"
    if device.type != "cuda":
        return (
            f"fp8 serves on CUDA GPUs of compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper) only, not on "
            f"{device.type}; on CPU use --quantize int8"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability "
            f"{capability[0]}.{capability[1]}; fp8 tensor cores need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper)"
        )
    return None


class Fp8Linear(nn.Module):
    """`nn.Linear` as an e4m3 x e4m3 GEMM, per-output-channel weight scales and per-token
    activation scales; output in the input's dtype. `fuse_bias`: add the bias in the GEMM's
    epilogue (`_scaled_mm(bias=)`) rather than as a separate add."""

    def __init__(self, weight: Tensor, bias: Tensor | None, fuse_bias: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fuse_bias = fuse_bias
        qweight, scale = quantize_rows(weight.detach())
        self.register_buffer("qweight", qweight, persistent=False)  # (N, K) e4m3
        self.register_buffer("w_scale", scale.view(1, -1).contiguous(), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().clone(), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)  # (M, K) e4m3, (M, 1)
        q = q.contiguous()  # the kernel takes a row-major left operand (a no-op if it is)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # (M, K) x (K, N) -> (M, N), scale_a (M, 1) and scale_b (1, N) on the accumulator
        y = torch._scaled_mm(
            q,
            self.qweight.t(),
            scale_a=scale,
            scale_b=self.w_scale,
            bias=bias if self.fuse_bias else None,
            out_dtype=x.dtype,
        )
        if bias is not None and not self.fuse_bias:
            y = y + bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fuse_bias={self.fuse_bias}"
        )


def fp8_eligible(linear: nn.Linear) -> bool:
    """Whether `linear`'s shape meets the CUDA kernel's alignment (K, N multiples of 16)."""
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def quantize_fp8(model: nn.Module, fuse_bias: bool = True) -> int:
    """Replace every aligned `nn.Linear` of `model` by an `Fp8Linear`; returns how many.

    A fused gate ‖ up projection (`w13`, named by its module's `GATED_LINEAR`) becomes one
    `Fp8Linear` of width 2I: it has no `fuses_activation`, so the model splits it and applies
    the activation itself, as for a plain linear. Linears without `plus` take the model's
    `residual + linear(x)` path (prepack.residual_linear)."""
    swapped = 0

    def build(linear: nn.Linear, activation: str | None) -> nn.Module:
        nonlocal swapped
        if not fp8_eligible(linear):
            return linear
        swapped += 1
        return Fp8Linear(linear.weight, linear.bias, fuse_bias)

    swap_linears(model, build)
    return swapped


# --- start-up probe ------------------------------------------------------------------------

#: the probe's shape (rows, in, out): rows not a multiple of 16, as a real batch's
_PROBE_SHAPE = (37, 256, 128)


def exact_product(
    qx: Tensor, sx: Tensor, qw: Tensor, sw: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The float64 product (on the CPU) of e4m3 rows `qx` with scales `sx` (M, 1) and e4m3
    weight rows `qw` with scales `sw` (N, 1), plus `bias`: what the fp8 GEMM must compute."""
    out = (qx.double().cpu() * sx.double().cpu()) @ (qw.double().cpu() * sw.double().cpu()).T
    return out if bias is None else out + bias.double().cpu()


def worst_relative_error(got: Tensor, exact: Tensor) -> float:
    """max |got - exact| / (1 + |exact|): the probe's measure of a kernel's error."""
    got = got.double().cpu()
    return float(((got - exact).abs() / (1 + exact.abs())).max())


def probe_fp8(device: torch.device, dtype: torch.dtype) -> tuple[bool, float]:
    """Run `Fp8Linear` on `device` against the exact product of its own quantized operands
    (float64); returns (bias fused in the epilogue?, worst relative error). Raises
    RuntimeError when the kernel fails, or disagrees with the arithmetic by more than the
    output dtype's rounding (a broken kernel, not fp8 noise).

    The reference takes the operands as quantized on `device` (the layer's `qweight` and
    `quantize_rows` there), not on the CPU: the probe checks the GEMM and its scales, and a
    rounding tie broken otherwise by another device's e4m3 conversion is a different, equally
    valid operand, not a fault. Bias in the epilogue is tried first; where `_scaled_mm(bias=)`
    is refused or disagrees for this scaling mode, the bias is added after the GEMM instead."""
    rows, k, n = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen)
    x[3] *= 100.0  # one loud token: per-token scales keep the others' resolution
    x[5] = 0.0  # a padding row
    weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    x, weight, bias = x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)
    # 16-bit outputs: their rounding (bf16: 2^-9 relative) and the accumulation. Hopper's fp8
    # tensor cores keep fewer accumulator bits than float32: on an H200 (torch 2.11) the
    # product alone came 0.0085 from float64, 0.0104 with the bias added after it
    # (scripts/fp8_diagnose.py), against 0.0037 / 0.0069 for torch's CPU reference. A faulty
    # kernel is off by far more: operands quantized elsewhere alone gave 0.19-0.26 there
    tolerance = 2.0**-5 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    qx, sx = quantize_rows(x)  # as the layer quantizes x on `device`
    failures: list[str] = []
    for fuse in (True, False):
        layer = Fp8Linear(weight, bias, fuse_bias=fuse)
        try:
            got = layer(x)
        except RuntimeError as exc:
            failures.append(f"bias {'fused' if fuse else 'added'}: {exc}")
            continue
        exact = exact_product(qx, sx, layer.qweight, layer.w_scale.T, bias)
        worst = worst_relative_error(got, exact)
        if worst <= tolerance:
            return fuse, worst
        failures.append(
            f"bias {'fused' if fuse else 'added'}: disagrees with the e4m3 arithmetic by "
            f"{worst:.3g} (tolerance {tolerance:.3g})"
        )
    raise RuntimeError(f"fp8 GEMM (torch._scaled_mm) on {device}: " + "; ".join(failures))
