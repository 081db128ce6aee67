"""Opt-in int8 linear layers (`--quantize int8`, CPU).

Which implementation serves is decided at start-up by agreement **and** speed
(`choose_int8`), in this order:

- **rerankd's own int8 GEMM** ("w8a8-brgemm", `rerankd.ops.int8_gemm`: per-token scales,
  fused epilogues): serves if it runs a decoder layer's linears faster than oneDNN W8A8
  (`_layer_race`).

- **W8A8 through oneDNN** (`Int8Linear`): weights int8 per output channel, packed once;
  activations quantized per tensor on the fly (symmetric); the GEMM runs on VNNI /
  AMX-INT8 and writes the model's own dtype (bf16 on CPUs that have it), so attention,
  norms and RoPE stay in bf16 and the residual add rides the GEMM's epilogue. On a 2-core
  Xeon with AMX this GEMM ran 1.7-1.9x the prepacked bf16 one alone on the Qwen3-0.6B
  shapes (1,024 and 4,096 rows). Activations are int8, or uint8 with zero point 128 (the
  same grid shifted, the same products): without AMX oneDNN has optimized kernels
  (`brg_matmul:avx512_core_vnni`) for uint8 activations only, and ran int8 ones on its
  scalar reference kernel, ~1,000x slower (issue 18: a server that never became healthy).
- **torch.ao dynamic quantization** (fallback): the same scheme through torch.ao's
  `quantize_dynamic` (fbgemm or oneDNN); its linears take float32 activations, so the
  model runs float32.
- **none**: no int8 path agrees with the int8 arithmetic, or all run a reference kernel or
  are slower than the non-quantized linear; a warning says so and the model is served
  without int8 (never a reference kernel).

Scores move by a small, measured amount (see docs/benchmarks.md); float32 and bf16 remain
the exact paths.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rerankd.ops import int8_gemm
from rerankd.ops.cpu import cpu_has_amx
from rerankd.ops.int8_gemm import quantize_weight
from rerankd.ops.onednn_ops import (
    UINT8_ZERO_POINT,
    int8_linear,
    is_reference_implementation,
    onednn_implementations,
    register_packed,
)
from rerankd.ops.prepack import (
    ONEDNN_ACTIVATIONS,
    PrepackedLinear,
    prepack_supported,
    swap_linears,
)

log = logging.getLogger(__name__)

#: int8: CPU (this module); fp8: CUDA 8.9+ (rerankd/ops/fp8.py)
QUANTIZE_MODES = ("none", "int8", "fp8")

#: int8 grid of the symmetric quantizers (-127..127: no -128, so negation is exact)
_QMAX = 127.0


def quantize_per_tensor(x: Tensor, unsigned: bool = False) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 for activations: (int8 tensor, float32 scale of shape ()), or
    with `unsigned` the same grid as uint8 shifted by 128 (zero point 128).

    Written as plain tensor ops so a compiled caller fuses it with the norm or activation
    that produced `x` (one pass for the maximum, one for the cast). |x| / scale is at most
    127 up to float rounding, so rounding lands in -127..127 without a clamp (a clamp
    doubled the cost of the compiled cast)."""
    scale = x.abs().amax().float().clamp(min=1e-12) / _QMAX
    rounded = torch.round(x.float() * (1.0 / scale))
    if unsigned:
        return (rounded + UINT8_ZERO_POINT).to(torch.uint8), scale
    return rounded.to(torch.int8), scale


