"""`rerankd serve` and `rerankd rerank` run on tcmalloc where the system has it.

A reranking server allocates the same large activations batch after batch. glibc malloc
serves a large aligned block (torch's tensors) from a fresh `mmap`, or cannot reuse a freed
one of the same size, so every batch page-faults its activations in again, zeroed by the
kernel. tcmalloc keeps and reuses them. Measured on the 2-core AMX Xeon (docs/benchmarks.md,
"Memory allocator"), 24 requests of 1-32 documents in one process, glibc tuned by
`engine/malloc.py` against `LD_PRELOAD` tcmalloc: the Qwen3-0.6B shape 7.44-7.72 -> 7.74-7.87
docs/s with peak RSS 3.6 -> 2.7 GB; a Qwen3-4B-shaped model (6 layers) 6.17 -> 6.91 docs/s
(150,000-230,000 page faults per 16-document request before) with peak RSS 4.6 -> 4.1 GB.
jemalloc (5.3, default settings) was slower than glibc there (5.34 docs/s on the 4B shape;
likely its decay handing freed memory back to the OS, not measured).

An allocator can only be chosen before the process starts, so the command re-executes itself once
with tcmalloc in `LD_PRELOAD` when the library is installed (Debian/Ubuntu:
`libtcmalloc-minimal4`; the Docker image has it) and no other allocator is preloaded.
`RERANKD_ALLOCATOR=system` keeps the C library's malloc.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: auto (default: tcmalloc where installed) or system (the C library's malloc)
ALLOCATOR_ENV = "RERANKD_ALLOCATOR"
#: set in the re-executed process, so that it never re-executes again
_PRELOADED_ENV = "RERANKD_ALLOCATOR_PRELOADED"
#: allocators a user may have preloaded already: then nothing is changed
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")
_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRECTORIES = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_tcmalloc(directories: Sequence[str] = _DIRECTORIES) -> str | None:
    """The path of an installed tcmalloc shared library, or None."""
    for directory in directories:
        for name in _LIBRARIES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def preload_plan(
    env: Mapping[str, str], find: Callable[[], str | None] = find_tcmalloc
) -> str | None:
    """The `LD_PRELOAD` to re-execute the command with, or None to keep this process as it is.
    A `RERANKD_ALLOCATOR` other than auto or system is a ValueError."""
    choice = env.get(ALLOCATOR_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "system"):
        raise ValueError(f"{ALLOCATOR_ENV}={env[ALLOCATOR_ENV]!r}: use auto or system")
    preloaded = env.get("LD_PRELOAD", "")
    if choice == "system" or env.get(_PRELOADED_ENV) or any(k in preloaded for k in _KNOWN):
        return None
    library = find() if sys.platform.startswith("linux") else None
    if library is None:
        return None
    return f"{library} {preloaded}".strip()


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded, where
    `preload_plan` says so (the process id stays the same); return if not, or if the
    exec fails. Only for the `rerankd` command itself: it re-runs `sys.orig_argv`."""
    plan = preload_plan(os.environ)
    if plan is None:
        return
    env = {**os.environ, "LD_PRELOAD": plan, _PRELOADED_ENV: "1"}
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # keep going on the C library's malloc
        return


def allocator_in_use(maps: str = "/proc/self/maps") -> str:
    """tcmalloc, jemalloc or mimalloc when one is mapped into this process, else "system"
    (also where /proc cannot be read)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "system"
    return next((name for name in _KNOWN if name in text), "system")
