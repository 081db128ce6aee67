"""rerankd's int8 GEMM (`rerankd.ops.int8_gemm`) vs oneDNN W8A8 vs bf16, in-process, per CPU class.

    python -m benchmarks.bench_int8_gemm --json int8.json               # AMX and Zen 4 classes
    python -m benchmarks.bench_int8_gemm --classes zen4 --rounds 4

For each CPU class (`rerankd.ops.cpu.CPU_CLASSES`: the AMX Xeon itself, AMD EPYC Zen 4
emulated) one worker process, started with the class's caps in its environment, builds three
rerankd services for the Qwen3-Reranker-0.6B shape (`benchmarks/make_model.py`) as the server
does (`Settings` → `runtime.build_service`, defaults otherwise): bf16, `--quantize int8` on
oneDNN W8A8 (uint8 activations, one scale per tensor) and `--quantize int8` on rerankd's own
GEMM (per-token scales, fused epilogues); the int8 path is forced by replacing
`choose_int8`'s answer, so both int8 engines run whatever the start-up race would pick.

Timing: one warm-up request per engine, then `--rounds` rounds; round r scores request r
(1 query × `--docs` documents of 60–240 words) once on each engine, the order rotating by
round. Paired ratios per round: new int8 / oneDNN int8 and new int8 / bf16 (docs/s; > 1: the
new kernel is faster). Per-layer time: one profiled request per engine (torch.profiler, the
engine on the main thread), the GEMM ops' CPU time and the compiled graphs' own time (norms,
attention, quantization, the act·up product) summed and divided by the layer count. Fidelity: every round's scores
of both int8 engines against bf16 (max |Δ| of the probabilities, document pairs in the same
order). Emulation caps instruction sets only: caches, clocks and port counts stay this
machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("bf16", "int8-onednn", "int8-brgemm")
#: the int8 path each int8 engine is forced onto (`quantize.Int8Choice.path`)
PATHS = {"int8-onednn": "w8a8-uint8", "int8-brgemm": "w8a8-brgemm"}
#: profiler names of the linears' GEMMs (custom ops: `onednn_ops`, `int8_gemm`; bf16 without
#: prepacking runs aten's)
GEMM_OPS = (
    "rerankd::int8_gemm", "rerankd::int8_gated", "rerankd::int8_linear",
    "rerankd::packed_linear", "aten::mm", "aten::addmm",
)  # fmt: skip
#: profiler name prefix of a compiled graph's own code (what it runs besides the custom ops)
GRAPH_PREFIX = "## Call CompiledFxGraph"
WARMUP_SEED, FIRST_SEED = 50, 100


def _log(msg: str) -> None:
    print(f"[bench_int8_gemm] {msg}", file=sys.stderr, flush=True)


def _build(model_dir: str, engine: str):
    """One rerankd service, its int8 path forced for the int8 engines."""
    import asyncio

    import torch

    from rerankd.engine import factory
    from rerankd.ops.quantize import Int8Choice, choose_int8
    from rerankd.runtime import build_service
    from rerankd.settings import Settings

    path = PATHS.get(engine)
    factory.choose_int8 = (
        (lambda dtype: Int8Choice(dtype, path, speedup=1.0)) if path else choose_int8
    )
    settings = Settings(model=model_dir, dtype="bfloat16", quantize="int8" if path else "none")
    loop = asyncio.new_event_loop()
    service = build_service(settings)
    loop.run_until_complete(service.start())
    torch.manual_seed(0)
    return loop, service, service.resolve(None)


def _score(built, request) -> tuple[float, list[float]]:
    loop, service, model = built
    started = time.perf_counter()
    scored = loop.run_until_complete(service.rerank(model, request.query, list(request.documents)))
    return time.perf_counter() - started, list(scored.raw_scores)


def _gemm_ms_per_layer(built, request, layers: int) -> dict:
    """CPU time of the GEMM ops and of the rest of the compiled graphs (norms, attention,
    quantization, the act·up product) in one request, per layer, and the request's time.

    The request is scored once through the service to capture its batch, then that batch
    by the engine on this thread under the profiler (the service scores on a worker thread,
    which the profiler does not record)."""
    from torch.profiler import ProfilerActivity, profile

    engine = built[2].scheduler.engine
    batches = []
    score = engine.score
    engine.score = lambda batch: (batches.append(batch), score(batch))[1]
    try:
        _score(built, request)
    finally:
        del engine.score
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for batch in batches:
            engine.score(batch)
        seconds = time.perf_counter() - started
    events = prof.key_averages()
    gemm_us = sum(e.cpu_time_total for e in events if e.key in GEMM_OPS)
    graph_us = sum(e.self_cpu_time_total for e in events if e.key.startswith(GRAPH_PREFIX))
    ops = sorted({e.key for e in events if e.key in GEMM_OPS})
    return {
        "gemm_ms_per_layer": gemm_us / 1e3 / layers,
        "graph_ms_per_layer": graph_us / 1e3 / layers,
        "request_s": seconds,
        "ops": ops,
    }


def _fidelity(exact: list[float], got: list[float]) -> tuple[float, int, int]:
    from rerankd.recipes import sigmoid

    worst = max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(exact, got, strict=True))
    n = len(exact)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if exact[i] != exact[j]]
    same = sum((exact[i] > exact[j]) == (got[i] > got[j]) for i, j in pairs)
    return worst, same, len(pairs)


def worker(model_dir: str, docs: int, rounds: int) -> dict:
    """All three engines in this process: interleaved rounds, a profile, fidelity."""
    import torch

    from benchmarks.bench_compile import _limit_inductor_isa
    from benchmarks.workload import sweep_request
    from rerankd.ops.quantize import choose_int8

    isa = _limit_inductor_isa()
    built = {}
    for engine in ENGINES:
        started = time.perf_counter()
        built[engine] = _build(model_dir, engine)
        _log(f"{engine} ready in {time.perf_counter() - started:.0f}s")
    layers = len(built["bf16"][2].scheduler.engine.model.decoder.layers)
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    scores: dict[str, list[list[float]]] = {e: [] for e in ENGINES}
    for r in range(-1, rounds):
        request = sweep_request(docs, seed=WARMUP_SEED if r < 0 else FIRST_SEED + r)
        order = ENGINES[r % 3 :] + ENGINES[: r % 3]
        for engine in order:
            seconds, got = _score(built[engine], request)
            if r >= 0:
                times[engine].append(seconds)
                scores[engine].append(got)
        if r >= 0:
            _log(f"round {r}: " + ", ".join(f"{e} {times[e][-1]:.2f}s" for e in ENGINES))
    profile = {e: _gemm_ms_per_layer(built[e], sweep_request(docs, seed=WARMUP_SEED), layers)
               for e in ENGINES}  # fmt: skip
    for loop, service, _ in built.values():
        loop.run_until_complete(service.stop())
    fidelity = {}
    for engine in PATHS:
        parts = [_fidelity(a, b) for a, b in zip(scores["bf16"], scores[engine], strict=True)]
        fidelity[engine] = {
            "max_abs_prob_diff": round(max(p[0] for p in parts), 4),
            "pair_order_agreement": round(sum(p[1] for p in parts) / sum(p[2] for p in parts), 4),
        }
    return {
        "inductor_isa": isa,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "choose_int8": choose_int8(torch.bfloat16).describe(),
        "docs_per_request": docs,
        "seconds": times,
        "docs_per_s": {e: round(docs * rounds / sum(t), 3) for e, t in times.items()},
        "ratio_new_vs_onednn": _ratios(times, "int8-onednn"),
        "ratio_new_vs_bf16": _ratios(times, "bf16"),
        "profile": profile,
        "fidelity_vs_bf16": fidelity,
    }


def _ratios(times: dict[str, list[float]], base: str) -> dict:
    ratios = [b / n for n, b in zip(times["int8-brgemm"], times[base], strict=True)]
    return {
        "per_round": [round(x, 3) for x in ratios],
        "median": round(statistics.median(ratios), 3),
    }


def run_class(cpu_class: str, model_dir: str, args) -> dict:
    from rerankd.ops.cpu import CPU_CLASSES

    env = {**os.environ, **CPU_CLASSES[cpu_class], "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.bench_int8_gemm", "--worker",
           json.dumps([model_dir, args.docs, args.rounds])]  # fmt: skip
    _log(f"{cpu_class} ...")
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return {"cpu_class": cpu_class, "error": done.stderr[-3000:]}
    return {"cpu_class": cpu_class, **json.loads(done.stdout.strip().splitlines()[-1])}


def report(row: dict) -> None:
    if "error" in row:
        print(f"{row['cpu_class']}: failed\n{row['error']}")
        return
    print(
        f"\n== {row['cpu_class']} (ATen {row['aten_capability']}, Inductor {row['inductor_isa']})"
    )
    print(f"choose_int8: {row['choose_int8']}")
    for e in ENGINES:
        p = row["profile"][e]
        print(f"{e:12s} {row['docs_per_s'][e]:6.2f} docs/s   GEMMs {p['gemm_ms_per_layer']:6.2f} "
              f"ms/layer ({', '.join(p['ops'])}), rest of the graphs "
              f"{p['graph_ms_per_layer']:6.2f} ms/layer")  # fmt: skip
    for key in ("ratio_new_vs_onednn", "ratio_new_vs_bf16"):
        print(f"{key}: per round {row[key]['per_round']}, median {row[key]['median']}")
    for e, f in row["fidelity_vs_bf16"].items():
        print(f"{e} vs bf16: max |Δ prob| {f['max_abs_prob_diff']}, "
              f"pairs in the same order {f['pair_order_agreement']:.1%}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", nargs="+", default=["amx", "zen4"], choices=["amx", "zen4"])
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return 0
    from benchmarks.make_model import ensure_model

    model_dir = str(ensure_model("0.6b"))
    rows = [run_class(c, model_dir, args) for c in args.classes]
    for row in rows:
        report(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