class Int8Linear(nn.Module):
    """`nn.Linear` as an int8 x int8 oneDNN GEMM; output in the activations' dtype.

    Has `PrepackedLinear`'s `plus` (residual add in the epilogue), so the model code calls
    either the same way. `unsigned`: quantize activations to uint8 (zero point 128) instead
    of int8, for CPUs where only that has an optimized oneDNN kernel (`choose_int8`)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, batch_hint: int = 1024, unsigned: bool = False
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.unsigned = unsigned
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
        q, scale = quantize_per_tensor(x, self.unsigned)
        return self.gemm(q, scale, x.dtype)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + x @ W.T`, the add done in the GEMM's epilogue."""
        q, scale = quantize_per_tensor(x, self.unsigned)
        return int8_linear(
            q, scale, self.handle, self.w_scale, self.out_features, residual.dtype, self.bias,
            residual,
        )  # fmt: skip

    def activated(self, x: Tensor, activation: str) -> Tensor:
        """`act(x @ W.T + bias)`, the activation in the GEMM's epilogue (an encoder's GELU:
        compiled, a separate GELU before the next quantization computed erf twice)."""
        q, scale = quantize_per_tensor(x, self.unsigned)
        return self.gemm(q, scale, x.dtype, activation)

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

    #: it applies the activation itself: `MLP.gated` calls it as is, without the split and
    #: the activation pass a plain `nn.Linear` gate ‖ up projection needs
    fuses_activation = True

    def __init__(self, weight: Tensor, activation: str, unsigned: bool = False) -> None:
        super().__init__()
        intermediate = weight.shape[0] // 2
        self.activation = activation
        self.unsigned = unsigned
        self.gate = Int8Linear(weight[:intermediate], None, unsigned=unsigned)
        self.up = Int8Linear(weight[intermediate:], None, unsigned=unsigned)

    def forward(self, x: Tensor) -> Tensor:
        q, scale = quantize_per_tensor(x, self.unsigned)
        return self.gate.gemm(q, scale, x.dtype, self.activation) * self.up.gemm(q, scale, x.dtype)


# --- kernel choice: agreement and speed ------------------------------------------------------

BRGEMM_PATH = "w8a8-brgemm"
#: the W8A8 activation encodings tried, in order of preference. uint8 first: oneDNN 3.12 has
#: optimized kernels for it on every VNNI CPU. int8 activations run its reference kernel
#: without AMX, and even with AMX for the shapes AMX does not take (fewer than ~8 rows, as an
#: encoder's classifier head on one row per sequence; a single output column)
_W8A8_CANDIDATES = (("w8a8-uint8", True), ("w8a8-int8", False))
#: torch.ao engines tried for the fallback (oneDNN first: on the Qwen3-0.6B shape, 2-core
#: EPYC with AVX512-VNNI, its per-channel dynamic linear ran the whole model ~10 % faster
#: than fbgemm/x86 at the same fidelity)
_TORCH_AO_ENGINES = ("onednn", "x86", "fbgemm")
#: an int8 GEMM may be this much slower than the non-quantized one on the probe and still be
#: taken: timing noise on a busy machine, not a slow kernel (a reference kernel is ~1,000x)
_SPEED_SLACK = 1.15
#: where oneDNN names no kernel (fbgemm; a build without verbose output): an int8 GEMM this
#: many times slower than the non-quantized one on the small shape is a reference-speed
#: kernel, refused before the larger shape would take it seconds
_REFERENCE_SLOWDOWN = 20.0
#: timing keeps sampling for this long (at least) before it takes each contender's fastest
_TIMING_BUDGET_S = 0.3
_MAX_TIMING_ROUNDS = 200
#: probe shapes (rows, in, out): a small one to catch a reference kernel cheaply, and one of
#: the size real batches have to compare speed on
_SMALL_SHAPE = (32, 256, 256)
_TIMED_SHAPE = (1024, 1024, 1024)


