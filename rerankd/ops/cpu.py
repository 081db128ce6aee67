"""What this CPU can do, as rerankd's own choices read it (AMX kernel, bf16 by default,
`--compile auto`, the int8 path): /proc/cpuinfo's flags, or an override that makes a test
or benchmark choose as on another CPU class. A leaf: torch-free, imports nothing of rerankd.
"""

from __future__ import annotations

import os

#: environment variable replacing /proc/cpuinfo's flag list in `cpu_flags` (comma or space
#: separated, e.g. "avx512f avx512_bf16 avx512_vnni" for an AMD EPYC Zen 4), so that tests and
#: benchmarks run rerankd's CPU-dependent choices (AMX attention kernel, bf16 by default,
#: `--compile auto`) as on another CPU class. It only steers rerankd's own choices; cap the
#: libraries too (`CPU_CLASSES`) to emulate a class. Unset or empty: /proc/cpuinfo.
CPU_FLAGS_ENV = "RERANKD_CPU_FLAGS"

#: environment that makes a process on an AMX Xeon behave like each CPU class as far as
#: rerankd, oneDNN (`ONEDNN_MAX_CPU_ISA`), ATen (`ATEN_CPU_CAPABILITY`), MKL and fbgemm can
#: tell: an emulation of the class's instruction sets, not of its chips (caches, clocks and
#: port counts stay the Xeon's). Used by tests/test_cpu_classes.py and docs/benchmarks.md.
CPU_CLASSES: dict[str, dict[str, str]] = {
    # the machine itself (an AMX Xeon where this table was measured), even in a process
    # whose own environment overrides the flags (empty: /proc/cpuinfo)
    "amx": {CPU_FLAGS_ENV: ""},
    "zen4": {  # AMD EPYC Zen 4/5, Intel Cooper Lake: AVX512-BF16 and VNNI, no AMX
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        # MKL's own dispatch (SDPA's GEMMs) otherwise still runs AMX code on the Xeon
        "MKL_ENABLE_INSTRUCTIONS": "AVX512_E3",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1",
        CPU_FLAGS_ENV: "avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16",
    },
    "avx512-vnni": {  # Intel Cascade Lake / Ice Lake server: VNNI, no BF16
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512_E1",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1",
        CPU_FLAGS_ENV: "avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni",
    },
    "avx2": {  # AVX2-only x86 (Haswell-Skylake client, older EPYC)
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        CPU_FLAGS_ENV: "avx2 fma",
    },
}


def cpu_flags() -> set[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where it cannot be read), or those of
    `RERANKD_CPU_FLAGS` when it is set (`CPU_FLAGS_ENV`)."""
    override = os.environ.get(CPU_FLAGS_ENV, "").replace(",", " ").split()
    if override:
        return set(override)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 pays off."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx() -> bool:
    """True on CPUs with AMX bf16 tiles (Xeon Sapphire Rapids and later)."""
    return "amx_bf16" in cpu_flags()
