"""oneDNN's prepacked GEMMs as custom ops that `torch.compile` keeps inside its graphs.

A packed oneDNN weight is opaque (no storage), so compiled code cannot take it as a graph
input, and calling the GEMM directly breaks the graph around every linear: a decoder layer
ran as five or six compiled pieces with Dynamo's entry, guards and resume code between
them. These ops take a small integer tensor, the weight's *handle*, instead of the weight
and look the packed weight up when they run; their fake implementations give the output
shape, so a layer's per-token code compiles into one graph around the GEMMs (which run as
extern calls) and every layer still shares it (handles are graph inputs, not constants).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import tempfile
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T")

_PACKED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_NEXT_HANDLE = itertools.count(1)


def register_packed(packed: Tensor) -> Tensor:
    """A handle (int64 scalar tensor) for `packed`, valid while `packed` lives (the owner
    keeps both: the registry does not hold weights alive)."""
    handle = next(_NEXT_HANDLE)
    _PACKED[handle] = packed
    return torch.tensor(handle, dtype=torch.long)


def _lookup(handle: Tensor) -> Tensor:
    key = int(handle.item())
    packed = _PACKED.get(key)
    if packed is None:
        raise RuntimeError(f"packed weight {key} no longer exists (its module was freed)")
    return packed


# --- bf16/fp16 prepacked linear ----------------------------------------------------------


@torch.library.custom_op("rerankd::packed_linear", mutates_args=())
def packed_linear(
    x: Tensor,
    handle: Tensor,
    out_features: int,
    other: Tensor | None = None,
    binary: str = "",
    attr: str = "none",
    algorithm: str = "",
    bias: Tensor | None = None,
) -> Tensor:
    """`x @ W.T (+ bias)` with the packed weight of `handle`, then either `binary` ("add" or
    "mul") with `other` on the float32 accumulator, or the unary post-op `attr`/`algorithm`.
    The bias is added on the accumulator too (an encoder's `addmm` instead copied it into
    every output row first: 13 % of a bf16 XLM-R forward)."""
    packed = _lookup(handle)
    if binary:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, binary)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)


@packed_linear.register_fake
def _(x, handle, out_features, other=None, binary="", attr="none", algorithm="", bias=None):
    return x.new_empty(*x.shape[:-1], out_features)


# --- W8A8 int8 linear -----------------------------------------------------------------------


#: zero point of uint8 activations: the symmetric int8 grid shifted by 128 (same products)
UINT8_ZERO_POINT = 128


@functools.cache
def _zero_points(out_features: int, unsigned: bool) -> tuple[Tensor, Tensor]:
    """Symmetric quantization: zero points of the activations (0 for int8, 128 for uint8:
    the same grid shifted) and of each weight channel."""
    x_zero = UINT8_ZERO_POINT if unsigned else 0
    return torch.tensor(x_zero, dtype=torch.long), torch.zeros(out_features, dtype=torch.long)


@torch.library.custom_op("rerankd::int8_linear", mutates_args=())
def int8_linear(
    q: Tensor,
    scale: Tensor,
    handle: Tensor,
    w_scale: Tensor,
    out_features: int,
    dtype: torch.dtype,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    attr: str = "none",
    algorithm: str = "",
) -> Tensor:
    """int8 `q` (activation `scale`) times the packed int8 weight of `handle` (per-channel
    `w_scale`), output in `dtype`: plus `residual` in the epilogue when given, else through
    the unary post-op `attr`/`algorithm`. `q` is int8, or uint8 with zero point 128 (oneDNN
    has optimized int8 kernels for signed activations only with AMX, `quantize.choose_int8`)."""
    packed = _lookup(handle)
    x_zero, w_zero = _zero_points(out_features, q.dtype == torch.uint8)
    if residual is not None:
        # "add" reads `residual` (oneDNN's "sum" would overwrite it in place)
        return torch.ops.onednn.qlinear_pointwise.binary_tensor(
            q, scale, x_zero, packed, w_scale, w_zero, residual, bias,
            1.0, 0, residual.dtype, 1.0, 0, "add", 1.0, "none", [], "",
        )  # fmt: skip
    return torch.ops.onednn.qlinear_pointwise.tensor(
        q, scale, x_zero, packed, w_scale, w_zero, bias, 1.0, 0, dtype, attr, [], algorithm
    )


@int8_linear.register_fake
def _(q, scale, handle, w_scale, out_features, dtype, bias=None, residual=None, attr="none",
      algorithm=""):  # fmt: skip
    return q.new_empty(*q.shape[:-1], out_features, dtype=dtype)


# --- which oneDNN implementation ran -------------------------------------------------------


def onednn_implementations(fn: Callable[[], _T]) -> tuple[_T, set[str]]:
    """`fn()` and the names of the oneDNN matmul/inner-product implementations it executed
    (e.g. ``brg_matmul:avx512_core_vnni``; ``ref_int8:any`` is oneDNN's scalar reference).

    Why: oneDNN silently falls back to its reference kernels for configurations it has no
    optimized kernel for on this CPU (W8A8 with int8 activations without AMX ran ~1,000x
    slower than bf16), and only its verbose mode names the implementation. Verbose mode
    prints to the process's stdout (file descriptor 1), which is redirected to a temporary
    file while `fn` runs: call it at start-up, never while serving. The set is empty where
    this torch build prints nothing."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                result = fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    return result, parse_implementations(text)


def parse_implementations(verbose: str) -> set[str]:
    """The implementation names of the matmul/inner-product executions in oneDNN verbose
    output (``onednn_verbose,v1,primitive,exec,cpu,matmul,<implementation>,...``)."""
    names = set()
    for line in verbose.splitlines():
        fields = line.split(",")
        if (
            len(fields) > 6
            and fields[0] in ("onednn_verbose", "dnnl_verbose")
            and "exec" in fields[1:4]
        ):
            at = fields.index("exec")
            if fields[at + 2] in ("matmul", "inner_product"):
                names.add(fields[at + 3])
    return names


def is_reference_implementation(name: str) -> bool:
    """oneDNN's scalar reference kernels are named ``ref...`` (``ref_int8:any``,
    ``ref:any``)."""
    return name.startswith("ref")
