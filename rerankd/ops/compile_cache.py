"""Inductor's on-disk compile cache, keyed by the CPU vector ISA it generated code for.

Why (a torch bug, worked around here): Inductor caches a compiled graph (its FX graph and
AOTAutograd caches, under `TORCHINDUCTOR_CACHE_DIR`, by default one /tmp directory for every
process of the user) as Python source that holds the C++ kernels, their loops tiled for the
vector ISA of the process that generated them: 8 float lanes for AVX2, 16 for AVX512. The
cache key leaves the ISA out (torch 2.13 keys the thread count, not the ISA), and a process
that loads an entry compiles that C++ with its *own* ISA flags. So processes of different
ISAs sharing the cache (rerankd's emulated CPU classes set `ATEN_CPU_CAPABILITY`;
benchmarks/bench_compile.py runs each class in turn; machines sharing a home directory)
get kernels whose tiling and vector width disagree:

- AVX2 code compiled for AVX512 loads and stores 16 lanes where it steps by 8, so each
  row's last vector writes past its buffer: glibc aborts ("double free or corruption",
  "corrupted size vs. prev_size"), seen with the compiled float32 BERT encoder;
- AVX512 code compiled for AVX2 writes 8 of every 16 lanes and leaves the rest
  uninitialised: garbage or NaN scores, seen with the compiled float32 Qwen3 decoder under
  the emulated AVX2 class.

`torch.compiler.config.cache_key_tag` is part of both caches' keys; adding the ISA Inductor
picks (`pick_vec_isa`, which honours `ATEN_CPU_CAPABILITY`) gives each ISA its own entries.
"""

from __future__ import annotations

import torch

#: the part of `cache_key_tag` this module owns (a user's own tag is kept beside it)
TAG_PREFIX = "rerankd-cpu-isa="
_SEPARATOR = ";"


def cpu_isa_tag() -> str:
    """This process's Inductor vector ISA as a cache-key tag, e.g.
    ``rerankd-cpu-isa=avx512 avx512_vnni amx_tile/512`` (``INVALID_VEC_ISA/0``: scalar)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return f"{TAG_PREFIX}{isa}/{isa.bit_width() if isa else 0}"


def key_compile_cache_by_cpu_isa() -> str:
    """Make Inductor's cache keys name this process's vector ISA (call before compiling;
    idempotent, and it follows a changed ISA); returns the whole tag now in use."""
    config = torch.compiler.config
    kept = [
        part
        for part in config.cache_key_tag.split(_SEPARATOR)
        if part and not part.startswith(TAG_PREFIX)
    ]
    config.cache_key_tag = _SEPARATOR.join([*kept, cpu_isa_tag()])
    return config.cache_key_tag
