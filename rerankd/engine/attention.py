"""Attention over packed sequences, optionally after a shared prefix's keys/values.

Three exact implementations of the same contract:
- ``sdpa``: SDPA per sequence (4-D inputs, so the fused CPU/GPU kernels run). The fallback.
- ``amx``: rerankd's own AMX kernel for bf16 on Intel CPUs with AMX (`amx_kernel`), enabled
  by the runner only after checking it against ``sdpa`` (see `PackedEngine`).
- ``varlen``: one variable-length flash-attention call for the whole batch
  (`torch.nn.attention.varlen.varlen_attn`, CUDA). The runner enables it only after checking
  it against ``sdpa`` on the device (see `PackedEngine`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rerankd.engine.amx_kernel import load_kernel, sequence_table
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, KVH, D) → (T, H, D), written into `out` when given; one SDPA
    call per sequence."""
    out = torch.empty_like(q) if out is None else out
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
    out: torch.Tensor | None = None,
    kernel=None,
) -> torch.Tensor:
    """Same contract as `sdpa_attention`, as one varlen kernel call (`batch.varlen` set)."""
    layout = batch.varlen
    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    if prefix_kv is not None:
        k = torch.cat((prefix_kv[0], k))[layout.gather]  # (T_k, KVH, D): [prefix, own] per seq
        v = torch.cat((prefix_kv[1], v))[layout.gather]
    result = kernel(
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
    return result if out is None else out.copy_(result)


ATTENTION = {"sdpa": sdpa_attention, "varlen": varlen_attention}


def split_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU: the prefix part of attention for all of a prefix's sequences in ONE kernel call.

    softmax over [prefix keys, own keys] = a log-sum-exp weighted mix of two softmaxes:
    (a) every token of a group against its shared prefix (no mask, one call per prefix),
    (b) every sequence against its own keys (plain causal, the fused kernel's fast path).
    Exact up to float rounding; avoids copying the prefix's keys once per document.
    """
    if prefix_kv is None or not causal:
        return sdpa_attention(q, k, v, batch, prefix_kv, causal, scale, out)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    own = torch.empty_like(q)
    own_lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # (T, H)
    for start, length in zip(batch.starts, batch.lengths, strict=True):
        end = start + length
        o, lse = flash(
            q[start:end].transpose(0, 1)[None],
            k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None],
            0.0,
            True,
            scale=scale,
        )[:2]
        own[start:end] = o[0].transpose(0, 1)
        own_lse[start:end] = lse[0].transpose(0, 1)
    for index, (p_start, p_len) in enumerate(
        zip(batch.prefix_starts, batch.prefix_lengths, strict=True)
    ):
        rows = batch.prefix_rows(index)  # (T_g,) flat rows of the sequences sharing prefix `index`
        qg = q[rows].transpose(0, 1)[None]  # (1, H, T_g, D)
        pk = prefix_kv[0][p_start : p_start + p_len].transpose(0, 1)[None]  # (1, KVH, P, D)
        pv = prefix_kv[1][p_start : p_start + p_len].transpose(0, 1)[None]
        o_pre, lse_pre = flash(qg, pk, pv, 0.0, False, scale=scale)[:2]
        o_pre = o_pre[0].transpose(0, 1).float()  # (T_g, H, D)
        lse_pre = lse_pre[0].transpose(0, 1)  # (T_g, H)
        lse_own = own_lse[rows]
        top = torch.maximum(lse_pre, lse_own)
        w_pre = torch.exp(lse_pre - top)[..., None]  # (T_g, H, 1)
        w_own = torch.exp(lse_own - top)[..., None]
        mixed = (o_pre * w_pre + own[rows].float() * w_own) / (w_pre + w_own)
        own[rows] = mixed.to(q.dtype)
    return own if out is None else out.copy_(own)


ATTENTION["split"] = split_prefix_attention


def _rows_ok(t: torch.Tensor) -> bool:
    """(rows, heads, D) with contiguous heads, as the AMX kernel reads them; rows may be strided
    (an even number of elements apart: it packs keys as pairs of bf16)."""
    return t.stride(-1) == 1 and t.stride(1) == t.shape[-1] and t.stride(0) % 2 == 0


def _kernel_rows(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_ok(t) else t.contiguous()


def amx_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `sdpa_attention`: rerankd's AMX kernel for bf16 on CPU (see
    `rerankd.engine.amx_kernel`); SDPA for anything it does not cover."""
    kernel = load_kernel()
    if kernel is None or q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-1] % 16:
        return sdpa_attention(q, k, v, batch, prefix_kv, causal, scale, out)
    target = out if out is not None and _rows_ok(out) else torch.empty_like(q)
    if prefix_kv is None:
        pk = pv = q.new_empty(0, k.shape[1], k.shape[2])
    else:
        pk, pv = (_kernel_rows(t) for t in prefix_kv)
    table = sequence_table(batch, with_prefix=prefix_kv is not None)
    kernel.attention(
        _kernel_rows(q), _kernel_rows(k), _kernel_rows(v), pk, pv, table, causal, scale, target
    )
    if out is not None and target is not out:
        return out.copy_(target)
    return target


ATTENTION["amx"] = amx_attention