@dataclass(frozen=True)
class Int8Choice:
    """The int8 implementation chosen for one activation dtype, and why (logged at start-up;
    tests read it to check no reference kernel serves).

    `path`: "w8a8-int8" / "w8a8-uint8" (oneDNN W8A8, activations int8 or uint8), "torch-ao"
    (dynamic quantization with engine `engine`, float32 activations) or "none".
    `implementations`: the oneDNN implementations the chosen path ran in the probe (empty
    for fbgemm, or where the build prints no verbose output). `speedup`: the non-quantized
    linear's time over the int8 one on the timed probe shape. `refused`: each path turned
    down, with the reason."""

    dtype: torch.dtype
    path: str
    engine: str = ""
    implementations: tuple[str, ...] = ()
    speedup: float = 0.0
    refused: tuple[tuple[str, str], ...] = field(default=())

    @property
    def w8a8(self) -> bool:
        """int8 GEMMs on the model's own activations (oneDNN W8A8 or rerankd's kernel)."""
        return self.path.startswith("w8a8")

    @property
    def brgemm(self) -> bool:
        return self.path == BRGEMM_PATH

    @property
    def unsigned(self) -> bool:
        return self.path == "w8a8-uint8"

    def describe(self) -> str:
        """One log line: what serves, on which kernels, how fast; what was refused."""
        if self.path == "none":
            chosen = "int8: no int8 path qualifies; serving without int8"
        else:
            kernels = ", ".join(self.implementations) or self.engine or "unnamed kernels"
            engine = f" ({self.engine})" if self.engine else ""
            chosen = (
                f"int8: {self.path}{engine} for {_name(self.dtype)} activations on {kernels}, "
                f"{self.speedup:.2f}x the non-quantized linear on the probe"
            )
        refused = "; ".join(f"{path}: {why}" for path, why in self.refused)
        return f"{chosen}" + (f" (refused {refused})" if refused else "")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def choose_int8(dtype: torch.dtype) -> Int8Choice:
    """The fastest int8 implementation here that gives the int8 arithmetic's result for
    `dtype` activations, runs no oneDNN reference kernel and is not slower than the
    non-quantized linear in `dtype` (the path the server would run without int8).

    W8A8 first (int8 then uint8 activations; the faster if both qualify), then torch.ao's
    dynamic quantization (the fastest engine that qualifies), else "none". Probes take well
    under a second; the decision is logged, once per dtype."""
    refused: list[tuple[str, str]] = []
    if dtype not in (torch.bfloat16, torch.float32):
        refused.append(("w8a8", f"no int8 GEMM writes {_name(dtype)}"))
    elif not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        refused.append(("w8a8", "this torch build has no oneDNN int8 linear"))
    else:
        passed = []
        kernel = int8_gemm.load_kernel()
        verdict = (
            _qualify(BRGEMM_PATH, lambda: _brgemm_probe(dtype), dtype)
            if kernel
            else "kernel unavailable (needs AVX512-VNNI and a build)"
        )
        if isinstance(verdict, str):
            refused.append((BRGEMM_PATH, verdict))
        else:  # oneDNN's verbose mode names no ukernel: the ISA it JITs for
            passed.append((BRGEMM_PATH, (kernel.implementation(),), verdict[1]))
        for path, unsigned in _W8A8_CANDIDATES:
            verdict = _qualify(path, lambda u=unsigned: _w8a8_probe(dtype, u), dtype)
            if isinstance(verdict, str):
                refused.append((path, verdict))
            else:
                passed.append((path, *verdict))
        if passed:
            # the faster oneDNN encoding; a tie (within the timing slack) goes to the earlier
            onednn = [p for p in passed if p[0] != BRGEMM_PATH]
            best = onednn and max(
                onednn, key=lambda p: p[2] * (_SPEED_SLACK if p is onednn[0] else 1.0)
            )
            if len(onednn) < len(passed):  # rerankd's kernel against it, on a layer
                best = _layer_race(dtype, passed[0], best, refused)
            path, implementations, speedup = best
            return _decided(Int8Choice(dtype, path, "", implementations, speedup, tuple(refused)))
    best: Int8Choice | None = None
    engines = torch.backends.quantized.supported_engines
    for engine in (e for e in _TORCH_AO_ENGINES if e in engines):
        verdict = _qualify(f"torch-ao {engine}", lambda e=engine: _torch_ao_probe(e), dtype)
        if isinstance(verdict, str):
            refused.append((f"torch-ao ({engine})", verdict))
        elif best is None or verdict[1] > best.speedup:
            best = Int8Choice(dtype, "torch-ao", engine, verdict[0], verdict[1])
    if best is not None:
        return _decided(Int8Choice(**{**best.__dict__, "refused": tuple(refused)}))
    return _decided(Int8Choice(dtype, "none", refused=tuple(refused)))


