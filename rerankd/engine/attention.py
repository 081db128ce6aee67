"""Attention over packed sequences, optionally after a shared prefix's keys/values.

Per device: the CPU (and the portable fallback) runs SDPA per sequence — exact, no padding,
and the per-call overhead is small next to the projections. CUDA may use varlen attention
(`attention_cuda.py`), validated against this path at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: (keys, values) of one shared prefix for one layer, each (kv_heads, P, head_dim)
PrefixKV = tuple[torch.Tensor, torch.Tensor]


def _lower_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Query j (the last q_len of k_len positions) sees keys 0 .. k_len - q_len + j."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + offset  # (q_len, k_len) bool


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: list[int],
    lengths: list[int],
    prefix_kv: list[PrefixKV | None] | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, KVH, D) → (T, H, D); sequence i owns rows starts[i]:+lengths[i]."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for i, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        end = start + length
        # (1, heads, L, D): SDPA's fused CPU/GPU kernels need 4-D inputs (3-D falls back to math)
        qi = q[start:end].transpose(0, 1)[None]
        ki = k[start:end].transpose(0, 1)[None]
        vi = v[start:end].transpose(0, 1)[None]
        prefix = prefix_kv[i] if prefix_kv is not None else None
        mask = None
        is_causal = causal
        if prefix is not None:
            ki = torch.cat((prefix[0][None], ki), dim=2)  # (1, KVH, P + L, D)
            vi = torch.cat((prefix[1][None], vi), dim=2)
            mask = _lower_right_causal_mask(length, ki.shape[2], q.device)
            is_causal = False
        oi = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
        out[start:end] = oi[0].transpose(0, 1)  # (H, L, D) -> (L, H, D)
    return out
