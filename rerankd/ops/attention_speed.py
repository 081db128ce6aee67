"""How much faster an attention backend is than per-sequence SDPA, measured on this CPU.

Agreement with SDPA says a kernel is correct; it does not say it is faster. rerankd's own
CPU kernels were tuned on some CPUs and only emulated on others (the AVX512-BF16 kernel ran
1.5x SDPA per layer under a Zen 4 ISA cap on an AMX Xeon, 0.6x SDPA on the Xeon itself,
docs/benchmarks.md), so the engine times each candidate on the model's own attention shape
before it keeps it. The batch is synthetic (seeded random q/k/v, one W-CPU-like request:
a shared prefix and documents of a few hundred tokens); only time is read from it.
"""

from __future__ import annotations

import random
import time
from typing import NamedTuple

import torch

from rerankd.ops.attention import ATTENTION
from rerankd.ops.batch import pack
from rerankd.types import EncodedPair

#: the timed request: 8 documents of 160-288 tokens after a 64-token shared prefix (causal
#: models only; encoders never share one), about W-CPU's per-document length
_DOCUMENTS, _SHORTEST, _LONGEST, _PREFIX = 8, 160, 288, 64
#: interleaved rounds; the fastest call of each backend counts (a 2-core VM's neighbours
#: slow single calls down, never speed them up)
_ROUNDS = 3


class AttentionShape(NamedTuple):
    """What a model's attention looks like to a kernel."""

    heads: int
    kv_heads: int
    head_dim: int
    causal: bool


def speedup_over_sdpa(backend: str, shape: AttentionShape, dtype: torch.dtype) -> float:
    """SDPA's time over `backend`'s for one layer of the timed request on the CPU (> 1: the
    backend is faster). About 0.1-0.3 s at the Qwen3-0.6B shape on 2 cores."""
    batch, prefix_tokens = _timed_batch(shape.causal)
    g = torch.Generator().manual_seed(0)

    def rows(n: int, heads: int) -> torch.Tensor:
        return torch.randn(n, heads, shape.head_dim, generator=g).to(dtype)

    tokens = len(batch.input_ids)
    q, k, v = rows(tokens, shape.heads), rows(tokens, shape.kv_heads), rows(tokens, shape.kv_heads)
    prefix_kv = (rows(prefix_tokens, shape.kv_heads), rows(prefix_tokens, shape.kv_heads))
    prefix_kv = prefix_kv if prefix_tokens else None
    out = torch.empty_like(q)
    scale = shape.head_dim**-0.5
    best = {name: float("inf") for name in ("sdpa", backend)}
    with torch.inference_mode():
        for round_ in range(_ROUNDS + 1):  # round 0 warms caches and kernel builds up
            for name in best:
                started = time.perf_counter()
                ATTENTION[name](q, k, v, batch, prefix_kv, shape.causal, scale, out)
                if round_:
                    best[name] = min(best[name], time.perf_counter() - started)
    return best["sdpa"] / best[backend]


def _timed_batch(causal: bool):
    """The timed request packed as the engine packs one (shared prefix only when causal)."""
    rng = random.Random(0)
    prefix = tuple(rng.randrange(1000) for _ in range(_PREFIX))
    pairs = [
        EncodedPair(
            prefix + tuple(rng.randrange(1000) for _ in range(rng.randint(_SHORTEST, _LONGEST)))
        )
        for _ in range(_DOCUMENTS)
    ]
    pairs.sort(key=len, reverse=True)  # longest first, as the scheduler batches a request
    batch = pack(pairs, [0] * len(pairs), torch.device("cpu"), share_prefix=causal)
    return batch, sum(batch.prefix_lengths)
