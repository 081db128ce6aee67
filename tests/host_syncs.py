"""Host syncs, recorded on CPU: the calls that would make the host wait for a CUDA device.

A CUDA forward should queue kernels and return; each host sync inside it stalls the engine
thread until the device catches up (and, per layer, empties the device's queue 28 times a
batch). No CPU run can time that, but the calls that cause it are visible on CPU too:

- a tensor's value read into Python: `aten._local_scalar_dense` (`.item()`, `int(t)`,
  `bool(t)`, `if t:`), `tolist`, `numpy`, `cpu`;
- ops whose output size depends on the data, so the host must read it: `nonzero`,
  `masked_select`, `unique`, indexing with a boolean mask, `repeat_interleave` without
  `output_size`, `equal`;
- host data sent to the device other than through `rerankd.ops.batch.upload` (page-locked,
  non-blocking): `torch.tensor(list)` and `.to(device)`, on CUDA a copy from pageable
  memory, which waits for the stream. A 0-dim `torch.tensor(x)` is not counted: CUDA
  kernels take a CPU scalar by value.

`HostSyncs` records them in a block (a dispatch mode for the aten ops, a function mode for
the Python-level reads and copies, which never reach the dispatcher on CPU). `opaque` hides
a kernel's insides: flex_attention's eager CPU fallback (one compiled kernel on CUDA) and
stand-ins for CUDA-only kernels. `tests.fixtures.modernbert.random_modernbert` is the model both checks run.
tests/gpu/test_host_syncs_cuda.py checks the same paths on
a device with `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import torch
from torch.overrides import TorchFunctionMode, _pop_mode_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from rerankd.ops import batch as batch_module

aten = torch.ops.aten
#: where frames are not the caller's: torch itself and the standard library (contextlib)
_LIBRARIES = (os.path.dirname(torch.__file__), os.path.dirname(contextlib.__file__))

#: ops that read a value into Python or size their output by the data
_DATA_DEPENDENT = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
#: ops that take index tensors: a boolean one is a `nonzero` inside
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
#: with inference mode on, the Tensor-method overload is what the dispatcher sees
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
#: Python-level reads of a tensor's data (on CPU they never reach the dispatcher)
_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}


@dataclass(frozen=True)
class Sync:
    """One recorded host sync: what it was and the line of rerankd that made it."""

    kind: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}"


def _in_uploader(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside `rerankd.ops.batch.upload` (the pinned one-copy path)."""
    code = batch_module.upload.__code__
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _caller() -> str:
    """The innermost frame in rerankd, or else the innermost outside this file, torch and
    the standard library: the line that made the sync."""
    frames = [
        f
        for f in traceback.extract_stack()
        if f.filename != __file__ and not f.filename.startswith(_LIBRARIES)
    ]
    ours = [f for f in frames if f"{os.sep}rerankd{os.sep}" in f.filename] or frames
    frame = ours[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"


def _moves_to_a_device(args: tuple, kwargs: dict) -> bool:
    """`Tensor.to(...)`/`.cuda(...)` given a device (not only a dtype)."""
    return "device" in kwargs or any(
        isinstance(a, torch.device | str | torch.Tensor) for a in args[1:]
    )


class _Ops(TorchDispatchMode):
    supports_higher_order_operators = True  # passed through: a kernel, as on CUDA

    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT:
            self.record(str(func))
        elif func in _INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            self.record(f"{func} with a boolean mask")
        elif func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
            self.record(f"{func} without output_size")
        elif (
            func is aten.lift_fresh.default
            and args[0].dim() > 0
            and not _in_uploader(sys._getframe())
        ):
            self.record("torch.tensor(host data) outside batch.upload")
        return func(*args, **kwargs)


class _Calls(TorchFunctionMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self.record(f"Tensor.{func.__name__}")
        elif (
            func in _MOVES
            and _moves_to_a_device(args, kwargs)
            and not _in_uploader(sys._getframe())
        ):
            self.record(f"Tensor.{func.__name__}(device) outside batch.upload")
        return func(*args, **kwargs)


class HostSyncs:
    """`with HostSyncs() as syncs: ...` records every host sync of the block in
    `syncs.found` (see the module docstring for what counts)."""

    def __init__(self) -> None:
        self.found: list[Sync] = []
        self._modes = contextlib.ExitStack()

    def _record(self, kind: str) -> None:
        self.found.append(Sync(kind, _caller()))

    def __enter__(self) -> HostSyncs:
        self._modes.enter_context(_Ops(self._record))
        self._modes.enter_context(_Calls(self._record))
        return self

    def __exit__(self, *exc) -> None:
        self._modes.close()

    def report(self) -> str:
        """Each kind of sync at each place, with how many times it happened."""
        counts = collections.Counter(map(str, self.found))
        return "\n".join(f"{n} x {sync}" for sync, n in counts.items()) or "none"


def opaque(kernel: Callable) -> Callable:
    """`kernel` run with no recording: one device kernel, whatever its CPU stand-in does
    inside (flex_attention's eager path even refuses to run under a dispatch mode)."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            if torch._C._len_torch_function_stack():
                stack.enter_context(_pop_mode_temporarily())
            stack.enter_context(_disable_current_modes())
            return kernel(*args, **kwargs)

    return run
