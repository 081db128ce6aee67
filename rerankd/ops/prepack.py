"""oneDNN-prepacked weights for the linear layers of a bf16 model on CPU.

`F.linear` re-lays out its weight for oneDNN's GEMM on every call; packing each weight once
at load time (the layout inductor's own weight-prepack pass uses) gives bit-identical
outputs and measured 3-12% faster GEMMs on the Qwen3-0.6B shapes (2-core EPYC,
AVX512-BF16). The packed tensor is opaque: it replaces the weight, so memory does not grow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rerankd.ops.onednn_ops import packed_linear, register_packed

log = logging.getLogger(__name__)

_PACKABLE = (torch.bfloat16, torch.float16)

#: oneDNN linears (prepacked bf16, W8A8 int8) JIT-compile GEMM kernels per new row count
#: (~1 ms per linear; most of a small request's time on the tiny fixture: forward 18 -> 9 ms
#: with padding); padding the token stream to 16 rows makes row counts recur for <= 15
#: extra rows per batch
ONEDNN_ROW_MULTIPLE = 16


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in _PACKABLE
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PrepackedLinear(nn.Module):
    """An `nn.Linear` whose weight is packed for oneDNN; same outputs. A bias is added on the
    GEMM's float32 accumulator (bit-identical to `F.linear`'s bf16 result, tested)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, batch_hint: int = 1024) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        # a buffer, not a parameter: it is opaque (no storage), so nothing may read it;
        # compiled code reaches it through its handle (`onednn_ops`)
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False
        )
        self.register_buffer("handle", register_packed(self.packed), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(weight.dtype), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.handle, self.out_features, bias=self.bias)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + x @ W.T (+ bias)` with the adds done on the GEMM's float32
        accumulator."""
        return packed_linear(x, self.handle, self.out_features, residual, "add", bias=self.bias)

    def times(self, x: Tensor, other: Tensor) -> Tensor:
        """`(x @ W.T (+ bias)) * other`, the product taken on the float32 accumulator."""
        return packed_linear(x, self.handle, self.out_features, other, "mul", bias=self.bias)

    def activated(self, x: Tensor, activation: str) -> Tensor:
        """`act(x @ W.T (+ bias))`, the activation applied to the float32 accumulator."""
        attr, algorithm = ONEDNN_ACTIVATIONS[activation]
        return packed_linear(
            x, self.handle, self.out_features, attr=attr, algorithm=algorithm, bias=self.bias
        )


#: our activation names → oneDNN post-op (attr, algorithm); "gelu" is the exact (erf) GELU
#: of BERT-family encoders, `F.gelu`'s default
ONEDNN_ACTIVATIONS = {
    "silu": ("swish", ""),
    "gelu_tanh": ("gelu", "tanh"),
    "gelu": ("gelu", "none"),
}

#: the activations as separate functions: for linears without an epilogue, and as the
#: reference the int8 kernel's epilogues are checked against (ops/int8_gemm.py)
ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": nn.functional.silu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu": nn.functional.gelu,
}


class PrepackedGatedLinear(nn.Module):
    """A fused gate ‖ up projection `W13` (2I, H) evaluated as `act(x Wg) * (x Wu)`.

    Two packed GEMMs whose epilogues do the activation and the product, instead of one
    GEMM followed by a split, an activation pass and a multiply pass over (T, 2I)."""

    #: it applies the activation itself: `MLP.gated` calls it as is, without the split and
    #: the activation pass a plain `nn.Linear` gate ‖ up projection needs
    fuses_activation = True

    def __init__(self, weight: Tensor, activation: str) -> None:
        super().__init__()
        intermediate = weight.shape[0] // 2
        self.activation = activation
        self.gate = PrepackedLinear(weight[:intermediate].contiguous())
        self.up = PrepackedLinear(weight[intermediate:].contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return self.up.times(x, self.gate.activated(x, self.activation))


def activated_linear(linear: nn.Module, x: Tensor, activation: str) -> Tensor:
    """`act(linear(x))`: one GEMM call when `linear` is prepacked or int8 (the activation
    applied to its float32 accumulator, within one bf16 rounding of the separate pass). From
    rerankd's int8 kernel the result is fused uint8 rows, already quantized per token, which
    only the next int8 linear reads (ops/int8_gemm.py)."""
    activated = getattr(linear, "activated", None)
    if activated is not None:
        return activated(x, activation)
    return ACTIVATION_FUNCTIONS[activation](linear(x))


def residual_linear(residual: Tensor, linear: nn.Module, x: Tensor) -> Tensor:
    """`residual + linear(x)`: one oneDNN call when `linear` is prepacked or int8 (both
    have `plus`)."""
    plus = getattr(linear, "plus", None)
    if plus is not None:
        return plus(x, residual)
    return residual + linear(x)


def prepack_linears(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Swap every `nn.Linear` of `model` for a `PrepackedLinear` (its bias, if any, added on
    the accumulator) when this device and dtype support it and a probe gives `F.linear`'s
    output exactly; returns how many."""
    if not prepack_supported(device, dtype):
        return 0
    try:
        weight = torch.randn(5, 8).to(dtype)
        bias = torch.randn(5).to(dtype)
        probe = torch.randn(3, 8).to(dtype)
        exact = torch.equal(
            PrepackedLinear(weight)(probe), nn.functional.linear(probe, weight)
        ) and torch.equal(
            PrepackedLinear(weight, bias)(probe), nn.functional.linear(probe, weight, bias)
        )
        if not exact:
            log.info("prepacked linear differs from F.linear here; not using it")
            return 0
    except RuntimeError as exc:  # oneDNN without this primitive on this CPU
        log.info("prepacked linear unavailable (%s); not using it", exc)
        return 0
    return swap_linears(
        model,
        lambda linear, activation: (
            PrepackedGatedLinear(linear.weight.detach(), activation)
            if activation
            else PrepackedLinear(linear.weight.detach(), linear.bias)
        ),
    )


def swap_linears(model: nn.Module, build: Callable[[nn.Linear, str | None], nn.Module]) -> int:
    """Replace each `nn.Linear` of `model` by `build(linear, activation)`; returns how many. `activation` is set for a module's gate ‖
    up projection (the one it names in `GATED_LINEAR`, bias-free, with an activation oneDNN
    applies), so `build` may fuse it; None for every other linear."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, build(child, _gated_activation(parent, name, child)))
    return len(swaps)


def _gated_activation(parent: nn.Module, name: str, linear: nn.Linear) -> str | None:
    activation = getattr(parent, "activation", None)
    if (
        getattr(parent, "GATED_LINEAR", None) == name
        and activation in ONEDNN_ACTIVATIONS
        and linear.bias is None
    ):
        return activation
    return None
