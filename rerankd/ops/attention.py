"""Attention over packed sequences, optionally after a shared prefix's keys/values.

Exact implementations of one contract, chosen per device by `PackedEngine` after checking
each against ``sdpa`` on a probe batch:
- ``sdpa``: SDPA per sequence (4-D inputs, so the fused CPU/GPU kernels run). The reference.
- CPU, bf16, fastest first (`cpu_backends`): ``amx``, rerankd's own AMX kernel on Intel CPUs
  with AMX (`amx_kernel`); ``avx512``, rerankd's own AVX512-BF16 kernel for CPUs without AMX
  (AMD EPYC Zen 4/5, Cooper Lake: `avx512_kernel`).
- ``split``: CPU, the shared prefix attended once per group (log-sum-exp merge).
- CUDA, fastest first (`cuda_backends`): ``varlen`` (one
  `torch.nn.attention.varlen.varlen_attn` call per batch, adapted to the installed torch's
  signature), ``flash_attn`` (flash-attn's varlen kernel, where torch lacks varlen),
  ``flex`` (`flex_attention` with a document mask), ``sdpa_padded`` (SDPA on length buckets
  of padded sequences). Never per-sequence SDPA with a mask and GQA on CUDA: no fused kernel
  takes both, so PyTorch would run its math kernel once per document.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from rerankd.ops import avx512_kernel
from rerankd.ops.amx_kernel import load_kernel, sequence_table
from rerankd.ops.batch import PackedBatch, VarlenLayout, upload
from rerankd.ops.cpu import cpu_has_amx

log = logging.getLogger(__name__)

#: flat keys/values of every shared prefix of the batch for one layer, each (sum P, KVH, D)
PrefixKV = tuple[torch.Tensor, torch.Tensor]


def _lower_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Query j (the last q_len of k_len positions) sees keys 0 .. k_len - q_len + j."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + offset  # (q_len, k_len) bool


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, KVH, D) -> (T, heads, D), key/value head j serving query heads j*g .. j*g + g - 1
    (SDPA's and flash-attention's GQA mapping): for kernels that take no GQA flag."""
    groups = heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


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
        expand = False
        if span is not None:
            p_start, p_len = span
            pk = prefix_kv[0][p_start : p_start + p_len].transpose(0, 1)[None]  # (1, KVH, P, D)
            pv = prefix_kv[1][p_start : p_start + p_len].transpose(0, 1)[None]
            ki = torch.cat((pk, ki), dim=2)  # (1, KVH, P + L, D)
            vi = torch.cat((pv, vi), dim=2)
            if causal:  # the prefix is in the past of every token: a lower-right mask
                mask = _lower_right_causal_mask(length, ki.shape[2], q.device)
                # no fused CUDA kernel takes a mask with GQA: expand the heads so the
                # memory-efficient kernel runs instead of the math one
                expand = gqa and q.device.type != "cpu"
            is_causal = False
        if expand:
            ki = ki.repeat_interleave(q.shape[1] // ki.shape[1], dim=1)
            vi = vi.repeat_interleave(q.shape[1] // vi.shape[1], dim=1)
        oi = F.scaled_dot_product_attention(
            qi,
            ki,
            vi,
            attn_mask=mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=gqa and not expand,
        )
        out[start:end] = oi[0].transpose(0, 1)  # (H, L, D) -> (L, H, D)
    return out


#: sequences per SDPA call of `one_query_attention`. Its mask spans the group's rows, so a
#: query is also scored against its neighbours' keys (masked out): bounded waste per group
ONE_QUERY_GROUP = 32


def one_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    shared: int,
    scale: float,
) -> torch.Tensor:
    """Attention for one query per sequence that sees every key of its sequence, its
    prefix's and its own: a decoder's last token (causal masking hides nothing from it) or
    an encoder's first ([CLS], bidirectional). q (N, H, D) holds those queries; k/v (rows,
    KVH, D) are the whole stream's as the model lays it out (the `shared` rows of the shared
    prefixes first, then the batch's rows) → (N, H, D).

    For a model's last layer, whose output is read at those rows only. One SDPA call per
    group of sequences, over the prefixes' and the group's rows, with a mask that keeps each
    query to its sequence's keys."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    # no fused CUDA kernel takes a mask with GQA: expanded heads run the memory-efficient one
    expand = gqa and q.device.type != "cpu"
    prefix_starts, prefix_lengths = batch.prefix_starts, batch.prefix_lengths
    for g0 in range(0, batch.num_sequences, ONE_QUERY_GROUP):
        g1 = min(batch.num_sequences, g0 + ONE_QUERY_GROUP)
        first = shared + batch.starts[g0]
        end = shared + batch.starts[g1 - 1] + batch.lengths[g1 - 1]
        # key columns: the prefixes' rows [0, shared), then the group's rows [first, end)
        if shared == 0 or first == shared:  # adjacent in the stream: a view
            kg, vg = k[first - shared : end], v[first - shared : end]
        else:
            kg, vg = torch.cat((k[:shared], k[first:end])), torch.cat((v[:shared], v[first:end]))
        bounds = [[], [], [], []]  # per query: prefix columns [lo, hi), own columns [lo, hi)
        for i in range(g0, g1):
            prefix = batch.prefix_of[i]
            p_lo = prefix_starts[prefix] if prefix >= 0 else 0
            bounds[0].append(p_lo)
            bounds[1].append(p_lo + prefix_lengths[prefix] if prefix >= 0 else 0)
            o_lo = 2 * shared + batch.starts[i] - first  # its first row's column
            bounds[2].append(o_lo)
            bounds[3].append(o_lo + batch.lengths[i])
        p_lo, p_hi, o_lo, o_hi = (b[:, None] for b in upload(bounds, q.device))
        cols = torch.arange(len(kg), device=q.device)[None, :]
        mask = ((cols >= p_lo) & (cols < p_hi)) | ((cols >= o_lo) & (cols < o_hi))
        kh, vh = kg.transpose(0, 1)[None], vg.transpose(0, 1)[None]  # (1, KVH, keys, D)
        if expand:
            kh = kh.repeat_interleave(q.shape[1] // kh.shape[1], dim=1)
            vh = vh.repeat_interleave(q.shape[1] // vh.shape[1], dim=1)
        o = F.scaled_dot_product_attention(
            q[g0:g1].transpose(0, 1)[None],  # (1, H, g, D)
            kh,
            vh,
            attn_mask=mask[None, None],
            scale=scale,
            enable_gqa=gqa and not expand,
        )
        out[g0:g1] = o[0].transpose(0, 1)
    return out


def _layout(batch: PackedBatch) -> VarlenLayout:
    """The batch's varlen layout, built on first use (once per batch, then cached on it)."""
    return batch.varlen if batch.varlen is not None else batch.with_varlen_layout().varlen


def _rows_before(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """`torch.cat((prefix, rows))` as a view, where `prefix` ends in memory where `rows`
    begins (the decoder's stream: the shared prefixes' rows are the first rows of the same
    projection); None otherwise."""
    if (
        prefix.dim() != rows.dim()
        or prefix.shape[1:] != rows.shape[1:]
        or prefix.stride() != rows.stride()
        or prefix.dtype != rows.dtype
        or prefix.device != rows.device
        or prefix.untyped_storage().data_ptr() != rows.untyped_storage().data_ptr()
        or prefix.storage_offset() + len(prefix) * prefix.stride(0) != rows.storage_offset()
    ):
        return None
    size = (len(prefix) + len(rows), *rows.shape[1:])
    return prefix.as_strided(size, prefix.stride(), prefix.storage_offset())


def _sequence_keys(
    k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout, prefix_kv: PrefixKV | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (T_k, KVH, D) with each sequence's [prefix, own] rows contiguous: one
    gather from [prefixes, stream] (a view where they are adjacent, `_rows_before`; a copy
    otherwise), or from the stream alone where the layout says its keys are there
    (`VarlenLayout.stream_keys`)."""
    if prefix_kv is None:
        return (k[layout.gather], v[layout.gather]) if layout.stream_keys else (k, v)

    def keys(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        joined = _rows_before(prefix, rows)
        return (torch.cat((prefix, rows)) if joined is None else joined)[layout.gather]

    return keys(prefix_kv[0], k), keys(prefix_kv[1], v)


def torch_varlen_kernel() -> Callable | None:
    """`torch.nn.attention.varlen.varlen_attn`, or None in a torch without it (< 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=16)
def _keywords(kernel: Callable) -> frozenset[str] | None:
    """Keyword names `kernel` takes; None when it takes any (**kwargs) or has no signature."""
    try:
        params = inspect.signature(kernel).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def takes(kernel: Callable, name: str) -> bool:
    """Whether `kernel` accepts the keyword argument `name`."""
    names = _keywords(kernel)
    return names is None or name in names


def varlen_kwargs(kernel: Callable, causal: bool, scale: float, gqa: bool) -> tuple[dict, bool]:
    """Keyword arguments for this torch's `varlen_attn`, and whether the caller must expand
    the key/value heads itself. torch 2.11's signature is `(q, k, v, cu_seq_q, cu_seq_k,
    max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1))`: no `enable_gqa`
    (later ones add it); 2.10's took `is_causal` instead of `window_size`."""
    kwargs: dict = {"scale": scale}
    if takes(kernel, "window_size"):  # (-1, 0): causal, aligned bottom-right as flash-attention
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif takes(kernel, "is_causal"):
        kwargs["is_causal"] = causal
    else:
        raise TypeError(f"varlen_attn{inspect.signature(kernel)} takes no causal argument")
    expand = gqa and not takes(kernel, "enable_gqa")
    if gqa and not expand:
        kwargs["enable_gqa"] = True
    return kwargs, expand


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
    kernel: Callable | None = None,
) -> torch.Tensor:
    """Same contract as `sdpa_attention`, as one varlen kernel call (torch's by default)."""
    layout = _layout(batch)
    if kernel is None:
        kernel = torch_varlen_kernel()
        if kernel is None:
            raise RuntimeError(f"torch {torch.__version__} has no varlen_attn")
    k, v = _sequence_keys(k, v, layout, prefix_kv)  # (T_k, KVH, D): [prefix, own] per seq
    kwargs, expand = varlen_kwargs(kernel, causal, scale, q.shape[1] != k.shape[1])
    if expand:
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    result = kernel(q, k, v, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k, **kwargs)
    return result if out is None else out.copy_(result)


def aten_flash_kernel() -> Callable | None:
    """PyTorch's own flash-attention varlen op (`aten::_flash_attention_forward`, which
    `varlen_attn` calls), whose kernel takes fewer key/value heads than query heads (GQA)
    where torch 2.11's `varlen_attn` wrapper does not, and which torch < 2.10 has without that
    wrapper; None where this torch lacks it."""
    return getattr(torch.ops.aten, "_flash_attention_forward", None)


def aten_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract, as one call of PyTorch's flash-attention varlen op with the key/value
    heads as they are (GQA native, causal aligned bottom-right): `varlen` without copying
    every key and value per query head group in every layer, where `varlen_attn` has no
    `enable_gqa` (torch 2.11: measured on an H200, docs/benchmarks.md), and the varlen path
    where torch has no `varlen_attn` at all. Probed against SDPA at start-up like every
    backend, so a torch whose op takes other arguments falls through to the next one."""
    kernel = aten_flash_kernel()
    if kernel is None:
        raise RuntimeError(f"torch {torch.__version__} has no aten::_flash_attention_forward")

    def call(q, k, v, cu_q, cu_k, max_q, max_k):
        return kernel(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)[0]

    return _varlen_call(call, q, k, v, batch, prefix_kv, out)


def _varlen_call(kernel, q, k, v, batch, prefix_kv, out) -> torch.Tensor:
    """`kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k)` over the batch's varlen layout,
    each sequence's keys [prefix, own] (`_sequence_keys`); the result written into `out`
    when given."""
    layout = _layout(batch)
    k, v = _sequence_keys(k, v, layout, prefix_kv)
    result = kernel(q, k, v, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k)
    return result if out is None else out.copy_(result)


def flash_attn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract, through flash-attn's varlen kernel (GQA native, causal bottom-right):
    for a torch without `varlen_attn` where the flash-attn package is installed."""
    from flash_attn import flash_attn_varlen_func

    def call(*args):
        return flash_attn_varlen_func(*args, softmax_scale=scale, causal=causal)

    return _varlen_call(call, q, k, v, batch, prefix_kv, out)


def _key_lengths(batch: PackedBatch) -> list[int]:
    """Keys per sequence: its prefix's (if any) and its own tokens."""
    spans = (batch.prefix_span(i) for i in range(batch.num_sequences))
    return [n + (s[1] if s else 0) for n, s in zip(batch.lengths, spans, strict=True)]


def _document_rows(batch: PackedBatch) -> tuple[torch.Tensor, ...]:
    """Per flat row: (query's sequence, query's last visible key index within its sequence,
    key's sequence, key's index within its sequence), cached on the batch. Keys of sequence
    i are [prefix, own], queries its own tokens: query j sees keys 0 .. P_i + j. The lengths
    go up in one pinned copy and every size is given (`output_size`): no host sync."""
    cache = batch.__dict__.setdefault("_document_rows", {})
    if not cache:
        device = batch.input_ids.device
        k_list = _key_lengths(batch)
        q_lengths, k_lengths = upload([batch.lengths, k_list], device)
        seq = torch.arange(len(batch.lengths), device=device)
        q_doc = seq.repeat_interleave(q_lengths, output_size=sum(batch.lengths))
        k_doc = seq.repeat_interleave(k_lengths, output_size=sum(k_list))
        q_first = torch.cumsum(q_lengths, 0) - q_lengths
        k_first = torch.cumsum(k_lengths, 0) - k_lengths
        q_index = torch.arange(len(q_doc), device=device) - q_first[q_doc]
        k_index = torch.arange(len(k_doc), device=device) - k_first[k_doc]
        cache["rows"] = (q_doc, q_index + (k_lengths - q_lengths)[q_doc], k_doc, k_index)
    return cache["rows"]


@functools.cache
def _compiled_flex() -> Callable:
    """flex_attention compiled: uncompiled it materializes every score (fine for CPU tests
    only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract, as one `flex_attention` call over the whole stream with a document
    mask (block-sparse: blocks of other documents are skipped); compiled on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    layout = _layout(batch)
    k, v = _sequence_keys(k, v, layout, prefix_kv)
    cache = batch.__dict__.setdefault("_flex_masks", {})
    if causal not in cache:
        q_doc, q_sees, k_doc, k_index = _document_rows(batch)

        def document(b, h, q_idx, kv_idx):
            same = q_doc[q_idx] == k_doc[kv_idx]
            return same & (k_index[kv_idx] <= q_sees[q_idx]) if causal else same

        cache[causal] = create_block_mask(
            document, None, None, len(q), len(k), device=q.device, _compile=q.is_cuda
        )
    attend = _compiled_flex() if q.is_cuda else flex_attention
    result = attend(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=cache[causal],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )[0].transpose(0, 1)
    return result if out is None else out.copy_(result)


#: padded tokens per bucket of `padded_sdpa_attention` (bounds its (B, H, Lq, Lk) mask)
PADDED_BUCKET_TOKENS = 16384
#: a sequence joins a bucket only if at least this fraction of the bucket's longest
PADDED_BUCKET_FILL = 0.8


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Sequence indices grouped for padding: longest first, each bucket's sequences within
    `PADDED_BUCKET_FILL` of its longest and at most `PADDED_BUCKET_TOKENS` padded tokens
    (one sequence per bucket when it alone exceeds that)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            bucket = buckets[-1]
            top = lengths[bucket[0]]
            fits = (len(bucket) + 1) * top <= PADDED_BUCKET_TOKENS
            if fits and lengths[i] >= PADDED_BUCKET_FILL * top:
                bucket.append(i)
                continue
        buckets.append([i])
    return buckets


@dataclass(frozen=True)
class PaddedBucket:
    """One bucket of `padded_sdpa_attention` on the device: rows (B, Lq) of the queries and
    (B, Lk) of the keys to gather (padding: one past the end, a zero row), the mask
    (B, 1, Lq, Lk), and where the real outputs go: their indices among the B·Lq padded
    rows (`real`) and their rows in the stream (`targets`). Index lists, not a boolean
    mask over the output: selecting with a boolean mask is a host sync, in every layer."""

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    mask: torch.Tensor
    real: torch.Tensor
    targets: torch.Tensor


def _padded_buckets(batch: PackedBatch, causal: bool, device: torch.device) -> list[PaddedBucket]:
    """The batch's `PaddedBucket`s, cached on it: index lists computed here on the host and
    sent in one pinned copy (`upload`), masks built on the device from the bucket's
    lengths; padded queries see every real key, so no row of the mask is empty (no NaN)."""
    cache = batch.__dict__.setdefault("_padded_buckets", {})
    if causal in cache:
        return cache[causal]
    k_lengths = _key_lengths(batch)
    k_starts = [0]
    for n in k_lengths[:-1]:
        k_starts.append(k_starts[-1] + n)
    q_total, k_total = sum(batch.lengths), sum(k_lengths)
    buckets = length_buckets(k_lengths)
    sizes = [(max(batch.lengths[i] for i in b), max(k_lengths[i] for i in b)) for b in buckets]
    parts: list[list[int]] = []  # per bucket: 4 index lists, query and key lengths
    for bucket, (lq, lk) in zip(buckets, sizes, strict=True):
        q_rows, k_rows, real, targets = [], [], [], []
        for b, i in enumerate(bucket):
            nq, nk, start = batch.lengths[i], k_lengths[i], batch.starts[i]
            q_rows += [*range(start, start + nq), *[q_total] * (lq - nq)]
            k_rows += [*range(k_starts[i], k_starts[i] + nk), *[k_total] * (lk - nk)]
            real += range(b * lq, b * lq + nq)
            targets += range(start, start + nq)
        parts += [q_rows, k_rows, real, targets]
        parts += [[batch.lengths[i] for i in bucket], [k_lengths[i] for i in bucket]]
    tensors = iter(upload(parts, device))
    out = []
    for bucket, (lq, lk) in zip(buckets, sizes, strict=True):
        q_rows, k_rows, real, targets, nq, nk = (next(tensors) for _ in range(6))
        nq, nk = nq[:, None, None], nk[:, None, None]  # (B, 1, 1)
        cols = torch.arange(lk, device=device)[None, None, :]  # (1, 1, Lk)
        allowed = cols < nk  # (B, 1, Lk)
        if causal:  # query j sees keys 0 .. nk - nq + j (the prefix and its own past)
            rows = torch.arange(lq, device=device)[None, :, None]  # (1, Lq, 1)
            allowed = allowed & (cols <= rows + (nk - nq))
        mask = allowed.expand(len(bucket), lq, lk).contiguous()[:, None]  # (B, 1, Lq, Lk)
        q_view, k_view = q_rows.view(len(bucket), lq), k_rows.view(len(bucket), lk)
        out.append(PaddedBucket(q_view, k_view, mask, real, targets))
    cache[causal] = out
    return out


def padded_sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    prefix_kv: PrefixKV | None,
    causal: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract, as one SDPA call per bucket of similar-length sequences padded to a
    rectangle (`length_buckets`), key/value heads expanded: with a mask and equal heads the
    memory-efficient CUDA kernel runs. The fallback that needs nothing beyond SDPA."""
    layout = _layout(batch)
    k, v = _sequence_keys(k, v, layout, prefix_kv)
    heads = q.shape[1]
    zero_q = q.new_zeros(1, *q.shape[1:])
    zero_k = k.new_zeros(1, *k.shape[1:])
    q_ext, k_ext, v_ext = torch.cat((q, zero_q)), torch.cat((k, zero_k)), torch.cat((v, zero_k))
    out = torch.empty_like(q) if out is None else out
    for bucket in _padded_buckets(batch, causal, q.device):
        q_rows, k_rows = bucket.q_rows, bucket.k_rows
        qb = q_ext[q_rows].transpose(1, 2)  # (B, H, Lq, D)
        kb = expand_kv(k_ext[k_rows].flatten(0, 1), heads).unflatten(0, k_rows.shape)
        vb = expand_kv(v_ext[k_rows].flatten(0, 1), heads).unflatten(0, k_rows.shape)
        ob = F.scaled_dot_product_attention(
            qb, kb.transpose(1, 2), vb.transpose(1, 2), attn_mask=bucket.mask, scale=scale
        ).transpose(1, 2)  # (B, Lq, H, D)
        out.index_copy_(0, bucket.targets, ob.flatten(0, 1).index_select(0, bucket.real))
    return out


def cuda_backends() -> list[str]:
    """Fused CUDA attention backends to probe, fastest first; logs at WARNING why each one
    ahead of what remains is missing. `sdpa_padded` needs only SDPA, so it always remains."""
    backends = []
    varlen = torch_varlen_kernel()
    # PyTorch's flash varlen op itself: GQA without expanded heads where varlen_attn has no
    # enable_gqa (2.10, 2.11), and the varlen path where torch has no varlen_attn (< 2.10)
    if aten_flash_kernel() is not None and (varlen is None or not takes(varlen, "enable_gqa")):
        backends.append("flash_gqa")
    if varlen is not None:
        backends.append("varlen")
    else:
        log.warning(
            "torch %s has no varlen_attn; trying %s",
            torch.__version__,
            "its flash-attention op (aten::_flash_attention_forward)" if backends else "flash-attn",
        )
    if importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attn")
    elif not backends:
        log.warning("flash-attn is not installed; trying flex_attention")
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        backends.append("flex")
    elif not backends:
        log.warning("torch %s has no flex_attention; SDPA on padded buckets", torch.__version__)
    return [*backends, "sdpa_padded"]


def describe(backend: str) -> str:
    """The kernel a backend runs, as `/v1/models` names it."""
    if backend == "varlen":
        kernel = torch_varlen_kernel()
        native = kernel is not None and takes(kernel, "enable_gqa")
        return "varlen_attn" if native else "varlen_attn (KV heads expanded)"
    return {
        "sdpa": "sdpa (per sequence)",
        "amx": "amx (rerankd AMX bf16)",
        "avx512": "avx512 (rerankd AVX512-BF16)",
        "flash_attn": "flash_attn varlen",
        "flash_gqa": "aten flash varlen (GQA native)",
        "flex": "flex_attention (document mask)",
        "sdpa_padded": "sdpa (padded buckets)",
    }.get(backend, backend)


def _rows_ok(t: torch.Tensor) -> bool:
    """(rows, heads, D) with contiguous heads, as the AMX kernel reads them; rows may be strided
    (an even number of elements apart: it packs keys as pairs of bf16)."""
    return t.stride(-1) == 1 and t.stride(1) == t.shape[-1] and t.stride(0) % 2 == 0


def _kernel_rows(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_ok(t) else t.contiguous()


def _run_cpu_kernel(kernel, q, k, v, batch, prefix_kv, causal, scale, out) -> torch.Tensor:
    """Call a compiled CPU kernel's `attention` (amx_attention.cpp's contract): views it cannot
    read are copied first, and its output lands in `out` when given."""
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


def _kernel_takes(q: torch.Tensor) -> bool:
    """Whether rerankd's CPU kernels cover these inputs: bf16 on CPU, head dim a multiple of
    16 (one vector of float lanes)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[-1] % 16 == 0


def _cpu_kernel_attention(load: Callable[[], ModuleType | None], name: str) -> Callable:
    """An attention function with `sdpa_attention`'s contract over one of rerankd's bf16 CPU
    kernels (`load` returns it, or None where it is unavailable); SDPA for anything the
    kernel does not cover."""

    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: PackedBatch,
        prefix_kv: PrefixKV | None,
        causal: bool,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kernel = load()
        if kernel is None or not _kernel_takes(q):
            return sdpa_attention(q, k, v, batch, prefix_kv, causal, scale, out)
        return _run_cpu_kernel(kernel, q, k, v, batch, prefix_kv, causal, scale, out)

    attention.__name__ = attention.__qualname__ = f"{name}_attention"
    return attention


#: the AMX kernel (`rerankd.ops.amx_kernel`) and the AVX512-BF16 one (`ops.avx512_kernel`);
#: each loader is looked up when called, so a test can take a kernel away
amx_attention = _cpu_kernel_attention(lambda: load_kernel(), "amx")
avx512_attention = _cpu_kernel_attention(lambda: avx512_kernel.load_kernel(), "avx512")

#: backends that read the batch's varlen layout (cu_seqlens, key gather): the engine builds
#: it when it packs a batch, ahead of the forward (`PackedBatch.with_varlen_layout`)
VARLEN_BACKENDS = frozenset({"varlen", "flash_gqa", "flash_attn"})

#: every attention implementation by the name engines and `/v1/models` use
ATTENTION = {
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flash_attn": flash_attn_attention,
    "flash_gqa": aten_flash_attention,
    "flex": flex_document_attention,
    "sdpa_padded": padded_sdpa_attention,
    "amx": amx_attention,
    "avx512": avx512_attention,
}


def cpu_backends() -> Iterator[str]:
    """rerankd's bf16 CPU attention kernels that load here, to probe against SDPA in this
    order: ``amx`` on CPUs with AMX, then ``avx512`` on CPUs with AVX512-BF16 (Zen 4/5,
    Cooper Lake; on an AMX CPU only if the AMX kernel is missing or refused). Lazy: a kernel
    is built only when the one before it was not taken. Logs at WARNING why there is none."""
    amx = load_kernel() is not None
    if amx:
        yield "amx"
    missing = avx512_kernel.missing_flags()
    avx512 = not missing and avx512_kernel.load_kernel() is not None
    if avx512:
        yield "avx512"
    if not amx and not avx512:  # a failed build has logged its own WARNING already
        log.warning(
            "no rerankd bf16 attention kernel on this CPU (AMX: %s; AVX512-BF16: %s); "
            "attention runs SDPA",
            "unavailable" if cpu_has_amx() else "no amx_bf16",
            f"lacks {', '.join(missing)}" if missing else "unavailable",
        )
