"""The kernels a packed model runs: one value, chosen by the engine at start-up.

"Kernel" in rerankd means an implementation the engine picks for this device and dtype:
the attention kernel (SDPA, varlen flash attention, rerankd's AMX or AVX512-BF16 kernel: a
key of `ops.attention.ATTENTION`) and whether the per-token work around it (norms,
projections, RoPE, MLP, residuals) runs eager or `torch.compile`d. The engine hands a model
the whole choice through its one `set_kernels`, after checking each candidate against SDPA
and eager on a probe batch (engine/packed_engine.py); the model resolves it to functions.

Every packed model is a `KernelModel`: `set_kernels`, and a class attribute `compiles` that
says whether it has compiled per-token functions at all. The engine asks for
`Kernels(compiled=True)` only where `compiles` is True; a model without them refuses that
choice (ValueError, `refuse_unless`), as it refuses an attention kernel it cannot run.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar, Protocol

from rerankd.ops.attention import ATTENTION


@dataclass(frozen=True)
class Kernels:
    #: the attention kernel: a key of `ops.attention.ATTENTION`
    attention: str = "sdpa"
    #: per-token work compiled (one graph per function, oneDNN GEMMs as custom ops) or eager
    compiled: bool = False


class KernelModel(Protocol):
    """What a packed model offers its engine: the one way it is given kernels."""

    #: whether the model has compiled per-token functions (`Kernels.compiled` may be True)
    compiles: ClassVar[bool]

    def set_kernels(self, kernels: Kernels) -> None:
        """Run `kernels` from the next forward on; ValueError (nothing changed) for a
        choice the model cannot run."""


def refuse_unless(
    model: KernelModel, kernels: Kernels, attention: Collection[str] | None = None
) -> None:
    """ValueError, before a model changes anything, for `kernels` it cannot run: compiled
    per-token work on a model that has none, or an attention kernel not in `attention`
    (default: every kernel of `ops.attention.ATTENTION`, read at the call)."""
    name = type(model).__name__
    if kernels.compiled and not model.compiles:
        raise ValueError(f"{name} has no compiled per-token functions; it runs eager only")
    attention = ATTENTION if attention is None else attention
    if kernels.attention not in attention:
        raise ValueError(
            f"{name} runs attention {', '.join(sorted(attention))}; not {kernels.attention!r}"
        )
