"""Attention alone: SDPA per sequence vs rerankd's AMX and AVX512-BF16 kernels, one decoder
layer of W-CPU.

The layout is a W-CPU request as the engine gets it (a 16-document request's unshared tokens
after its shared prefix, longest first, token counts from the benchmark checkpoint's
tokenizer), the Qwen3
0.6B/4B attention shapes, bf16, torch's threads. Interleaved rounds (the VM's speed drifts);
prints ms per layer for each kernel, their ratio, effective TFLOP/s (causal FLOPs only) and
the kernel's max |Δ| to float32 SDPA next to bf16 SDPA's. Each kernel runs where its CPU
flags allow (the AVX512-BF16 one also on an AMX Xeon, which has AVX512-BF16 too; there it
measures the kernel on the Xeon's cores, not a Zen 4's).

    python -m benchmarks.bench_attention [--size 0.6b] [--rounds 5] [--kernels sdpa,avx512]
        [--cpu-class zen4]

`--cpu-class` reruns the benchmark in the environment of a CPU class
(`rerankd.ops.cpu.CPU_CLASSES`): e.g. `zen4` caps oneDNN at AVX512-BF16 (SDPA's GEMMs as on a
Zen 4) and hides AMX from rerankd, so the AMX kernel is off and the AVX512-BF16 one runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.make_model import ensure_model
from benchmarks.workload import w_cpu
from rerankd.ops import amx_kernel, avx512_kernel
from rerankd.ops.attention import amx_attention, avx512_attention, sdpa_attention
from rerankd.ops.batch import pack
from rerankd.ops.cpu import CPU_CLASSES, cpu_flags
from rerankd.runtime import load_recipe
from rerankd.settings import Settings

#: set in the process `--cpu-class` starts, to the class it emulates
_CLASS_ENV = "RERANKD_BENCH_CPU_CLASS"
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
    parser.add_argument(
        "--kernels", default="sdpa,amx,avx512", help="comma-separated: sdpa, amx, avx512"
    )
    parser.add_argument(
        "--cpu-class", choices=sorted(CPU_CLASSES), help="run in this CPU class's environment"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.cpu_class and os.environ.get(_CLASS_ENV) != args.cpu_class:
        # the caps must be set before oneDNN and ATen first read them: a fresh process
        env = {**os.environ, **CPU_CLASSES[args.cpu_class], _CLASS_ENV: args.cpu_class}
        argv = [sys.executable, "-m", "benchmarks.bench_attention", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    if args.threads:
        torch.set_num_threads(args.threads)

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
    emulated = os.environ.get(_CLASS_ENV)
    print(
        f"   CPU class {emulated + ' (emulated)' if emulated else 'of this machine'}: "
        f"amx_bf16 {'amx_bf16' in cpu_flags()}, avx512_bf16 {'avx512_bf16' in cpu_flags()}, "
        f"oneDNN ISA cap {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}"
    )
    print(
        f"   {batch.num_sequences} documents, {rows} unshared tokens "
        f"({min(batch.lengths)}-{max(batch.lengths)}), shared prefix {prefix}"
    )
    wanted = args.kernels.split(",")
    kernels = {"sdpa": sdpa_attention} if "sdpa" in wanted else {}
    for name, attend, module, needs in (
        ("amx", amx_attention, amx_kernel, "AMX-BF16"),
        ("avx512", avx512_attention, avx512_kernel, "AVX512-BF16"),
    ):
        if name not in wanted:
            continue
        if module.load_kernel() is None:
            print(f"   {name} kernel unavailable here (needs {needs} and a C++ compiler)")
        else:
            kernels[name] = attend

    reference = sdpa_attention(
        q.float(), k.float(), v.float(), batch, tuple(t.float() for t in prefix_kv), True, scale
    )
    for name, kernel in kernels.items():
        got = kernel(q, k, v, batch, prefix_kv, True, scale, out).float()
        print(f"   {name}: max |Δ| to float32 SDPA {(got - reference).abs().max().item():.4f}")

    # wall and CPU time: on a shared machine the CPU time per call (all threads, spin-waits
    # included) says what a kernel costs when its threads are descheduled
    times: dict[str, list[float]] = {name: [] for name in kernels}
    cpu_times: dict[str, list[float]] = {name: [] for name in kernels}
    for r in range(args.rounds):
        order = list(kernels) if r % 2 == 0 else list(reversed(kernels))
        for name in order:
            kernel = kernels[name]
            kernel(q, k, v, batch, prefix_kv, True, scale, out)
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                kernel(q, k, v, batch, prefix_kv, True, scale, out)
            times[name].append((time.perf_counter() - started) / args.calls * 1e3)
            cpu_times[name].append((time.process_time() - cpu_started) / args.calls * 1e3)
    flops = _causal_flops(batch, heads, dim)
    for name, values in times.items():
        ms = statistics.median(values)
        print(
            f"   {name:6s} {ms:7.2f} ms/layer (median of {args.rounds} rounds: "
            + " ".join(f"{x:.2f}" for x in values)
            + f"), {flops / ms / 1e9:.3f} TFLOP/s on causal FLOPs; "
            + f"CPU {statistics.median(cpu_times[name]):.2f} ms/layer"
        )
    median = {name: statistics.median(values) for name, values in times.items()}
    for fast, slow in (("amx", "sdpa"), ("avx512", "sdpa"), ("avx512", "amx")):
        if fast in median and slow in median:
            print(f"   {fast} is {median[slow] / median[fast]:.2f}x as fast as {slow}")


if __name__ == "__main__":
    main()
