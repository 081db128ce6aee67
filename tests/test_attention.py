"""Both attention backends compute the same thing; the varlen layout is checked on CPU
with a reference kernel that follows flash-attention's varlen semantics."""

from __future__ import annotations

import logging

import pytest
import torch

from rerankd.ops import attention
from rerankd.ops.attention import (
    ATTENTION,
    describe,
    sdpa_attention,
    varlen_attention,
    varlen_kwargs,
)
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair
from tests.loaded import loaded_fixture


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """Math version of flash-attention varlen: per sequence, causal aligned bottom-right."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        qi = q[qs:qe].transpose(0, 1).float()  # (H, Lq, D)
        ki = k[ks:ke].transpose(0, 1).float().repeat_interleave(groups, 0)
        vi = v[ks:ke].transpose(0, 1).float().repeat_interleave(groups, 0)
        scores = qi @ ki.transpose(1, 2) * scale  # (H, Lq, Lk)
        if window_size == (-1, 0):
            lq, lk = qe - qs, ke - ks
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
    return out


def _batch():
    shared = tuple(range(50, 62))
    pairs = [
        EncodedPair(shared + (1, 2, 3)),
        EncodedPair(shared + (4,)),
        EncodedPair((9, 8, 7, 6, 5)),
        EncodedPair(shared[:-2] + (3, 3, 3, 3)),
        EncodedPair(shared[:-2] + (2,)),
    ]
    return pack(pairs, [0, 0, 1, 2, 2], torch.device("cpu"))


def _qkv(tokens: int, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, heads, dim, generator=g),
        torch.randn(tokens, kv_heads, dim, generator=g),
        torch.randn(tokens, kv_heads, dim, generator=g),
    )


def test_varlen_layout_matches_sdpa_with_shared_prefixes():
    batch = _batch().with_varlen_layout()
    assert len(batch.prefixes) == 2  # groups 0 and 2 share prefixes; group 1 is alone
    q, k, v = _qkv(len(batch.input_ids))
    _, pk, pv = _qkv(sum(batch.prefix_lengths), seed=1)
    for causal in (True, False):
        expected = sdpa_attention(q, k, v, batch, (pk, pv), causal=causal, scale=0.3)
        got = varlen_attention(
            q, k, v, batch, (pk, pv), causal=causal, scale=0.3, kernel=reference_varlen_kernel
        )
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_prefix_attention_equals_attention_over_the_full_sequence():
    """Attending to [prefix K/V, own K/V] with the lower-right mask = causal attention over
    the whole sequence, read at the unshared rows."""
    batch = _batch()
    q, k, v = _qkv(len(batch.input_ids))
    _, pk, pv = _qkv(sum(batch.prefix_lengths), seed=1)
    pq, _, _ = _qkv(sum(batch.prefix_lengths), seed=2)
    got = sdpa_attention(q, k, v, batch, (pk, pv), causal=True, scale=0.3)
    for i, (start, length) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
        span = batch.prefix_span(i)
        if span is None:
            continue
        p0, plen = span
        full_q = torch.cat((pq[p0 : p0 + plen], q[start : start + length]))
        full_k = torch.cat((pk[p0 : p0 + plen], k[start : start + length]))
        full_v = torch.cat((pv[p0 : p0 + plen], v[start : start + length]))
        whole = reference_varlen_kernel(
            full_q,
            full_k,
            full_v,
            [0, len(full_q)],
            [0, len(full_k)],
            0,
            0,
            scale=0.3,
            window_size=(-1, 0),
            enable_gqa=True,
        )
        torch.testing.assert_close(got[start : start + length], whole[plen:], atol=1e-5, rtol=1e-5)


# --- the CUDA backends, checked on CPU -------------------------------------------------------


def varlen_attn_2_11(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
):
    """A stand-in with torch 2.11's `varlen_attn` signature: no `enable_gqa`, so key and
    value heads must already match the query's."""
    assert key.shape[1] == query.shape[1] == value.shape[1], "2.11 varlen_attn has no GQA"
    return reference_varlen_kernel(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        window_size=window_size,
        enable_gqa=False,
    )


def aten_flash_2_11(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale=None):
    """A stand-in for torch 2.11's `aten::_flash_attention_forward` (CUDA only there): GQA
    native, causal aligned bottom-right; returns (output, logsumexp, ...) as the op does."""
    assert dropout == 0.0 and not debug
    window = (-1, 0) if causal else (-1, -1)
    out = reference_varlen_kernel(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window, enable_gqa=True
    )
    return out, None, None, None, None


def _unshared_batch():
    pairs = [EncodedPair(tuple(range(i, i + n))) for i, n in enumerate((7, 1, 12, 3))]
    return pack(pairs, None, torch.device("cpu"))


BATCHES = {"shared-prefix": _batch, "no-prefix": _unshared_batch}
HEADS = {"gqa": (4, 2), "mha": (4, 4)}


