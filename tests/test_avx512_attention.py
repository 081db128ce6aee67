"""rerankd's AVX512-BF16 attention kernel computes what per-sequence SDPA computes, and is
chosen where a CPU has AVX512-BF16 but no AMX.

The kernel runs on any CPU with AVX512-BF16, AMX Xeons included (the CI machine), so these
tests call it directly there; the choice between kernels is tested with `RERANKD_CPU_FLAGS`
set to each CPU class's flags (`rerankd.ops.cpu.CPU_CLASSES`). Elsewhere the kernel tests are
skipped and SDPA runs, which `test_other_dtypes_and_head_sizes_use_sdpa` checks.
"""

from __future__ import annotations

import logging

import pytest
import torch

from rerankd.ops import amx_kernel, avx512_kernel
from rerankd.ops.attention import avx512_attention, cpu_backends, describe, sdpa_attention
from rerankd.ops.cpu import CPU_CLASSES, CPU_FLAGS_ENV
from tests.test_amx_attention import _batch, _float32_reference, _tensors

needs_kernel = pytest.mark.skipif(
    avx512_kernel.load_kernel() is None,
    reason="AVX512-BF16 attention kernel needs a CPU with AVX512-BF16 and a C++ compiler",
)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    # (32, 2, 128): 16 heads per kv head, 4 queries per task; (8, 4, 256): Gemma's head dim
    [
        (16, 8, 128),
        (8, 2, 64),
        (4, 2, 16),
        (4, 1, 16),
        (2, 2, 32),
        (3, 3, 64),
        (4, 4, 128),
        (32, 2, 128),
        (8, 4, 256),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("prefix_len", [40, 9])
def test_kernel_matches_float32_sdpa(heads, kv_heads, dim, causal, prefix_len):
    """Prefixed sequences of awkward lengths (1, block edges, several key and query blocks)
    in two groups, even and odd prefixes: the kernel is as close to float32 as bf16 SDPA is
    (its only rounding is bf16's), the bound of the AMX kernel's test."""
    batch = _batch(
        [1, 31, 32, 33, 64, 65, 130, 7], prefix_len=prefix_len, groups=[0, 0, 0, 1, 1, 1, 1, 0]
    )
    assert len(batch.prefixes) == 2
    q, k, v = _tensors(len(batch.input_ids), heads, kv_heads, dim, seed=dim)
    _, pk, pv = _tensors(sum(batch.prefix_lengths), heads, kv_heads, dim, seed=dim + 1)
    scale = dim**-0.5
    reference = _float32_reference(q, k, v, batch, (pk, pv), causal, scale)
    bf16_sdpa = sdpa_attention(q, k, v, batch, (pk, pv), causal, scale)
    got = avx512_attention(q, k, v, batch, (pk, pv), causal, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    sdpa_error = (bf16_sdpa.float() - reference).abs().max().item()
    error = (got.float() - reference).abs().max().item()
    assert error <= max(2 * sdpa_error, 1e-2), (error, sdpa_error)


@needs_kernel
def test_online_softmax_over_peaked_rows():
    """Scores far apart (a large scale): the running max moves between key blocks by more
    than exp's range, so a block's rescaling must drop what came before it exactly."""
    batch = _batch([200, 70], prefix_len=130)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 64, seed=5)
    _, pk, pv = _tensors(130, 4, 2, 64, seed=6)
    for causal in (True, False):
        reference = _float32_reference(q, k, v, batch, (pk, pv), causal, 3.0)
        bf16_sdpa = sdpa_attention(q, k, v, batch, (pk, pv), causal, 3.0)
        got = avx512_attention(q, k, v, batch, (pk, pv), causal, 3.0)
        assert torch.isfinite(got.float()).all()
        sdpa_error = (bf16_sdpa.float() - reference).abs().max().item()
        assert (got.float() - reference).abs().max().item() <= max(2 * sdpa_error, 1e-2)


@needs_kernel
def test_a_nan_key_poisons_its_own_sequence_only():
    """As the AMX kernel: a NaN reaching attention stays NaN where it is attended to (the
    clamp in the kernel's exp keeps NaN) and nowhere else."""
    batch = _batch([20, 30], prefix_len=0)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 16, seed=23)
    k[25, 1, 3] = float("nan")
    got = avx512_attention(q, k, v, batch, None, False, 0.25)
    assert torch.isfinite(got[:20]).all()
    assert got[20:, 2:].isnan().any(dim=-1).all()
    assert torch.isfinite(got[20:, :2]).all()


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_without_prefix_and_into_strided_views(causal):
    """No prefix (encoders, the prefix stream itself), q/k/v as views of one fused projection
    (row stride 3·H·D, as the encoder's unbind gives), output into a slice of a buffer."""
    lengths = [5, 70, 1, 200]
    batch = _batch(lengths, prefix_len=0)
    rows, heads, dim = sum(lengths), 4, 32
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(rows, 3, heads, dim, generator=g).to(torch.bfloat16)
    q, k, v = fused.unbind(dim=1)
    reference = _float32_reference(q, k, v, batch, None, causal, 0.2)
    buffer = torch.zeros(rows + 10, heads, dim, dtype=torch.bfloat16)
    got = avx512_attention(q, k, v, batch, None, causal, 0.2, out=buffer[10:])
    assert got.data_ptr() == buffer[10:].data_ptr()
    assert (got.float() - reference).abs().max().item() < 2e-2
    assert not buffer[:10].any()  # nothing written outside `out`


