"""Every CUDA attention backend against per-sequence SDPA in float32 on CPU: shared
prefixes, GQA, causal and not, at the Qwen3-0.6B head shape (16 query heads, 8 KV, D 128)."""

from __future__ import annotations

import random

import pytest
import torch

from rerankd.models.modernbert import band_sdpa_attention, windowed_varlen_attention
from rerankd.ops.attention import (
    ATTENTION,
    cuda_backends,
    one_query_attention,
    sdpa_attention,
    takes,
    torch_varlen_kernel,
)
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _batch(device: torch.device, shared: bool):
    rng = random.Random(0)
    prefix = tuple(rng.randrange(1000) for _ in range(80))
    pairs = [
        EncodedPair((prefix if shared else ()) + tuple(rng.randrange(1000) for _ in range(n)))
        for n in (300, 17, 129, 1, 256, 64)
    ]
    return pack(pairs, [0, 0, 0, 0, 1, 1] if shared else None, device)


def _qkv(batch, heads=16, kv_heads=8, dim=128):
    g = torch.Generator().manual_seed(0)
    t, p = len(batch.input_ids), sum(batch.prefix_lengths)
    q = torch.randn(t, heads, dim, generator=g)
    k, v = (torch.randn(t, kv_heads, dim, generator=g) for _ in range(2))
    prefix = tuple(torch.randn(p, kv_heads, dim, generator=g) for _ in range(2)) if p else None
    return q, k, v, prefix


def _to(t, dtype):
    return None if t is None else tuple(x.to(CUDA, dtype) for x in t)


@pytest.mark.parametrize("heads", [(16, 8), (16, 16), (8, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "no-prefix"])
@pytest.mark.parametrize("backend", [*cuda_backends(), "sdpa"])
def test_cuda_backend_matches_float32_sdpa(backend, shared, heads):
    cpu_batch, gpu_batch = _batch(torch.device("cpu"), shared), _batch(CUDA, shared)
    q, k, v, prefix = _qkv(cpu_batch, *heads)
    for causal in (True, False):
        expected = sdpa_attention(q, k, v, cpu_batch, prefix, causal, 128**-0.5)
        for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
            got = ATTENTION[backend](
                *_to((q, k, v), dtype), gpu_batch, _to(prefix, dtype), causal, 128**-0.5
            )
            torch.testing.assert_close(got.float().cpu(), expected, atol=tol, rtol=tol)


def test_torch_varlen_is_first_where_it_exists():
    """torch 2.11 (the GPU machine's) has varlen_attn: the fast path must be the one probed,
    behind flash_gqa (the same op, GQA native) where varlen_attn has no enable_gqa."""
    kernel = torch_varlen_kernel()
    if kernel is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    expected = ["varlen"] if takes(kernel, "enable_gqa") else ["flash_gqa", "varlen"]
    assert cuda_backends()[: len(expected)] == expected


@pytest.mark.parametrize("heads", [(16, 8), (16, 16)], ids=["gqa", "mha"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "no-prefix"])
def test_one_query_attention_matches_float32_sdpa_at_the_last_rows(shared, heads):
    """The decoder's last layer (`one_query_attention`, CUDA: expanded heads and the
    memory-efficient kernel with a mask) against full causal attention's last rows."""
    cpu_batch, gpu_batch = _batch(torch.device("cpu"), shared), _batch(CUDA, shared)
    q, k, v, prefix = _qkv(cpu_batch, *heads)
    expected = sdpa_attention(q, k, v, cpu_batch, prefix, True, 128**-0.5)[cpu_batch.last]
    stream_k = torch.cat((prefix[0], k)) if prefix else k
    stream_v = torch.cat((prefix[1], v)) if prefix else v
    shared_rows = sum(cpu_batch.prefix_lengths)
    q_last, k_s, v_s = (t.to(CUDA, torch.bfloat16) for t in (q[cpu_batch.last], stream_k, stream_v))
    got = one_query_attention(q_last, k_s, v_s, gpu_batch, shared_rows, 128**-0.5)
    torch.testing.assert_close(got.float().cpu(), expected, atol=3e-2, rtol=3e-2)


def test_windowed_varlen_equals_band_sdpa_on_cuda():
    """ModernBERT's sliding-window layers: varlen with a window against banded SDPA."""
    kernel = torch_varlen_kernel()
    if kernel is None or not takes(kernel, "window_size"):
        pytest.skip("this torch's varlen_attn takes no window_size")
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [3, 9, 10, 200, 1, 130]
    pairs = [EncodedPair(tuple(range(n))) for n in lengths]
    batch = pack(pairs, None, torch.device("cuda"), share_prefix=False)
    q, k, v = (
        torch.randn(sum(lengths), 4, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    got = windowed_varlen_attention(q, k, v, batch, 64, 0.125)
    expected = band_sdpa_attention(q, k, v, batch, 64, 0.125)
    assert (got.float() - expected.float()).abs().max().item() < 2e-2
