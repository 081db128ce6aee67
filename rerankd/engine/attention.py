"""Attention over packed sequences, optionally after a shared prefix's keys/values.

Two exact implementations of the same contract:
- ``sdpa``: SDPA per sequence (4-D inputs, so the fused CPU/GPU kernels run). The CPU path.
- ``varlen``: one variable-length flash-attention call for the whole batch
  (`torch.nn.attention.varlen.varlen_attn`, CUDA). The runner enables it only after checking
  it against ``sdpa`` on the device (see `PackedEngine`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rerankd.engine.batch import PackedBatch

#: flat keys/values of every shared prefix of the batch for one layer, each (sum P, KVH, D)
PrefixKV = tuple[torch.Tensor, torch.Tensor]


def _lower_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Query j (the last q_len of k_len positions) sees keys 0 .. k_len - q_len + j."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + offset  # (q_len, k_len) bool


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, KVH, D) → (T, H, D); one SDPA call per sequence."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for i, (start, length) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
        end = start + length
        # (1, heads, L, D): SDPA's fused kernels need 4-D inputs (3-D falls back to math)
        qi = q[start:end].transpose(0, 1)[None]
        ki = k[start:end].transpose(0, 1)[None]
        vi = v[start:end].transpose(0, 1)[None]
        span = batch.prefix_span(i) if prefix_kv is not None else None
        mask = None
        is_causal = causal
        if span is not None:
            p_start, p_len = span
            pk = prefix_kv[0][p_start : p_start + p_len].transpose(0, 1)[None]  # (1, KVH, P, D)
            pv = prefix_kv[1][p_start : p_start + p_len].transpose(0, 1)[None]
            ki = torch.cat((pk, ki), dim=2)  # (1, KVH, P + L, D)
            vi = torch.cat((pv, vi), dim=2)
            if causal:  # the prefix is in the past of every token: a lower-right mask
                mask = _lower_right_causal_mask(length, ki.shape[2], q.device)
            is_causal = False
        oi = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
        out[start:end] = oi[0].transpose(0, 1)  # (H, L, D) -> (L, H, D)
    return out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    kernel=None,
) -> torch.Tensor:
    """Same contract as `sdpa_attention`, as one varlen kernel call (`batch.varlen` set)."""
    layout = batch.varlen
    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    if prefix_kv is not None:
        k = torch.cat((prefix_kv[0], k))[layout.gather]  # (T_k, KVH, D): [prefix, own] per seq
        v = torch.cat((prefix_kv[1], v))[layout.gather]
    return kernel(
        q,
        k,
        v,
        layout.cu_seq_q,
        layout.cu_seq_k,
        layout.max_q,
        layout.max_k,
        scale=scale,
        window_size=(-1, 0) if causal else (-1, -1),
        enable_gqa=q.shape[1] != k.shape[1],
    )


ATTENTION = {"sdpa": sdpa_attention, "varlen": varlen_attention}