@needs_kernel
def test_key_rows_an_odd_number_of_elements_apart():
    """Keys are packed as pairs of bf16 straight from their rows: rows an odd number of
    elements apart are copied first by the wrapper, and refused by the kernel itself."""
    batch = _batch([33, 70], prefix_len=9)
    rows, heads, dim = len(batch.input_ids), 4, 16
    q, _, v = _tensors(rows, heads, 2, dim, seed=11)
    _, pk, pv = _tensors(9, heads, 2, dim, seed=12)
    g = torch.Generator().manual_seed(13)
    wide = torch.randn(rows, 2 * dim + 1, generator=g).to(torch.bfloat16)
    k = wide[:, : 2 * dim].unflatten(1, (2, dim))  # row stride 33
    assert k.stride(0) % 2 == 1
    reference = _float32_reference(q, k, v, batch, (pk, pv), True, 0.25)
    got = avx512_attention(q, k, v, batch, (pk, pv), True, 0.25)
    assert (got.float() - reference).abs().max().item() < 2e-2
    table = amx_kernel.sequence_table(batch, with_prefix=True)
    with pytest.raises(RuntimeError, match="even number"):
        avx512_kernel.load_kernel().attention(
            q, k, v, pk, pv, table, True, 0.25, torch.empty_like(q)
        )


@needs_kernel
def test_kernel_is_deterministic_and_batch_independent():
    """A sequence's output does not depend on what else is in the batch, nor on threads."""
    batch = _batch([50, 90, 17], prefix_len=20)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 16, seed=7)
    _, pk, pv = _tensors(20, 4, 2, 16, seed=8)
    first = avx512_attention(q, k, v, batch, (pk, pv), True, 0.25)
    again = avx512_attention(q, k, v, batch, (pk, pv), True, 0.25)
    assert torch.equal(first, again)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(avx512_attention(q, k, v, batch, (pk, pv), True, 0.25), first)
    finally:
        torch.set_num_threads(threads)
    other = _batch([90, 17], prefix_len=20)  # the same sequences without the first
    rows = slice(50, 157)
    assert other.starts == [0, 90] and other.prefix_lengths == [20]
    fewer = avx512_attention(q[rows], k[rows], v[rows], other, (pk, pv), True, 0.25)
    assert torch.equal(fewer, first[rows])


@needs_kernel
def test_kernel_rejects_a_table_outside_its_tensors():
    """A layout that does not fit the tensors is an error, never a read past their end."""
    batch = _batch([50, 90], prefix_len=20)
    q, k, v = _tensors(len(batch.input_ids) - 1, 4, 2, 16, seed=7)
    _, pk, pv = _tensors(20, 4, 2, 16, seed=8)
    with pytest.raises(RuntimeError, match="outside"):
        avx512_attention(q, k, v, batch, (pk, pv), True, 0.25)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 16, seed=7)
    with pytest.raises(RuntimeError, match="outside"):
        avx512_attention(q, k, v, batch, (pk[:10], pv[:10]), True, 0.25)