def _inputs(make_batch, heads):
    batch = make_batch()
    q, k, v = _qkv(len(batch.input_ids), heads=heads[0], kv_heads=heads[1])
    prefix = None
    if batch.prefixes:
        _, pk, pv = _qkv(sum(batch.prefix_lengths), heads=heads[0], kv_heads=heads[1], seed=1)
        prefix = (pk, pv)
    return batch, q, k, v, prefix


def test_varlen_kwargs_follow_the_installed_signature():
    def newer(q, k, v, cq, ck, mq, mk, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        """later torch: GQA native"""

    def older(q, k, v, cq, ck, mq, mk, *, is_causal=False, scale=None):
        """torch 2.10: `is_causal`, no window"""

    def neither(q, k, v, cq, ck, mq, mk, *, scale=None):
        """no causal argument at all"""

    assert varlen_kwargs(varlen_attn_2_11, True, 0.5, gqa=True) == (
        {"scale": 0.5, "window_size": (-1, 0)},
        True,
    )
    assert varlen_kwargs(varlen_attn_2_11, False, 0.5, gqa=False) == (
        {"scale": 0.5, "window_size": (-1, -1)},
        False,
    )
    assert varlen_kwargs(newer, True, 0.5, gqa=True) == (
        {"scale": 0.5, "window_size": (-1, 0), "enable_gqa": True},
        False,
    )
    assert varlen_kwargs(older, True, 0.5, gqa=True) == ({"scale": 0.5, "is_causal": True}, True)
    with pytest.raises(TypeError, match="no causal argument"):
        varlen_kwargs(neither, True, 0.5, gqa=False)


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("make_batch", BATCHES.values(), ids=BATCHES.keys())
def test_varlen_with_the_2_11_signature_matches_sdpa(monkeypatch, make_batch, heads):
    """torch 2.11's `varlen_attn` (patched in where the code looks it up) gets expanded
    key/value heads and no `enable_gqa`; the result is per-sequence SDPA's."""
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn_2_11)
    batch, q, k, v, prefix = _inputs(make_batch, heads)
    for causal in (True, False):
        expected = sdpa_attention(q, k, v, batch, prefix, causal=causal, scale=0.3)
        got = varlen_attention(q, k, v, batch, prefix, causal=causal, scale=0.3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert describe("varlen") == "varlen_attn (KV heads expanded)"


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("make_batch", BATCHES.values(), ids=BATCHES.keys())
def test_aten_flash_with_native_gqa_matches_sdpa(monkeypatch, make_batch, heads):
    """flash_gqa hands the op the key/value heads as they are (no expanded copies) and
    writes every row of `out`."""
    monkeypatch.setattr(attention, "aten_flash_kernel", lambda: aten_flash_2_11)
    batch, q, k, v, prefix = _inputs(make_batch, heads)
    for causal in (True, False):
        expected = sdpa_attention(q, k, v, batch, prefix, causal=causal, scale=0.3)
        out = torch.full_like(q, float("nan"))
        got = ATTENTION["flash_gqa"](q, k, v, batch, prefix, causal=causal, scale=0.3, out=out)
        assert got is out
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefix_keys_adjacent_to_the_stream_are_joined_without_a_copy():
    from rerankd.ops.attention import _rows_before

    stream = torch.randn(10, 2, 4)
    prefix, rows = stream[:3], stream[3:8]
    joined = _rows_before(prefix, rows)
    assert joined is not None and joined.data_ptr() == stream.data_ptr()
    torch.testing.assert_close(joined, torch.cat((prefix, rows)), rtol=0, atol=0)
    # strided rows (v: a split of the fused projection) join the same way
    fused = torch.randn(10, 3, 2, 4)
    assert torch.equal(_rows_before(fused[:3, 2], fused[3:, 2]), fused[:, 2])
    # not adjacent, another tensor, or another layout: no view
    assert _rows_before(stream[:3], stream[4:8]) is None
    assert _rows_before(stream[:3], torch.randn(5, 2, 4)) is None
    assert _rows_before(stream[:3, :1], stream[3:8, :1].contiguous()) is None


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa_padded", "flex"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("make_batch", BATCHES.values(), ids=BATCHES.keys())
def test_cuda_fallbacks_match_sdpa(make_batch, heads, backend):
    """The fallbacks where torch lacks varlen (flex_attention uncompiled here, as on CPU)."""
    batch, q, k, v, prefix = _inputs(make_batch, heads)
    for causal in (True, False):
        expected = sdpa_attention(q, k, v, batch, prefix, causal=causal, scale=0.3)
        out = torch.full_like(q, float("nan"))  # every row must be written
        got = ATTENTION[backend](q, k, v, batch, prefix, causal=causal, scale=0.3, out=out)
        assert got is out
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_length_buckets_cover_every_sequence_once_within_bounds(monkeypatch):
    monkeypatch.setattr(attention, "PADDED_BUCKET_TOKENS", 64)
    lengths = [5, 60, 59, 3, 48, 4, 70, 49, 50, 1]
    buckets = attention.length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        top = max(lengths[i] for i in bucket)
        assert lengths[bucket[0]] == top
        assert len(bucket) == 1 or len(bucket) * top <= 64
        assert all(lengths[i] >= 0.8 * top for i in bucket)
    assert [70] in [[lengths[i] for i in b] for b in buckets]  # over budget: alone


def test_cuda_backends_fall_back_in_order_with_warnings(monkeypatch, caplog):
    import importlib.util

    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: None)
    real = importlib.util.find_spec
    missing = {"flash_attn"}
    monkeypatch.setattr(
        attention.importlib.util, "find_spec", lambda n: None if n in missing else real(n)
    )
    # torch < 2.10: no varlen_attn, but its flash varlen op (probed like every backend)
    with caplog.at_level(logging.WARNING, logger="rerankd.ops.attention"):
        assert attention.cuda_backends() == ["flash_gqa", "flex", "sdpa_padded"]
    assert "no varlen_attn; trying its flash-attention op" in caplog.text
    monkeypatch.setattr(attention, "aten_flash_kernel", lambda: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rerankd.ops.attention"):
        assert attention.cuda_backends() == ["flex", "sdpa_padded"]
    assert "no varlen_attn" in caplog.text and "flash-attn is not installed" in caplog.text
    missing.add("torch.nn.attention.flex_attention")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rerankd.ops.attention"):
        assert attention.cuda_backends() == ["sdpa_padded"]
    assert "no flex_attention" in caplog.text
    missing.discard("torch.nn.attention.flex_attention")
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: varlen_attn_2_11)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rerankd.ops.attention"):
        assert attention.cuda_backends() == ["varlen", "flex", "sdpa_padded"]
        # torch 2.11: varlen_attn without enable_gqa, so the op itself first (GQA native)
        monkeypatch.setattr(attention, "aten_flash_kernel", lambda: aten_flash_2_11)
        assert attention.cuda_backends() == ["flash_gqa", "varlen", "flex", "sdpa_padded"]
    assert caplog.text == ""


