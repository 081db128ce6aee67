"""Opt-in int8 linear layers (`--quantize int8`, CPU).

Two implementations, the first that works on this machine:

- **W8A8 through oneDNN** (`Int8Linear`): weights int8 per output channel, packed once;
  activations quantized per tensor on the fly (symmetric int8); the GEMM runs on VNNI /
  AMX-INT8 and writes the model's own dtype (bf16 on CPUs that have it), so attention,
  norms and RoPE stay in bf16 and the residual add rides the GEMM's epilogue. On a 2-core
  Xeon with AMX this GEMM ran 1.7-1.9x the prepacked bf16 one alone on the Qwen3-0.6B
  shapes (1,024 and 4,096 rows).
- **torch.ao dynamic quantization** (fallback): the same scheme through torch.ao's
  `quantize_dynamic`; its linears take float32 activations, so the model runs float32.

Scores move by a small, measured amount (see docs/benchmarks.md); float32 and bf16 remain
the exact paths.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, nn

from rerankd.engine.onednn_ops import int8_linear, register_packed
from rerankd.engine.prepack import ONEDNN_ACTIVATIONS, swap_linears

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8")

#: int8 grid of the symmetric quantizers (-127..127: no -128, so negation is exact)
_QMAX = 127.0


def quantize_per_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 for activations: (int8 tensor, float32 scale of shape ()).

    Written as plain tensor ops so a compiled caller fuses it with the norm or activation
    that produced `x` (one pass for the maximum, one for the cast). |x| / scale is at most
    127 up to float rounding, so rounding lands in -127..127 without a clamp (a clamp
    doubled the cost of the compiled cast)."""
    scale = x.abs().amax().float().clamp(min=1e-12) / _QMAX
    return torch.round(x.float() * (1.0 / scale)).to(torch.int8), scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: (int8 (N, K), float32 scales (N,))."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / _QMAX
    return torch.round(w / scale[:, None]).clamp(-_QMAX, _QMAX).to(torch.int8), scale


def onednn_int8_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN's int8 linear runs here and gives the reference result for `dtype`
    activations (a probe: builds without the op, or CPUs without VNNI, say no)."""
    if dtype not in (torch.bfloat16, torch.float32) or not hasattr(torch.ops, "onednn"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=gen)
        x = torch.randn(6, 40, generator=gen).to(dtype)
        layer = Int8Linear(weight, None)
        qx, sx = quantize_per_tensor(x)
        qw, sw = quantize_weight(weight)
        expected = (qx.float() * sx) @ (qw.float() * sw[:, None]).T
        got = layer(x).float()
    except (RuntimeError, AttributeError) as exc:
        log.info("oneDNN int8 linear unavailable (%s)", exc)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(((got - expected).abs() <= tolerance * (1 + expected.abs())).all())


class Int8Linear(nn.Module):
    """`nn.Linear` as an int8 x int8 oneDNN GEMM; output in the activations' dtype.

    Has `PrepackedLinear`'s `plus` (residual add in the epilogue), so the model code calls
    either the same way."""

    def __init__(self, weight: Tensor, bias: Tensor | None, batch_hint: int = 1024) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight, scale = quantize_weight(weight)
        # opaque packed tensor: a buffer, never a parameter (it has no storage to read);
        # compiled code reaches it through its handle (`onednn_ops`)
        self.register_buffer(
            "packed",
            torch.ops.onednn.qlinear_prepack(qweight, [batch_hint, self.in_features]),
            persistent=False,
        )
        self.register_buffer("handle", register_packed(self.packed), persistent=False)
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float(), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        q, scale = quantize_per_tensor(x)
        return self.gemm(q, scale, x.dtype)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + x @ W.T`, the add done in the GEMM's epilogue."""
        q, scale = quantize_per_tensor(x)
        return int8_linear(
            q, scale, self.handle, self.w_scale, self.out_features, residual.dtype, self.bias,
            residual,
        )  # fmt: skip

    def gemm(
        self, q: Tensor, scale: Tensor, dtype: torch.dtype, activation: str | None = None
    ) -> Tensor:
        """The GEMM on an already quantized input (`quantize_per_tensor`), output in `dtype`,
        optionally through an activation (`ONEDNN_ACTIVATIONS`)."""
        attr, algorithm = ONEDNN_ACTIVATIONS[activation] if activation else ("none", "")
        return int8_linear(
            q, scale, self.handle, self.w_scale, self.out_features, dtype, self.bias,
            attr=attr, algorithm=algorithm,
        )  # fmt: skip


class Int8GatedLinear(nn.Module):
    """A fused gate ‖ up projection `W13` (2I, H) as `act(x Wg) * (x Wu)` in int8: the input
    is quantized once for both GEMMs and the activation rides the gate GEMM's epilogue."""

    def __init__(self, weight: Tensor, activation: str) -> None:
        super().__init__()
        intermediate = weight.shape[0] // 2
        self.activation = activation
        self.gate = Int8Linear(weight[:intermediate], None)
        self.up = Int8Linear(weight[intermediate:], None)

    def forward(self, x: Tensor) -> Tensor:
        q, scale = quantize_per_tensor(x)
        return self.gate.gemm(q, scale, x.dtype, self.activation) * self.up.gemm(q, scale, x.dtype)


def quantize_int8(
    model: nn.Module, dtype: torch.dtype, w8a8: bool | None = None
) -> tuple[nn.Module, torch.dtype]:
    """Replace every `nn.Linear` by an int8 one; returns the model and the dtype its
    activations now run in (`dtype` with oneDNN W8A8, float32 with the torch.ao fallback:
    the model must then be float32). `w8a8`: the caller's `onednn_int8_supported(dtype)`,
    if it already asked."""
    if w8a8 is None:
        w8a8 = onednn_int8_supported(dtype)
    if w8a8:
        swap_linears(
            model,
            lambda linear, activation: (
                Int8GatedLinear(linear.weight, activation)
                if activation
                else Int8Linear(linear.weight, linear.bias)
            ),
        )
        return model, dtype
    return _torch_ao_int8(model.float()), torch.float32


def _torch_ao_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    # oneDNN first: on the Qwen3-0.6B shape (2-core EPYC, AVX512-VNNI) its per-channel
    # dynamic linear ran the whole model ~10% faster than fbgemm/x86, same fidelity
    for engine in ("onednn", "x86", "fbgemm"):
        if engine in engines:
            torch.backends.quantized.engine = engine
            break
    with warnings.catch_warnings():
        # torch.ao's eager quantization API is deprecated in favour of torchao, but it is
        # the one shipped with torch itself and runs fbgemm's kernels.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