def _decided(choice: Int8Choice) -> Int8Choice:
    (log.warning if choice.path == "none" else log.info)("%s", choice.describe())
    return choice


def onednn_int8_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN's W8A8 linear serves `dtype` activations here (`choose_int8`: it agrees
    with the int8 arithmetic, runs no reference kernel and beats the non-quantized linear)."""
    return choose_int8(dtype).w8a8


#: a probe: builds an int8 linear of shape (rows, in, out), returns (error vs what it must
#: compute, within tolerance?, callable running the int8 GEMM on a fresh input of that shape)
_Probe = Callable[[tuple[int, int, int]], tuple[bool, Callable[[], object]]]


def _qualify(
    path: str, probe: Callable[[], _Probe], dtype: torch.dtype
) -> str | tuple[tuple[str, ...], float]:
    """Run `path`'s probe: the reason it is refused, or (oneDNN implementations, speedup
    over the non-quantized linear in `dtype`)."""
    try:
        build = probe()
        (agrees, run_small), implementations = onednn_implementations(
            lambda: _run_once(build(_SMALL_SHAPE))
        )
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"unavailable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    reference = sorted(i for i in implementations if is_reference_implementation(i))
    if reference:
        return f"oneDNN reference kernel {', '.join(reference)}"
    if not agrees:
        return "disagrees with the int8 arithmetic"
    if not implementations:  # no kernel names (fbgemm, or no verbose output): speed alone
        small = _best_times({"int8": run_small, "base": _baseline(dtype, _SMALL_SHAPE)}, 10)
        if small["int8"] > _REFERENCE_SLOWDOWN * small["base"]:
            return (
                f"reference-speed kernel ({small['int8'] * 1e3:.2f} ms vs "
                f"{small['base'] * 1e3:.2f} ms non-quantized on {_SMALL_SHAPE})"
            )
    _, run_timed = build(_TIMED_SHAPE)
    runs = {"int8": run_timed, "base": _baseline(dtype, _TIMED_SHAPE)}
    timed = _best_times(runs, repeats=7)
    if timed["base"] < timed["int8"] * _SPEED_SLACK:  # not faster: make sure, on more samples
        again = _best_times(runs, repeats=7, budget_s=4 * _TIMING_BUDGET_S)
        timed = {name: min(timed[name], again[name]) for name in timed}
    speedup = timed["base"] / timed["int8"]
    if speedup * _SPEED_SLACK < 1.0:
        return (
            f"slower than the non-quantized {_name(dtype)} linear "
            f"({timed['int8'] * 1e3:.2f} vs {timed['base'] * 1e3:.2f} ms on {_TIMED_SHAPE})"
        )
    return tuple(sorted(implementations)), speedup


def _run_once(probe: tuple[bool, Callable[[], object]]) -> tuple[bool, Callable[[], object]]:
    """Run the probe's GEMM once (under the caller's verbose capture) and pass it on."""
    probe[1]()
    return probe


def _probe_tensors(shape: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (x, weight, bias) of `shape` (rows, in, out), with one all-positive row and
    weight channel at the ends of their grids: an int8 kernel whose products saturate in
    int16 (AVX2's `vpmaddubsw`, no VNNI) gets those outputs wrong."""
    rows, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen)
    weight = torch.randn(n, k, generator=gen)
    x[0] = x.abs().max()
    weight[0] = weight.abs().max()
    return x, weight, torch.randn(n, generator=gen)


