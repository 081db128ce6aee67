"""rerankd's AMX attention kernel computes what per-sequence SDPA computes.

The kernel only exists on CPUs with AMX-BF16 (the CI machine has it); elsewhere these tests
are skipped and the engine keeps SDPA, which `test_engine_falls_back_without_kernel` checks.
"""

from __future__ import annotations

import random

import pytest
import torch

from rerankd.ops import amx_kernel
from rerankd.ops.attention import amx_attention, sdpa_attention
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair

needs_kernel = pytest.mark.skipif(
    amx_kernel.load_kernel() is None, reason="AMX attention kernel needs a CPU with AMX-BF16"
)


def _batch(lengths, prefix_len, groups=None, seed=0):
    """Pairs with a shared prefix of `prefix_len` tokens (per group) and own tails."""
    rng = random.Random(seed)
    groups = groups or [0] * len(lengths)
    prefixes = {g: tuple(rng.randrange(100, 200) for _ in range(prefix_len)) for g in set(groups)}
    pairs = [
        EncodedPair(prefixes[g] + tuple(rng.randrange(200, 300) for _ in range(n)))
        for g, n in zip(groups, lengths, strict=True)
    ]
    return pack(pairs, groups, torch.device("cpu"))


def _tensors(rows, heads, kv_heads, dim, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, heads, dim, generator=g).to(dtype),
        torch.randn(rows, kv_heads, dim, generator=g).to(dtype),
        torch.randn(rows, kv_heads, dim, generator=g).to(dtype),
    )


def _float32_reference(q, k, v, batch, prefix_kv, causal, scale):
    prefix = None if prefix_kv is None else tuple(t.float() for t in prefix_kv)
    return sdpa_attention(q.float(), k.float(), v.float(), batch, prefix, causal, scale)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(16, 8, 128), (4, 2, 16), (4, 1, 16), (2, 2, 32), (3, 3, 64)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_float32_sdpa(heads, kv_heads, dim, causal):
    """Prefixed sequences of awkward lengths (1, panel edges, > one panel) in two groups:
    the kernel is as close to float32 as bf16 SDPA is (its only rounding is bf16's)."""
    batch = _batch([1, 31, 32, 33, 64, 65, 130, 7], prefix_len=40, groups=[0, 0, 0, 1, 1, 1, 1, 0])
    assert len(batch.prefixes) == 2
    q, k, v = _tensors(len(batch.input_ids), heads, kv_heads, dim, seed=dim)
    _, pk, pv = _tensors(sum(batch.prefix_lengths), heads, kv_heads, dim, seed=dim + 1)
    scale = dim**-0.5
    reference = _float32_reference(q, k, v, batch, (pk, pv), causal, scale)
    bf16_sdpa = sdpa_attention(q, k, v, batch, (pk, pv), causal, scale)
    got = amx_attention(q, k, v, batch, (pk, pv), causal, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    sdpa_error = (bf16_sdpa.float() - reference).abs().max().item()
    error = (got.float() - reference).abs().max().item()
    assert error <= max(2 * sdpa_error, 1e-2), (error, sdpa_error)


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
    got = amx_attention(q, k, v, batch, None, causal, 0.2, out=buffer[10:])
    assert got.data_ptr() == buffer[10:].data_ptr()
    assert (got.float() - reference).abs().max().item() < 2e-2
    assert not buffer[:10].any()  # nothing written outside `out`


@needs_kernel
def test_key_rows_an_odd_number_of_elements_apart():
    """The kernel packs keys as pairs of bf16 straight from their rows: rows an odd number of
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
    got = amx_attention(q, k, v, batch, (pk, pv), True, 0.25)
    assert (got.float() - reference).abs().max().item() < 2e-2
    table = amx_kernel.sequence_table(batch, with_prefix=True)
    with pytest.raises(RuntimeError, match="even number"):
        amx_kernel.load_kernel().attention(q, k, v, pk, pv, table, True, 0.25, torch.empty_like(q))


@needs_kernel
def test_softmax_over_scores_hundreds_apart_matches_float32():
    """Scores spread over hundreds (exponents far below float's range, the kernel's own exp
    clamps them) still give float32 SDPA's attention within bf16 rounding."""
    batch = _batch([40, 130, 3], prefix_len=24)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 32, seed=21)
    _, pk, pv = _tensors(24, 4, 2, 32, seed=22)
    q = (q.float() * 40).to(torch.bfloat16)  # scores of ±hundreds
    reference = _float32_reference(q, k, v, batch, (pk, pv), True, 32**-0.5)
    got = amx_attention(q, k, v, batch, (pk, pv), True, 32**-0.5)
    assert torch.isfinite(got).all()
    assert (got.float() - reference).abs().max().item() < 2e-2


