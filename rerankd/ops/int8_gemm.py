"""rerankd's own int8 GEMM (``csrc/int8_gemm.cpp``): per-token activation scales, fused
epilogues, on every CPU with AVX512-VNNI (AMX or not).

Why: oneDNN's W8A8 linear in torch takes one activation scale per tensor and has no "mul"
post-op, so the gated MLP's SiLU·up product and its quantization for the down projection
were two extra passes over (T, intermediate) tensors, and it has an optimized kernel for
few configurations without AMX (issue 18). This GEMM runs oneDNN's brgemm ukernels through
ATen's cpublas (AMX tiles where present, `vpdpbusd` otherwise) on uint8 activations (the
symmetric int8 grid shifted by 128; the shift is corrected per column in the epilogue) and
does the rest in its own epilogue:

- `int8_gemm`: dequantization (scale per token × scale per output channel), bias, residual
  add, output in bf16 or float32;
- `int8_gated`: gate and up GEMMs on the same activation block, act(gate)·up in float, then
  quantized per token for the down projection: "fused rows", uint8 columns followed by the
  row's float32 scale (4 bytes) and zeros to a cache line (`fused_width`), which `int8_gemm`
  reads without a separate scale tensor.

Both are custom ops with fake implementations, so compiled per-token code keeps them inside
its graph; the activation quantization of the other linears (`quantize_per_token`) is plain
tensor code that compiles into the norm before it. The kernel is built on first use like the
attention kernels (`amx_kernel.build_directory`); `load_kernel` returns None where the CPU
lacks AVX512-VNNI or the build fails, and `quantize.choose_int8` then keeps the other paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rerankd.ops.amx_kernel import build_directory
from rerankd.ops.cpu import cpu_flags
from rerankd.ops.prepack import ACTIVATION_FUNCTIONS

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "int8_gemm.cpp"
#: the kernel's own code is AVX-512 (F/BW/VL/DQ); the GEMMs are oneDNN's JIT code, which
#: needs VNNI for uint8 x int8 (brgemm refuses int8 below it)
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
_CFLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mfma",
    "-fopenmp",
    "-DCPU_CAPABILITY=AVX512",
    "-DCPU_CAPABILITY_AVX512",
]
#: activation zero point: uint8 = the symmetric int8 grid + 128
ZERO_POINT = 128
#: bytes after each fused row's columns: its float32 scale
SCALE_BYTES = 4
#: fused rows are padded (zeros) to a multiple of this, so each starts on a cache line: the
#: down GEMM ran 18 % slower on rows of K + 4 bytes (one thread, 3,072 x 3,072 x 1,024, AMX)
ROW_ALIGN = 64
#: activations the fused epilogue computes (the kernel's `act` argument): the decoders' gates,
#: and the exact (erf) GELU of BERT-family encoders and ModernBERT's GeGLU
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def missing_flags() -> list[str]:
    """The `REQUIRED_FLAGS` this CPU (or `RERANKD_CPU_FLAGS`) lacks, sorted."""
    return sorted(REQUIRED_FLAGS - cpu_flags())


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled kernel module, or None (logged once) where it cannot run here."""
    if missing_flags():
        return None
    started = time.perf_counter()
    flags = hashlib.sha256(" ".join(_CFLAGS).encode()).hexdigest()[:8]
    name = "rerankd_int8_gemm"
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=_CFLAGS,
            build_directory=str(build_directory(SOURCE, f"{name}-{flags}")),
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, missing headers, read-only home, ...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("int8 GEMM kernel could not be built (%s: %s)", type(exc).__name__, first_line)
        return None
    if not module.available():
        log.info("int8 brgemm ukernels unavailable (oneDNN below AVX512-VNNI here)")
        return None
    # bf16 outputs in one instruction where the CPU converts natively (rerankd's CPU flags,
    # so an emulated class without it runs the integer conversion)
    module.set_native_bf16("avx512_bf16" in cpu_flags())
    log.info("int8 GEMM kernel ready in %.1fs", time.perf_counter() - started)
    return module


def _kernel() -> ModuleType:
    module = load_kernel()
    if module is None:
        raise RuntimeError("rerankd's int8 GEMM kernel is unavailable on this CPU")
    return module


