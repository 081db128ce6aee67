"""CPU-side choices made at start-up: the --compile auto policy and glibc malloc tuning."""

from __future__ import annotations

import platform

import pytest
import torch

from rerankd.engine import packed_engine
from rerankd.engine.malloc import keep_freed_memory
from rerankd.engine.packed_engine import PackedEngine
from rerankd.ops import cpu

CPU = torch.device("cpu")


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


def _engine_stub() -> PackedEngine:
    """An engine object with only what `_wants_compile` reads (no model to load)."""
    engine = object.__new__(PackedEngine)
    engine.model = type("Decoder", (), {"set_kernels": lambda self, k: None})()
    return engine


@pytest.mark.parametrize(
    "amx, device, dtype, expected",
    [
        (True, CPU, torch.bfloat16, True),  # measured ~40% faster served
        (False, CPU, torch.bfloat16, False),  # measured slower on an EPYC without AMX
        (True, CPU, torch.float32, False),
        (True, torch.device("cuda"), torch.bfloat16, False),  # unmeasured
    ],
)
def test_compile_auto_is_on_only_where_it_was_measured_faster(
    monkeypatch, amx, device, dtype, expected
):
    monkeypatch.setattr(packed_engine, "cpu_has_amx", lambda: amx)
    engine = _engine_stub()
    assert engine._wants_compile("auto", device, dtype) is expected
    assert engine._wants_compile("on", device, dtype) is True
    assert engine._wants_compile("off", device, dtype) is False
    with pytest.raises(ValueError, match="--compile"):
        engine._wants_compile("sometimes", device, dtype)


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_auto_is_on_for_int8_linears_on_any_cpu(monkeypatch, amx, dtype):
    # their input quantization only pays off fused (20-90 ms per eager call measured)
    monkeypatch.setattr(packed_engine, "cpu_has_amx", lambda: amx)
    engine = _engine_stub()
    assert engine._wants_compile("auto", CPU, dtype, quantized=True) is True
    assert engine._wants_compile("auto", torch.device("cuda"), dtype, quantized=True) is False
    assert engine._wants_compile("off", CPU, dtype, quantized=True) is False


def test_models_without_compilable_kernels_never_compile(monkeypatch):
    monkeypatch.setattr(packed_engine, "cpu_has_amx", lambda: True)
    engine = _engine_stub()
    engine.model = object()  # an encoder: no set_kernels
    assert engine._wants_compile("on", CPU, torch.bfloat16) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_malloc_tuning_is_accepted_by_glibc():
    assert keep_freed_memory() is True
    # with the tuned allocator the process still allocates, frees and computes normally
    chunks = [torch.empty(8 * 1024 * 1024, dtype=torch.uint8) for _ in range(4)]
    del chunks
    assert torch.ones(1024).sum().item() == 1024
