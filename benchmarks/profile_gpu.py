"""Where a W-GPU request's time goes on CUDA (issue 17): the numbers that decide the next
optimisation, taken in the same device run as the benchmark.

For one W-GPU request (benchmarks/bench_gpu.py's workload) through rerankd's real scheduler:
- docs/s eager, and with `--compile on` (Inductor on the per-token work) when it compiles
  and agrees with eager;
- torch.profiler of one eager request: wall time, the GPU's busy time (the sum of kernel
  times), kernel launches, the top kernels by GPU time; a GPU busy share far below 1 means
  the request is launch/host bound, near 1 that the kernels themselves are the cost;
- the bf16 GEMM ceiling on the model's linear shapes at the request's token count, and the
  request's effective rate against it (FLOPs of the unshared tokens, bench_cpu's formula).

`--cuda-graphs on` builds both engines with rerankd's `--cuda-graphs on` (captured CUDA
graphs of the forward): compare its GPU busy share with a run without. Each engine's
`cuda_graphs` says whether it turned them on (it runs without where they fail to), and
`graph_captures` how many it captured.

    python -m benchmarks.profile_gpu --size 0.6b --json profile.json     # needs CUDA
    python -m benchmarks.profile_gpu --size 0.6b --compile-only --cuda-graphs on
    python -m benchmarks.profile_gpu --device cpu --model DIR --docs 8   # a smoke test
    python -m benchmarks.profile_gpu --device cpu --size 0.6b --docs 16  # a CPU request:
        # the ops' own time (mkldnn linears, compiled glue, attention) and the bf16 ceiling
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_cpu import unshared_flops
from benchmarks.bench_gpu import PREFIX_TOKENS, request_from_args, run_rerankd, sync, timed
from benchmarks.make_model import SHAPES, linear_widths
from rerankd.types import Batch, EncodedPair

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _speed(
    model_dir: Path,
    pairs,
    device: torch.device,
    compile: str,
    repeats: int,
    quantize: str,
    cuda_graphs: str = "auto",
) -> dict:
    """docs/s of one W-GPU request with `--compile compile`, and what the engine chose."""
    started = time.perf_counter()
    run, _, engine = run_rerankd(model_dir, pairs, device, None, compile, quantize, cuda_graphs)
    load_s = time.perf_counter() - started
    times = timed(run, device, repeats)
    # the profiler records CPU ops on its own thread only, and the scheduler runs the engine
    # on another: the engine's call for the same batch, here, shows the host's side (on CPU
    # all of the work; on CUDA what keeps the GPU waiting)
    direct = functools.partial(
        engine.score, Batch([EncodedPair(p) for p in pairs], [0] * len(pairs))
    )
    graphs = getattr(engine, "graphs", None)
    return {
        "docs_per_s": len(pairs) / statistics.median(times),
        "cuda_graphs": graphs is not None,
        "graph_captures": graphs.captures if graphs is not None else 0,
        "seconds": times,
        "compiled": bool(getattr(engine, "compiled", False)),
        "kernel": getattr(engine, "kernel", engine.attention),
        "load_and_warmup_s": load_s,
        "run": run if device.type == "cuda" else direct,
        "direct": direct,
    }


def _device_time(event) -> float:
    """An event's own GPU time in microseconds, under either of torch's attribute names."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_request(run, device: torch.device) -> dict:
    """torch.profiler over one request: wall, summed kernel time, launches, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run()
        sync(device)
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    kernels = [e for e in averages if _device_time(e) > 0 and not e.key.startswith("cuda")]
    busy_us = sum(_device_time(e) for e in kernels)
    launches = sum(e.count for e in averages if e.key in LAUNCHES)
    top = sorted(kernels, key=_device_time, reverse=True)[:25]
    # on CPU the ops themselves are the work: their own (self) time, the largest first
    ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return {
        "wall_ms": 1000 * wall,
        "gpu_busy_ms": busy_us / 1000,
        "gpu_busy_share": busy_us / 1e6 / wall if wall else 0.0,
        "kernel_launches": launches,
        "top_kernels": [
            {"name": e.key[:120], "count": e.count, "gpu_ms": _device_time(e) / 1000} for e in top
        ],
        "top_cpu_ops": [
            {"name": e.key[:120], "count": e.count, "cpu_ms": e.self_cpu_time_total / 1000}
            for e in ops
        ],
    }


def _report(name: str, profile: dict) -> dict:
    """Print a profile's summary and its top kernels; returns it."""
    print(
        f"{name} profile: wall {profile['wall_ms']:.1f} ms, GPU busy "
        f"{profile['gpu_busy_ms']:.1f} ms ({profile['gpu_busy_share']:.0%}), "
        f"{profile['kernel_launches']} launches"
    )
    for row in profile["top_kernels"][:15]:
        print(f"  {row['gpu_ms']:8.2f} ms  x{row['count']:<5d} {row['name']}")
    if not profile["top_kernels"]:  # CPU: the ops' own time
        for row in profile["top_cpu_ops"][:15]:
            print(f"  {row['cpu_ms']:8.2f} ms  x{row['count']:<5d} {row['name']} (CPU)")
    return profile