@needs_kernel
def test_a_nan_key_poisons_its_own_sequence_only():
    """A NaN reaching attention stays NaN in the sequences that attend to it (the engine
    refuses NaN scores rather than serve them) and nowhere else."""
    batch = _batch([20, 30], prefix_len=0)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 16, seed=23)
    k[25, 1, 3] = float("nan")  # second sequence, its 6th token, kv head 1
    got = amx_attention(q, k, v, batch, None, False, 0.25)
    assert torch.isfinite(got[:20]).all()
    assert got[20:, 2:].isnan().any(dim=-1).all()  # query heads 2, 3 share kv head 1
    assert torch.isfinite(got[20:, :2]).all()


@needs_kernel
def test_kernel_is_deterministic_and_batch_independent():
    """A sequence's output does not depend on what else is in the batch."""
    batch = _batch([50, 90, 17], prefix_len=20)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 16, seed=7)
    _, pk, pv = _tensors(20, 4, 2, 16, seed=8)
    first = amx_attention(q, k, v, batch, (pk, pv), True, 0.25)
    again = amx_attention(q, k, v, batch, (pk, pv), True, 0.25)
    assert torch.equal(first, again)
    other = _batch([90, 17], prefix_len=20)  # the same sequences without the first
    rows = slice(50, 157)
    assert other.starts == [0, 90] and other.prefix_lengths == [20]
    fewer = amx_attention(q[rows], k[rows], v[rows], other, (pk, pv), True, 0.25)
    assert torch.equal(fewer, first[rows])


@needs_kernel
def test_kernel_rejects_a_table_outside_its_tensors():
    """A layout that does not fit the tensors is an error, never a read past their end."""
    batch = _batch([50, 90], prefix_len=20)
    q, k, v = _tensors(len(batch.input_ids) - 1, 4, 2, 16, seed=7)
    _, pk, pv = _tensors(20, 4, 2, 16, seed=8)
    with pytest.raises(RuntimeError, match="outside"):
        amx_attention(q, k, v, batch, (pk, pv), True, 0.25)
    q, k, v = _tensors(len(batch.input_ids), 4, 2, 16, seed=7)
    with pytest.raises(RuntimeError, match="outside"):
        amx_attention(q, k, v, batch, (pk[:10], pv[:10]), True, 0.25)


def test_other_dtypes_and_head_sizes_use_sdpa(monkeypatch):
    """float32 (and head sizes the kernel does not take) go to SDPA, whatever the CPU."""
    batch = _batch([3, 9], prefix_len=12)
    q, k, v = _tensors(12, 2, 1, 8, seed=1, dtype=torch.float32)
    _, pk, pv = _tensors(12, 2, 1, 8, seed=2, dtype=torch.float32)
    expected = sdpa_attention(q, k, v, batch, (pk, pv), True, 0.3)
    assert torch.equal(amx_attention(q, k, v, batch, (pk, pv), True, 0.3), expected)
    monkeypatch.setattr("rerankd.ops.attention.load_kernel", lambda: None)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    assert torch.equal(
        amx_attention(qb, kb, vb, batch, None, False, 0.3),
        sdpa_attention(qb, kb, vb, batch, None, False, 0.3),
    )


@pytest.mark.parametrize("flags", [set(), {"amx_bf16"}, {"avx512_bf16"}])
def test_kernel_needs_both_amx_and_avx512_bf16(monkeypatch, flags):
    """The kernel is built for AMX-BF16 and AVX512-BF16; a CPU lacking either gets None
    (the engine then keeps SDPA) without a build being attempted."""
    monkeypatch.setattr(amx_kernel, "cpu_flags", lambda: flags)
    monkeypatch.setattr(amx_kernel, "cpu_has_amx", lambda: "amx_bf16" in flags)
    monkeypatch.setattr(amx_kernel, "build_directory", lambda: pytest.fail("build attempted"))
    amx_kernel.load_kernel.cache_clear()
    try:
        assert amx_kernel.load_kernel() is None
    finally:
        amx_kernel.load_kernel.cache_clear()


def test_an_edited_header_gets_a_fresh_build_directory(tmp_path, monkeypatch):
    """The kernels include headers beside them (softmax_exp.h): editing one must build
    anew, never load the binary built from the old header."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    source = tmp_path / "kernel.cpp"
    source.write_text('#include "helper.h"\n')
    header = tmp_path / "helper.h"
    header.write_text("inline int f() { return 1; }\n")
    first = amx_kernel.build_directory(source, "k")
    assert amx_kernel.build_directory(source, "k") == first
    header.write_text("inline int f() { return 2; }\n")
    assert amx_kernel.build_directory(source, "k") != first