def padded_k(k: int) -> int:
    """Packed K: a multiple of 4 (VNNI groups of four int8 products)."""
    return -(-k // 4) * 4


def fused_width(k: int) -> int:
    """Bytes per fused row for K = `k`: the padded columns, the float32 scale, zeros up to
    a multiple of `ROW_ALIGN`."""
    return -(-(padded_k(k) + SCALE_BYTES) // ROW_ALIGN) * ROW_ALIGN


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: (int8 (N, K), float32 scales (N,))."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127.0, 127.0).to(torch.int8), scale


def quantize_per_token(x: Tensor, k_pad: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 per row, as uint8 (+128): ((T, k_pad) uint8, (T,) float32).

    Plain tensor ops, so a compiled caller fuses them with the norm that produced `x`; the
    same arithmetic as the kernel's own quantization of the gated output (scale =
    max|row| / 127, q = round(x · (1 / scale)) + 128, rounding half to even). Columns past
    K (`k_pad`) are the zero point."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = (torch.round(xf * (1.0 / scale)[:, None]) + ZERO_POINT).to(torch.uint8)
    if k_pad is not None and k_pad > x.shape[-1]:
        q = F.pad(q, (0, k_pad - x.shape[-1]), value=ZERO_POINT)
    return q, scale


@torch.library.custom_op("rerankd::int8_gemm", mutates_args=())
def int8_gemm(
    q: Tensor,
    scale: Tensor | None,
    packed: Tensor,
    correction: Tensor,
    w_scale: Tensor,
    out_features: int,
    dtype: torch.dtype,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """uint8 rows `q` (scales `scale`, or fused rows when None) times the packed weight,
    dequantized, plus `bias` and `residual` when given, in `dtype` (bf16 or float32)."""
    return _kernel().int8_gemm(
        q, scale, packed, correction, w_scale, out_features, bias, residual,
        dtype == torch.bfloat16,
    )  # fmt: skip


@int8_gemm.register_fake
def _(q, scale, packed, correction, w_scale, out_features, dtype, bias=None, residual=None):
    return q.new_empty(q.shape[0], out_features, dtype=dtype)


@torch.library.custom_op("rerankd::int8_gated", mutates_args=())
def int8_gated(
    q: Tensor,
    scale: Tensor | None,
    gate: Tensor,
    gate_correction: Tensor,
    gate_scale: Tensor,
    up: Tensor,
    up_correction: Tensor,
    up_scale: Tensor,
    intermediate: int,
    activation: int,
    width: int,
) -> Tensor:
    """act(q Wg) · (q Wu) quantized per row: fused rows (T, `width`) uint8.

    `width` (`fused_width(intermediate)`, checked by the kernel) is an argument so that a
    compiled graph holds the row layout: Inductor's on-disk cache keys graphs by their ops
    and constants, not by a custom op's fake implementation, and a graph cached with
    another layout would fail its own stride assertion."""
    return _kernel().int8_gated(
        q, scale, gate, gate_correction, gate_scale, up, up_correction, up_scale,
        intermediate, activation, width,
    )  # fmt: skip


@int8_gated.register_fake
def _(q, scale, gate, gate_correction, gate_scale, up, up_correction, up_scale, intermediate,
      activation, width):  # fmt: skip
    return q.new_empty(q.shape[0], width)


@torch.library.custom_op("rerankd::int8_activated", mutates_args=())
def int8_activated(
    q: Tensor,
    scale: Tensor | None,
    packed: Tensor,
    correction: Tensor,
    w_scale: Tensor,
    out_features: int,
    bias: Tensor | None,
    activation: int,
    width: int,
) -> Tensor:
    """act(q W (+ bias)) quantized per row: fused rows (T, `width`) uint8, as `int8_gated`
    writes them (`width`: see there)."""
    return _kernel().int8_activated(
        q, scale, packed, correction, w_scale, out_features, bias, activation, width
    )


@int8_activated.register_fake
def _(q, scale, packed, correction, w_scale, out_features, bias, activation, width):
    return q.new_empty(q.shape[0], width)


class PackedInt8Weight(nn.Module):
    """One int8 weight (N, K) with its per-channel scales (N,), packed for the kernel: VNNI
    panels, the zero-point correction and the scales (padded columns: scale 0)."""

    def __init__(self, qweight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        packed, correction = _kernel().pack_weight(qweight)
        self.k_pad = padded_k(self.in_features)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("correction", correction, persistent=False)
        self.register_buffer(
            "w_scale", F.pad(scale, (0, len(correction) - len(scale))), persistent=False
        )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.packed, self.correction, self.w_scale


class BrgemmInt8Linear(nn.Module):
    """`nn.Linear` on rerankd's int8 GEMM, output in `dtype` (the model's activations).

    The same interface as `quantize.Int8Linear` (`forward`, `plus` with the residual add in
    the epilogue), so the model code calls either alike. Its input is either activations,
    quantized per token here (compiled callers fuse that with the norm before), or fused
    uint8 rows from `BrgemmInt8GatedLinear`, used as they are."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.weight = PackedInt8Weight(qweight, scale)
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float(), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._gemm(x, None)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + x @ W.T`, the add done in the GEMM's epilogue."""
        return self._gemm(x, residual)

    def activated(self, x: Tensor, activation: str) -> Tensor:
        """`act(x @ W.T + bias)` as fused uint8 rows (quantized per token in the epilogue),
        which only the next `BrgemmInt8Linear` reads: an encoder's GELU and the quantization
        of its output make no pass over the (T, intermediate) activations (compiled, they
        cost as much as the GEMMs: erf computed twice around a row maximum)."""
        lead = x.shape[:-1]
        q, scale = self._quantized(x)
        out = int8_activated(
            q, scale, *self.weight.tensors(), self.out_features, self.bias,
            ACTIVATIONS[activation], fused_width(self.out_features),
        )  # fmt: skip
        return out.reshape(*lead, out.shape[-1])

    def _quantized(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 rows and their scales (None: fused rows, the scales inside)."""
        if x.dtype == torch.uint8:  # fused rows: already quantized, scales inside
            return x.reshape(-1, x.shape[-1]), None
        return quantize_per_token(x.reshape(-1, x.shape[-1]), self.weight.k_pad)

    def _gemm(self, x: Tensor, residual: Tensor | None) -> Tensor:
        lead = x.shape[:-1]
        q, scale = self._quantized(x)
        dtype = self.dtype if x.dtype == torch.uint8 else x.dtype
        if residual is not None:
            residual, dtype = residual.reshape(-1, self.out_features), residual.dtype
        out = int8_gemm(
            q, scale, *self.weight.tensors(), self.out_features, dtype, self.bias, residual
        )
        return out.reshape(*lead, self.out_features)


class BrgemmInt8GatedLinear(nn.Module):
    """A fused gate ‖ up projection (2I, H) as act(x Wg) · (x Wu) in one kernel call, whose
    output is already quantized per token for the down projection (fused uint8 rows, which
    only `BrgemmInt8Linear` reads): the decoder MLP's `w2(gated(x))` then makes no pass over
    the (T, I) product besides the GEMMs."""

    #: it applies the activation itself (`MLP.gated` calls it as is)
    fuses_activation = True

    def __init__(self, quantized: tuple[Tensor, Tensor], activation: str) -> None:
        super().__init__()
        qweight, scale = quantized
        self.intermediate = qweight.shape[0] // 2
        self.activation = ACTIVATIONS[activation]
        self.gate = PackedInt8Weight(qweight[: self.intermediate], scale[: self.intermediate])
        self.up = PackedInt8Weight(qweight[self.intermediate :], scale[self.intermediate :])

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        q, scale = quantize_per_token(x.reshape(-1, x.shape[-1]), self.gate.k_pad)
        out = int8_gated(
            q, scale, *self.gate.tensors(), *self.up.tensors(), self.intermediate,
            self.activation, fused_width(self.intermediate),
        )  # fmt: skip
        return out.reshape(*lead, out.shape[-1])


# --- the agreement check (`quantize.choose_int8`) ----------------------------------------


def exact_per_token(q: Tensor, scale: Tensor, quantized: tuple[Tensor, Tensor]) -> Tensor:
    """What the kernel must compute: (q - 128) @ W.T dequantized, in float64 (uint8 rows
    `q` with their per-token `scale`, int8 weight with its per-channel scales)."""
    qw, sw = quantized
    acc = (q.double() - ZERO_POINT) @ qw.double().T
    return acc * scale.double()[:, None] * sw.double()


def split_fused_rows(fused: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Fused rows (T, width) → their uint8 columns (T, k) and float32 scales (T,)."""
    scale = fused[:, padded_k(k) : padded_k(k) + SCALE_BYTES].contiguous().view(torch.float32)
    return fused[:, :k], scale[:, 0]


def agrees(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor, tolerance: float) -> bool:
    """Whether the kernel computes the int8 arithmetic on `x` (T, K) with the square
    `weight` (K, K) in every configuration the models use: plain, bias, residual, a few
    rows, one column; every activation, the act·up product and the activated biased output
    quantized per token (within half a step) and the down GEMM on those fused rows. Relative `tolerance` (x's dtype)."""
    dtype, quantized, k = x.dtype, quantize_weight(weight), x.shape[1]
    plain = BrgemmInt8Linear(*quantized, None, dtype)
    biased = BrgemmInt8Linear(*quantized, bias, dtype)
    column = BrgemmInt8Linear(quantized[0][:1], quantized[1][:1], bias[:1], dtype)
    exact = exact_per_token(*quantize_per_token(x), quantized)
    checks = [
        (plain(x), exact, tolerance),
        (biased(x), exact + bias.double(), tolerance),
        (plain.plus(x, residual), exact + residual.double(), tolerance),
        (biased(x[:3]), exact[:3] + bias.double(), tolerance),
        (column(x[:3]), exact[:3, :1] + bias[:1].double(), tolerance),
    ]
    pairs = quantize_weight(torch.cat([weight, weight]))
    for name in ACTIVATIONS:
        gated = BrgemmInt8GatedLinear(pairs, name)(x)
        activated = biased.activated(x, name)
        for fused, want in (
            (gated, ACTIVATION_FUNCTIONS[name](exact) * exact),
            (activated, ACTIVATION_FUNCTIONS[name](exact + bias.double())),
        ):
            q, scale = split_fused_rows(fused, k)
            step = 0.51 * float(scale.max())  # rounding to the int8 grid: half a step
            got = (q.double() - ZERO_POINT) * scale.double()[:, None]
            checks.append((got, want, tolerance + step))
            down = exact_per_token(q, scale, quantized) + residual.double()
            checks.append((plain.plus(fused, residual), down, tolerance))
    return all(
        bool(((got.double() - want).abs() <= bound * (1 + want.abs())).all())
        for got, want, bound in checks
    )