def test_other_dtypes_and_head_sizes_use_sdpa(monkeypatch):
    """float32, head sizes the kernel does not take and a missing kernel go to SDPA."""
    batch = _batch([3, 9], prefix_len=12)
    q, k, v = _tensors(12, 2, 1, 8, seed=1, dtype=torch.float32)
    _, pk, pv = _tensors(12, 2, 1, 8, seed=2, dtype=torch.float32)
    expected = sdpa_attention(q, k, v, batch, (pk, pv), True, 0.3)
    assert torch.equal(avx512_attention(q, k, v, batch, (pk, pv), True, 0.3), expected)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))  # head dim 8
    assert torch.equal(
        avx512_attention(qb, kb, vb, batch, None, False, 0.3),
        sdpa_attention(qb, kb, vb, batch, None, False, 0.3),
    )
    monkeypatch.setattr(avx512_kernel, "load_kernel", lambda: None)
    q, k, v = _tensors(12, 2, 1, 16, seed=1)
    assert torch.equal(
        avx512_attention(q, k, v, batch, None, True, 0.3),
        sdpa_attention(q, k, v, batch, None, True, 0.3),
    )


# --- which kernel a CPU class gets ----------------------------------------------------------


_LOADERS = (amx_kernel.load_kernel, avx512_kernel.load_kernel)


@pytest.fixture
def cpu_class(monkeypatch):
    """Sets `RERANKD_CPU_FLAGS` to a class's flags (None: this machine's), with the kernel
    loaders' caches cleared before and after."""

    def emulate(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(CPU_FLAGS_ENV, raising=False)
        else:
            monkeypatch.setenv(CPU_FLAGS_ENV, CPU_CLASSES[name][CPU_FLAGS_ENV])
        for load in _LOADERS:
            load.cache_clear()

    yield emulate
    for load in _LOADERS:  # the cached loaders, even where a test replaced them
        load.cache_clear()


@needs_kernel
def test_a_zen4_gets_the_avx512_kernel(cpu_class):
    """AVX512-BF16 without AMX (Zen 4/5, Cooper Lake): the AVX512-BF16 kernel, and no AMX."""
    cpu_class("zen4")
    assert amx_kernel.load_kernel() is None
    assert list(cpu_backends()) == ["avx512"]
    assert describe("avx512") == "avx512 (rerankd AVX512-BF16)"


@pytest.mark.skipif(amx_kernel.load_kernel() is None, reason="needs a CPU with AMX-BF16")
def test_amx_comes_first_and_avx512_is_built_only_behind_it(cpu_class, monkeypatch):
    """On an AMX Xeon the AMX kernel is probed first; the AVX512-BF16 one is loaded only if
    the engine asks for the next kernel (the AMX one refused or missing)."""
    cpu_class(None)
    loaded = []
    real = avx512_kernel.load_kernel
    monkeypatch.setattr(avx512_kernel, "load_kernel", lambda: loaded.append(1) or real())
    backends = cpu_backends()
    assert next(backends) == "amx" and not loaded
    assert next(backends, None) == ("avx512" if real() is not None else None) and loaded


@pytest.mark.parametrize("name", ["avx512-vnni", "avx2"])
def test_cpus_without_avx512_bf16_keep_sdpa_and_say_why(cpu_class, monkeypatch, caplog, name):
    """No kernel, no build attempted, and a WARNING naming the missing flag."""
    cpu_class(name)
    monkeypatch.setattr(avx512_kernel, "build_kernel", lambda *a: pytest.fail("build attempted"))
    assert avx512_kernel.load_kernel() is None
    with caplog.at_level(logging.WARNING, logger="rerankd.ops.attention"):
        assert list(cpu_backends()) == []
    assert "lacks avx512_bf16" in caplog.text and "no amx_bf16" in caplog.text


def test_a_failed_build_keeps_sdpa_and_says_why(cpu_class, monkeypatch, caplog):
    """A Zen 4 whose build fails (no compiler): no kernel, and WARNINGs naming why."""
    cpu_class("zen4")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with caplog.at_level(logging.WARNING):
        assert list(cpu_backends()) == []
    assert "AVX512-BF16 attention kernel could not be built" in caplog.text
    assert "c++: not found" in caplog.text
    assert "AVX512-BF16: unavailable" in caplog.text
