"""Attention alone: SDPA per sequence vs rerankd's AMX kernel, one decoder layer of W-CPU.

The layout is a W-CPU request as the engine gets it (a 16-document request's unshared tokens
after its shared prefix, longest first, token counts from the benchmark checkpoint's
tokenizer), the Qwen3
0.6B/4B attention shapes, bf16, torch's threads. Interleaved rounds (the VM's speed drifts);
prints ms per layer for each kernel, their ratio, effective TFLOP/s (causal FLOPs only) and
the kernel's max |Δ| to float32 SDPA next to bf16 SDPA's.

    python -m benchmarks.bench_attention [--size 0.6b] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.make_model import ensure_model
from benchmarks.workload import w_cpu
from rerankd.ops.amx_kernel import load_kernel
from rerankd.ops.attention import amx_attention, sdpa_attention
from rerankd.ops.batch import pack
from rerankd.runtime import load_recipe
from rerankd.settings import Settings

#: (heads, kv heads, head dim) of the Qwen3-Reranker attention
SHAPES = {"0.6b": (16, 8, 128), "4b": (32, 8, 128)}


def _packed_request(size: str, seed: int):
    """The first W-CPU request of `seed`, tokenized, ordered longest first (as the scheduler
    batches a request) and packed as the engine packs it."""
    settings = Settings(model=str(ensure_model(size)), device="cpu")
    _, _, recipe = load_recipe(settings)
    request = w_cpu(seed)[0]
    pairs = recipe.encode([request.query] * len(request.documents), list(request.documents))
    pairs.sort(key=len, reverse=True)
    return pack(pairs, [0] * len(pairs), torch.device("cpu"))


def _causal_flops(batch, heads: int, dim: int) -> float:
    """QKᵀ and PV multiply-adds a causal kernel must do (prefix keys fully, own keys causal)."""
    total = 0
    for i, length in enumerate(batch.lengths):
        span = batch.prefix_span(i)
        prefix = span[1] if span else 0
        keys_seen = length * prefix + length * (length + 1) / 2
        total += 2 * 2 * heads * dim * keys_seen
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="layer calls per round and kernel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    heads, kv_heads, dim = SHAPES[args.size]
    batch = _packed_request(args.size, args.seed)
    prefix = sum(batch.prefix_lengths)
    rows = len(batch.input_ids)
    g = torch.Generator().manual_seed(args.seed)

    def randn(n, h):
        return torch.randn(n, h, dim, generator=g).to(torch.bfloat16)

    q, k, v = randn(rows, heads), randn(rows, kv_heads), randn(rows, kv_heads)
    prefix_kv = (randn(prefix, kv_heads), randn(prefix, kv_heads))
    scale = dim**-0.5
    out = torch.empty_like(q)
    print(
        f"== attention, one layer: {args.size} shape ({heads} heads / {kv_heads} kv heads, "
        f"head dim {dim}), bf16, {torch.get_num_threads()} threads"
    )
    print(
        f"   {batch.num_sequences} documents, {rows} unshared tokens "
        f"({min(batch.lengths)}-{max(batch.lengths)}), shared prefix {prefix}"
    )
    kernels = {"sdpa": sdpa_attention}
    if load_kernel() is None:
        print("   AMX kernel unavailable on this machine (needs AMX-BF16 and a C++ compiler)")
    else:
        kernels["amx"] = amx_attention

    reference = sdpa_attention(
        q.float(), k.float(), v.float(), batch, tuple(t.float() for t in prefix_kv), True, scale
    )
    for name, kernel in kernels.items():
        got = kernel(q, k, v, batch, prefix_kv, True, scale, out).float()
        print(f"   {name}: max |Δ| to float32 SDPA {(got - reference).abs().max().item():.4f}")

    times: dict[str, list[float]] = {name: [] for name in kernels}
    for r in range(args.rounds):
        order = list(kernels) if r % 2 == 0 else list(reversed(kernels))
        for name in order:
            kernel = kernels[name]
            kernel(q, k, v, batch, prefix_kv, True, scale, out)
            started = time.perf_counter()
            for _ in range(args.calls):
                kernel(q, k, v, batch, prefix_kv, True, scale, out)
            times[name].append((time.perf_counter() - started) / args.calls * 1e3)
    flops = _causal_flops(batch, heads, dim)
    for name, values in times.items():
        ms = statistics.median(values)
        print(
            f"   {name:5s} {ms:7.2f} ms/layer (median of {args.rounds} rounds: "
            + " ".join(f"{x:.2f}" for x in values)
            + f"), {flops / ms / 1e9:.3f} TFLOP/s on causal FLOPs"
        )
    if "amx" in times:
        ratio = statistics.median(times["sdpa"]) / statistics.median(times["amx"])
        print(f"   amx is {ratio:.2f}x faster than sdpa")


if __name__ == "__main__":
    main()