def _w8a8_probe(dtype: torch.dtype, unsigned: bool) -> _Probe:
    """The W8A8 probe: every configuration the models use (plain, bias, residual add,
    both gate activations; a few rows, as a classifier head on one row per sequence; one
    output column, as a score head) against the exact int8 products in float64."""
    # float32: accumulation order; bf16: a few roundings at 2^-8 (the gated product: twice)
    tolerance = 1e-4 if dtype == torch.float32 else 4 * 2.0**-8

    def build(shape: tuple[int, int, int]) -> tuple[bool, Callable[[], object]]:
        x, weight, bias = _probe_tensors(shape)
        x = x.to(dtype)
        residual = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(1))
        residual = residual.to(dtype)
        plain, biased = (
            Int8Linear(weight, None, unsigned=unsigned),
            Int8Linear(weight, bias, unsigned=unsigned),
        )
        q, scale = quantize_per_tensor(x, unsigned)
        if shape != _SMALL_SHAPE:  # larger shapes only time the GEMM the models run most
            return True, lambda: plain.gemm(q, scale, dtype)
        qx, sx = quantize_per_tensor(x)
        qw, sw = quantize_weight(weight)
        exact = (qx.double() @ qw.double().T) * sx.double() * sw.double()
        gated = Int8GatedLinear(torch.cat([weight, weight]), "silu", unsigned)
        column = Int8Linear(weight[:1], bias[:1], unsigned=unsigned)  # row 0 sets the scales
        silu, gelu = torch.nn.functional.silu, torch.nn.functional.gelu
        agrees = all(
            _close(got, want, bound)
            for got, want, bound in (
                (plain(x), exact, tolerance),
                (biased(x), exact + bias.double(), tolerance),
                (plain.plus(x, residual), exact + residual.double(), tolerance),
                (biased(x[:3]), exact[:3] + bias.double(), tolerance),
                (column(x[:3]), exact[:3, :1] + bias[:1].double(), tolerance),
                (gated(x), silu(exact) * exact, 2 * tolerance),
                (plain.gemm(q, scale, dtype, "gelu_tanh"), gelu(exact, approximate="tanh"),
                 tolerance),
                (biased.activated(x, "gelu"), gelu(exact + bias.double()), tolerance),
            )
        )  # fmt: skip
        return agrees, lambda: plain.gemm(q, scale, dtype)

    return build


def _brgemm_probe(dtype: torch.dtype) -> _Probe:
    """rerankd's int8 GEMM probe (`int8_gemm.agrees`: every configuration the models use,
    against the exact int8 products with per-token scales in float64)."""
    tolerance = 1e-4 if dtype == torch.float32 else 4 * 2.0**-8

    def build(shape: tuple[int, int, int]) -> tuple[bool, Callable[[], object]]:
        x, weight, bias = _probe_tensors(shape)
        x = x.to(dtype)
        plain = int8_gemm.BrgemmInt8Linear(*quantize_weight(weight), None, dtype)
        q, sx = int8_gemm.quantize_per_token(x, plain.weight.k_pad)
        run = lambda: int8_gemm.int8_gemm(q, sx, *plain.weight.tensors(), shape[2], dtype)  # noqa: E731
        if shape != _SMALL_SHAPE:  # larger shapes only time the plain GEMM
            return True, run
        residual = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(1))
        return int8_gemm.agrees(x, weight, bias, residual.to(dtype), tolerance), run

    return build