def _host_report(name: str, profile: dict) -> dict:
    """Print the engine call's wall time and the ops taking the most host time in it (on
    CUDA: the host-side cost of launching the work); returns the profile."""
    print(f"{name} engine call on this thread: wall {profile['wall_ms']:.1f} ms, host ops:")
    for row in profile["top_cpu_ops"][:12]:
        print(f"  {row['cpu_ms']:8.2f} ms  x{row['count']:<5d} {row['name']}")
    return profile


def gemm_ceiling(size: str, tokens: int, device: torch.device, repeats: int = 10) -> dict:
    """bf16 F.linear TFLOP/s per linear shape of the model at `tokens` rows, and overall
    (total FLOPs over total time, as a forward weights them)."""
    h, q, kv, inter = linear_widths(size)
    dtype = torch.bfloat16  # the engine's default on CUDA and on CPUs with bf16 (AMX, Zen 4)
    shapes = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
    rows, flops, seconds = {}, 0.0, 0.0
    for name, (k, n) in shapes.items():
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        times = timed(lambda x=x, w=w: F.linear(x, w), device, repeats)
        t = statistics.median(times)
        rows[name] = 2 * tokens * k * n / t / 1e12
        flops, seconds = flops + 2 * tokens * k * n, seconds + t
        del x, w
    return {"per_shape_tflops": rows, "tflops": flops / seconds / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--doc-min", type=int, default=128)
    parser.add_argument("--doc-max", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="eager only")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="only eager vs --compile on docs/s, and the compiled request's profile",
    )
    parser.add_argument(
        "--quantize", default="none", choices=["none", "fp8"], help="the engine's --quantize"
    )
    parser.add_argument(
        "--cuda-graphs", default="auto", choices=["auto", "on", "off"], help="rerankd's flag"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model_dir, pairs = request_from_args(args)
    tokens = sum(map(len, pairs))
    stats = {
        "shared_per_request": [PREFIX_TOKENS],
        "docs_per_request": [len(pairs)],
        "pair_lens": [len(p) for p in pairs],
    }
    flops = unshared_flops(args.size, stats)
    summary: dict = {
        "size": args.size,
        "quantize": args.quantize,
        "cuda_graphs": args.cuda_graphs,
        "docs": len(pairs),
        "tokens": tokens,
        "flops": flops,
    }

    eager = _speed(model_dir, pairs, device, "off", args.repeats, args.quantize, args.cuda_graphs)
    run, direct = eager.pop("run"), eager.pop("direct")
    summary["eager"] = eager
    print(
        f"eager: {eager['docs_per_s']:.1f} docs/s, kernel {eager['kernel']}, CUDA graphs "
        f"{eager['cuda_graphs']} ({eager['graph_captures']} captures)"
    )
    if not args.compile_only:
        summary["profile"] = _report("eager", profile_request(run, device))
        if device.type == "cuda":  # the host's side, on this thread
            summary["host_profile"] = _host_report("eager", profile_request(direct, device))
    del run, direct
    if not args.skip_compile:
        try:
            compiled = _speed(
                model_dir, pairs, device, "on", args.repeats, args.quantize, args.cuda_graphs
            )
            run, direct = compiled.pop("run"), compiled.pop("direct")
            if compiled["compiled"]:  # where the compiled request's time goes, as for eager
                compiled["profile"] = _report("compiled", profile_request(run, device))
                if device.type == "cuda":
                    compiled["host_profile"] = _host_report(
                        "compiled", profile_request(direct, device)
                    )
            del run, direct
        except Exception as exc:  # a compiler failure is a finding, not a crash
            compiled = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        summary["compiled"] = compiled
        print(
            "compile on:",
            {k: v for k, v in compiled.items() if k not in ("seconds", "profile", "host_profile")},
            f"({compiled.get('docs_per_s', 0) / eager['docs_per_s']:.2f}x eager)",
        )
    if not args.compile_only:
        ceiling = gemm_ceiling(args.size, tokens, device)
        summary["gemm_ceiling"] = ceiling
        rate = flops / statistics.median(eager["seconds"]) / 1e12
        summary["effective_tflops"] = rate
        summary["effective_share_of_gemm_ceiling"] = rate / ceiling["tflops"]
        print(
            f"GEMM ceiling {ceiling['tflops']:.3g} TFLOP/s "
            f"({ {k: round(v, 2) for k, v in ceiling['per_shape_tflops'].items()} }); "
            f"eager effective {rate:.1f} TFLOP/s = {rate / ceiling['tflops']:.0%} of it"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
