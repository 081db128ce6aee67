"""Every CUDA attention backend against per-sequence SDPA in float32 on CPU: shared
prefixes, GQA, causal and not, at the Qwen3-0.6B head shape (16 query heads, 8 KV, D 128)."""

from __future__ import annotations

import random

import pytest
import torch

from rerankd.ops.attention import (
    ATTENTION,
    cuda_backends,
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