#: What rerankd's fused epilogues save around the GEMMs, as a share of oneDNN W8A8's GEMM
#: time in a decoder layer: the race (`_layer_race`) leaves it out, so rerankd's kernel serves
#: unless the race has it slower by more than this. Measured in the whole model
#: (bench_int8_gemm, 0.6B shape; docs/benchmarks.md "int8 GEMM with fused epilogue"): on AMX
#: the compiled graphs around the GEMMs took 24.9 ms/layer with rerankd's kernel and 38.0 with
#: oneDNN's, 14 % of oneDNN's 91 ms/layer of GEMMs; under the Zen 4 caps the same 13 ms would
#: be 6 % of its 221 ms (that profile did not show it), so 5 % there. A single margin of 5 %
#: made the AMX choice a coin flip: races of 20.5-21.5 ms against oneDNN's 20.5 picked oneDNN
#: in 3 of 4 starts (2026-12-05), which the whole model then ran ~13 % slower, with worse
#: fidelity (max |Δ| 0.033 against 0.024).
_EPILOGUE_SAVING = {"amx": 0.14, "other": 0.05}
#: the decoder layer whose linears the two W8A8 kernels race on (tokens, hidden, attention
#: width (query heads x head dim), key/value width, intermediate): the Qwen3-0.6B widths, on
#: 1,024 tokens (a 16-document request is ~3,000)
_LAYER_SHAPE = (1024, 1024, 2048, 1024, 3072)


def _layer_race(
    dtype: torch.dtype, brgemm: tuple, onednn: tuple | list, refused: list[tuple[str, str]]
) -> tuple:
    """rerankd's kernel, unless it runs one decoder layer's linears (qkv; o and down with
    the residual add; gate ‖ up with SiLU; interleaved, one thread) slower than oneDNN's
    W8A8 by more than its epilogues save on this CPU class (`_EPILOGUE_SAVING`); then
    oneDNN's.

    Each side runs its GEMMs on inputs quantized beforehand, since a compiled model fuses the
    quantization into the norm before each linear. What oneDNN's side then leaves out, the
    SiLU·up product and its quantization for the down projection (two passes over the
    (tokens, intermediate) tensor that rerankd's gated epilogue does in place), is an
    advantage of rerankd's kernel the race does not count: it predicts the whole model
    conservatively. (The gated MLP block raced before counted it eagerly, unfused, and
    called a 0.79x whole model a tie.)"""
    if not onednn:
        return brgemm
    tokens, hidden, attention, kv, inner = _LAYER_SHAPE
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    o_in = torch.randn(tokens, attention, generator=gen).to(dtype)
    h = torch.randn(tokens, inner, generator=gen).to(dtype)
    weights = {
        "qkv": torch.randn(attention + 2 * kv, hidden, generator=gen),
        "o": torch.randn(hidden, attention, generator=gen),
        "gate_up": torch.randn(2 * inner, hidden, generator=gen),
        "down": torch.randn(hidden, inner, generator=gen),
    }
    times = _best_times(
        {
            BRGEMM_PATH: _brgemm_layer(dtype, weights, x, o_in),
            onednn[0]: _onednn_layer(dtype, weights, x, o_in, h, onednn[0] == "w8a8-uint8"),
        },
        repeats=5,
    )
    saving = _EPILOGUE_SAVING["amx" if cpu_has_amx() else "other"]
    ours = times[BRGEMM_PATH] < times[onednn[0]] * (1 + saving)
    winner, loser = (brgemm, onednn) if ours else (onednn, brgemm)
    ms = f"{times[BRGEMM_PATH] * 1e3:.2f} ms ours vs {times[onednn[0]] * 1e3:.2f} ms oneDNN"
    why = (
        f"rerankd's kernel within {saving:.0%} of it on a decoder layer's GEMMs "
        f"{_LAYER_SHAPE} ({ms}), which its fused epilogues save on this CPU class"
        if ours
        else f"more than {saving:.0%} slower on a decoder layer's GEMMs {_LAYER_SHAPE} ({ms}), "
        "more than its fused epilogues save on this CPU class"
    )
    refused.append((loser[0], why))
    return winner


