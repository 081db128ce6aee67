"""CPU-side choices made at start-up: CPU flags and glibc malloc tuning (the --compile auto
policy per CPU class: tests/test_compile_policy.py)."""

from __future__ import annotations

import platform

import pytest
import torch

from rerankd.engine.malloc import keep_freed_memory
from rerankd.ops import cpu


def test_cpu_flags_are_parsed_from_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_bf16 amx_tile\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= cpu.cpu_flags()
    assert cpu.cpu_supports_bf16() and cpu.cpu_has_amx()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_malloc_tuning_is_accepted_by_glibc():
    assert keep_freed_memory() is True
    # with the tuned allocator the process still allocates, frees and computes normally
    chunks = [torch.empty(8 * 1024 * 1024, dtype=torch.uint8) for _ in range(4)]
    del chunks
    assert torch.ones(1024).sum().item() == 1024