FAMILY_FIXTURES = {"qwen3": 512, "gemma": 128, "xlmr": 128}  # GQA 4:2, GQA 4:1, encoder


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flash_gqa", "varlen", "sdpa_padded", "flex"])
@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_cuda_backends_give_sdpa_scores_through_the_model(monkeypatch, fixture, backend):
    """Whole-model float32 scores with each CUDA backend (varlen and flash_gqa: the 2.11
    stand-ins) equal per-sequence SDPA's, with and without shared prefixes."""
    import torch.nn.attention.varlen as varlen_module

    from rerankd.types import Batch

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn_2_11)
    monkeypatch.setattr(attention, "aten_flash_kernel", lambda: aten_flash_2_11)
    served = loaded_fixture(fixture, FAMILY_FIXTURES[fixture])
    engine = served.scheduler.engine
    documents = ["Beijing is the capital.", "Paris lies on the Seine " * 6, "", "yes no"]
    pairs = served.recipe.encode(["capital of china?"] * 4, documents)
    pairs += served.recipe.encode(["where is paris"] * 2, documents[:2])
    groups = [0, 0, 0, 0, 1, 1]
    try:
        expected = [engine.score(Batch(pairs, g)) for g in (groups, None)]
        engine.use_kernels(backend)
        got = [engine.score(Batch(pairs, g)) for g in (groups, None)]
    finally:
        engine.use_kernels("sdpa")
    for a, b in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert max(expected[0]) - min(expected[0]) > 0.1  # distinct scores, or this tests nothing


@pytest.mark.parametrize("group", [2, 32])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS)
@pytest.mark.parametrize("make_batch", BATCHES.values(), ids=BATCHES)
def test_one_query_attention_equals_full_attention_at_the_last_rows(
    monkeypatch, make_batch, heads, group
):
    """Each sequence's last token attending its prefix's and its own keys, over the stream
    as the decoder lays it out (prefix rows first), equals causal attention's last rows;
    groups of 2 sequences take the copy path (rows not next to the prefixes)."""
    monkeypatch.setattr(attention, "ONE_QUERY_GROUP", group)
    batch, q, k, v, prefix = _inputs(make_batch, heads)
    expected = sdpa_attention(q, k, v, batch, prefix, causal=True, scale=0.3)[batch.last]
    shared = sum(batch.prefix_lengths)
    stream_k = torch.cat((prefix[0], k)) if prefix else k
    stream_v = torch.cat((prefix[1], v)) if prefix else v
    got = attention.one_query_attention(q[batch.last], stream_k, stream_v, batch, shared, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