def _brgemm_layer(
    dtype: torch.dtype, weights: dict[str, Tensor], x: Tensor, o_in: Tensor
) -> Callable[[], object]:
    """One layer's linears on rerankd's kernel, inputs quantized per token beforehand."""
    qkv, o, down = (
        int8_gemm.BrgemmInt8Linear(*quantize_weight(weights[name]), None, dtype)
        for name in ("qkv", "o", "down")
    )
    gated = int8_gemm.BrgemmInt8GatedLinear(quantize_weight(weights["gate_up"]), "silu")
    qx, sx = int8_gemm.quantize_per_token(x, qkv.weight.k_pad)
    qo, so = int8_gemm.quantize_per_token(o_in, o.weight.k_pad)
    inner = gated.intermediate
    width = int8_gemm.fused_width(inner)

    def run() -> object:
        int8_gemm.int8_gemm(qx, sx, *qkv.weight.tensors(), qkv.out_features, dtype)
        int8_gemm.int8_gemm(qo, so, *o.weight.tensors(), o.out_features, dtype, None, x)
        fused = int8_gemm.int8_gated(
            qx, sx, *gated.gate.tensors(), *gated.up.tensors(), inner, 0, width
        )
        return int8_gemm.int8_gemm(
            fused, None, *down.weight.tensors(), down.out_features, dtype, None, x
        )

    return run


def _onednn_layer(
    dtype: torch.dtype,
    weights: dict[str, Tensor],
    x: Tensor,
    o_in: Tensor,
    h: Tensor,
    unsigned: bool,
) -> Callable[[], object]:
    """One layer's linears on oneDNN's W8A8, inputs quantized per tensor beforehand; the
    SiLU rides the gate GEMM, the act·up product and its quantization are left out."""
    qkv, o, down = (
        Int8Linear(weights[name], None, unsigned=unsigned) for name in ("qkv", "o", "down")
    )
    gated = Int8GatedLinear(weights["gate_up"], "silu", unsigned)
    qx, sx = quantize_per_tensor(x, unsigned)
    qo, so = quantize_per_tensor(o_in, unsigned)
    qh, sh = quantize_per_tensor(h, unsigned)

    def run() -> object:
        qkv.gemm(qx, sx, dtype)
        int8_linear(qo, so, o.handle, o.w_scale, o.out_features, dtype, None, x)
        gated.gate.gemm(qx, sx, dtype, "silu")
        gated.up.gemm(qx, sx, dtype)
        return int8_linear(qh, sh, down.handle, down.w_scale, down.out_features, dtype, None, x)

    return run


def _close(got: Tensor, want: Tensor, tolerance: float) -> bool:
    return bool(((got.double() - want).abs() <= tolerance * (1 + want.abs())).all())


