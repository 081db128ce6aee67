"""Both attention backends compute the same thing; the varlen layout is checked on CPU
with a reference kernel that follows flash-attention's varlen semantics."""

from __future__ import annotations

import torch

from rerankd.engine.attention import sdpa_attention, split_prefix_attention, varlen_attention
from rerankd.engine.batch import pack
from rerankd.types import EncodedPair


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


def test_split_prefix_attention_matches_sdpa():
    batch = _batch()
    q, k, v = _qkv(len(batch.input_ids))
    _, pk, pv = _qkv(sum(batch.prefix_lengths), seed=1)
    expected = sdpa_attention(q, k, v, batch, (pk, pv), causal=True, scale=0.3)
    got = split_prefix_attention(q, k, v, batch, (pk, pv), causal=True, scale=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
