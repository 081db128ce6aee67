"""Builds and loads rerankd's AMX attention kernel for bf16 on Intel CPUs (``csrc/amx_attention.cpp``;
the attention function that calls it is `rerankd.ops.attention.amx_attention`).

Why: PyTorch's CPU flash attention uses AMX only for fp16; for bf16 it issues small oneDNN
GEMMs per block (~0.3 TFLOP/s on the 2-core Xeon of docs/benchmarks.md) and attention was
~17-20 % of a forward. The kernel packs each sequence's keys/values once per kv head and runs
Q.Kᵀ and P.V of the query heads sharing them as AMX brgemm calls (ATen's cpublas).

It is compiled on first use with the C++ compiler PyTorch's extension builder finds (~35 s on
2 cores), into a directory named after the torch version and a hash of the source and flags
(under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): a torch upgrade or
an edited kernel builds anew instead of loading a stale binary. Without AMX-BF16, a compiler
or a working build, `load_kernel` returns None and the engine keeps SDPA; the engine also
checks the kernel against SDPA on a probe batch before using it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

from rerankd.ops.batch import PackedBatch
from rerankd.ops.cpu import cpu_flags, cpu_has_amx

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "amx_attention.cpp"
#: AVX-512 (with BF16: every AMX CPU has both) for the vector code; fbgemm's transpose is in
#: libtorch. The AVX512-BF16 kernel (`rerankd.ops.avx512_kernel`) is built with the same flags
_CFLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
    "-mfma",
    "-fopenmp",
    "-DCPU_CAPABILITY=AVX512",
    "-DCPU_CAPABILITY_AVX512",
    "-DUSE_FBGEMM",
]


#: a build lock older than this was left by a killed build (a build takes ~35 s on 2 cores);
#: torch's builder would otherwise wait on it forever
_STALE_LOCK_SECONDS = 600


def build_directory(source: Path = SOURCE, name: str = "rerankd_amx_attention") -> Path:
    """Where this torch version's build of this exact kernel source lives."""
    # the headers beside it too (softmax_exp.h): an edited header must not load a stale build
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    flags = " ".join(_CFLAGS).encode()
    digest = hashlib.sha256(source.read_bytes() + headers + flags).hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    version = torch.__version__.replace("+", "_")
    path = Path(root) / f"{name}-torch{version}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
        log.warning("removing a stale kernel build lock %s", lock)
        lock.unlink(missing_ok=True)
    return path


def build_kernel(name: str, source: Path, label: str) -> ModuleType | None:
    """Compile (or load the cached build of) one of rerankd's C++ attention kernels with the
    AVX512-BF16 flags; None, logged at WARNING with the reason, where that fails. Shared by
    this kernel and `rerankd.ops.avx512_kernel`."""
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=name,
            sources=[str(source)],
            extra_cflags=_CFLAGS,
            build_directory=str(build_directory(source, name)),
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, missing headers, read-only home, ...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        log.warning(
            "%s attention kernel could not be built (%s: %s); using SDPA attention",
            label,
            type(exc).__name__,
            first_line,
        )
        return None


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled kernel module, or None (logged once) where it cannot run here."""
    # the kernel is built with AVX512-BF16 too (every AMX CPU so far has it; checked anyway)
    if not cpu_has_amx() or "avx512_bf16" not in cpu_flags():
        return None
    started = time.perf_counter()
    module = build_kernel("rerankd_amx_attention", SOURCE, "AMX")
    if module is None:
        return None
    if not module.available():
        log.info("bf16 brgemm packing unsupported by this PyTorch build; using SDPA attention")
        return None
    log.info("AMX attention kernel ready in %.1fs", time.perf_counter() - started)
    return module


def sequence_table(batch: PackedBatch, with_prefix: bool) -> torch.Tensor:
    """(S, 4) int64: start, length, prefix start, prefix length of each sequence (cached)."""
    cache = batch.__dict__.setdefault("_amx_tables", {})
    if with_prefix not in cache:
        rows = []
        for i, (start, length) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
            span = batch.prefix_span(i) if with_prefix else None
            rows.append((start, length, *(span or (0, 0))))
        cache[with_prefix] = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
    return cache[with_prefix]