def _torch_ao_probe(engine: str) -> _Probe:
    """The torch.ao probe: a dynamically quantized linear on `engine` against the float
    product, within the bound its quantization steps allow (7-bit activations: torch.ao's
    `reduce_range`; per-channel int8 weights)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    def build(shape: tuple[int, int, int]) -> tuple[bool, Callable[[], object]]:
        x, weight, bias = _probe_tensors(shape)
        torch.backends.quantized.engine = engine
        linear = nn.Linear(shape[1], shape[2])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        layer = _torch_ao_int8(nn.Sequential(linear), engine)[0]
        if not isinstance(layer, DynamicLinear):
            raise RuntimeError("quantize_dynamic left the linear as it was")
        if shape != _SMALL_SHAPE:
            return True, lambda: layer(x)
        want = x.double() @ weight.double().T + bias.double()
        x_step = float(x.max() - x.min().clamp(max=0)) / 127  # 7-bit asymmetric activations
        w_step = weight.abs().amax(dim=1, keepdim=True).double() / 127
        bound = x_step / 2 * weight.abs().double().sum(1) + x.abs().double().sum(
            1, keepdim=True
        ) * (w_step.T / 2)
        agrees = bool(((layer(x).double() - want).abs() <= 1.5 * bound + 1e-3).all())
        return agrees, lambda: layer(x)

    return build


def _baseline(dtype: torch.dtype, shape: tuple[int, int, int]) -> Callable[[], object]:
    """The non-quantized linear the server runs in `dtype` (prepacked for bf16/fp16 where
    oneDNN supports it, as `prepack_linears` does)."""
    x, weight, _ = _probe_tensors(shape)
    x, weight = x.to(dtype), weight.to(dtype)
    if prepack_supported(torch.device("cpu"), dtype):
        try:
            packed = PrepackedLinear(weight)
            return lambda: packed(x)
        except RuntimeError:  # no bf16 GEMM on this CPU: plain F.linear, as the model does
            pass
    return lambda: torch.nn.functional.linear(x, weight)


def _best_times(
    runs: dict[str, Callable[[], object]], repeats: int, budget_s: float = _TIMING_BUDGET_S
) -> dict[str, float]:
    """The fastest run of each, interleaved (after one warm-up each) so that a busy moment
    of the machine hits every contender alike: at least `repeats` rounds, and more until
    `budget_s` has passed, on one thread. The minimum, since contention only ever adds
    time."""
    best = dict.fromkeys(runs, float("inf"))
    threads = torch.get_num_threads()
    # one thread: a GEMM split over all cores waits for the slowest, and on a shared machine
    # some core is always busy (2 threads on 2 shared cores: 0.2-48 ms for one GEMM); the
    # ratio of two kernels is what is measured, and one core shows it without the noise
    torch.set_num_threads(1)
    try:
        _sample(runs, repeats, budget_s, best)
    finally:
        torch.set_num_threads(threads)
    return best


def _sample(
    runs: dict[str, Callable[[], object]], repeats: int, budget_s: float, best: dict[str, float]
) -> None:
    with torch.inference_mode():
        for run in runs.values():
            run()
        started = time.perf_counter()
        rounds = 0
        while rounds < repeats or (
            time.perf_counter() - started < budget_s and rounds < _MAX_TIMING_ROUNDS
        ):
            for name, run in runs.items():
                begun = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - begun)
            rounds += 1


# --- swapping the model's linears ------------------------------------------------------------


def quantize_int8(
    model: nn.Module, dtype: torch.dtype, choice: Int8Choice | None = None
) -> tuple[nn.Module, torch.dtype]:
    """Replace every `nn.Linear` by an int8 one as `choice` (default: `choose_int8(dtype)`)
    says; returns the model and the dtype its activations now run in (`dtype` with oneDNN
    W8A8, float32 with the torch.ao fallback: the model must then be float32; the caller
    that chose for bf16 and loaded in float32 passes its choice). Where no int8 path
    qualifies the model is returned as it is."""
    choice = choice or choose_int8(dtype)
    if choice.brgemm:
        swap_linears(
            model,
            lambda linear, activation: (
                int8_gemm.BrgemmInt8GatedLinear(quantize_weight(linear.weight), activation)
                if activation in int8_gemm.ACTIVATIONS
                else int8_gemm.BrgemmInt8Linear(*quantize_weight(linear.weight), linear.bias, dtype)
            ),
        )
        return model, dtype
    if choice.w8a8:
        unsigned = choice.unsigned
        swap_linears(
            model,
            lambda linear, activation: (
                Int8GatedLinear(linear.weight, activation, unsigned)
                if activation
                else Int8Linear(linear.weight, linear.bias, unsigned=unsigned)
            ),
        )
        return model, dtype
    if choice.path == "none":
        log.warning(
            "--quantize int8: serving the model without int8 (%s)",
            "; ".join(why for _, why in choice.refused),
        )
        return model, next((p.dtype for p in model.parameters()), dtype)
    engine = choice.engine or _TORCH_AO_ENGINES[0]
    return _torch_ao_int8(model.float(), engine), torch.float32


def _torch_ao_int8(model: nn.Module, engine: str) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        # torch.ao's eager quantization API is deprecated in favour of torchao, but it is
        # the one shipped with torch itself and runs fbgemm's kernels.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
