"""`--compile auto`, per CPU class: compiled vs eager per-token kernels, in one run.

    python -m benchmarks.bench_compile --json compile.json            # every class and model
    python -m benchmarks.bench_compile --classes zen4 --families encoder --rounds 2
    python -m benchmarks.bench_compile --classes avx2 --families listwise --listwise-layers 7

For each CPU class (`rerankd.ops.cpu.CPU_CLASSES`: the AMX Xeon itself, and emulated: AMD
EPYC Zen 4, Cascade/Ice Lake AVX512-VNNI, AVX2-only) × model × precision, one worker
process, started with the class's caps in its environment (oneDNN, ATen, MKL, fbgemm and rerankd's own CPU flags are
read before torch imports), builds rerankd's service in-process as the server does
(`Settings` → `runtime.build_service`, `--compile on`, everything else default) and then
scores the same requests with the compiled and the eager per-token kernels, swapped on the
live engine between requests. Models: the Qwen3-Reranker-0.6B shape (28 layers,
`benchmarks/make_model.py`) and the bge-reranker-v2-m3 shape (XLM-R large,
`benchmarks/make_encoder.py`, `--encoder-layers` of its 24), and for the listwise engine
(jina-reranker-v3: our decoder's per-token work on window prompts; its own table,
`compile_policy.LISTWISE_MEASURED`) the jina-reranker-v3 shape
(`benchmarks/family_checkpoints.py`, `--listwise-layers` of its 28). ModernBERT has no compiled
kernels (`ModernBert.compiles` is False), so `--compile` does not apply to it and it is not
measured.

Inductor picks its vector ISA from the real CPU (AMX tiles included) and reads only
`ATEN_CPU_CAPABILITY` (avx2 / avx512, and avx512 still selects the AMX variant), so the worker
also drops from Inductor's list every ISA the emulated class lacks.

Timing: one warm-up request per mode, then `--rounds` rounds; round r scores request r
(1 query × `--docs` documents of 60–240 words) once compiled and once eager, in the order
on/off, off/on, on/off, ... The paired ratio of a round is eager time / compiled time (> 1:
compiling pays); the decision uses the median over rounds. Emulation caps instruction sets
only: caches, clocks and port counts stay this machine's, so the absolute rates are not a
Zen 4's or an AVX2 CPU's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("amx", "zen4", "avx512-vnni", "avx2")
FAMILIES = ("decoder", "encoder", "listwise")
#: precisions measured per class: bf16 only where the class has bf16 instructions (rerankd's
#: `--dtype auto` serves float32 on AVX512-VNNI and AVX2); "int8" is `--quantize int8` with `--dtype auto`,
#: "int8-float32" with `--dtype float32`
PRECISIONS = {
    "amx": ("bfloat16", "int8", "float32", "int8-float32"),
    "zen4": ("bfloat16", "int8", "float32", "int8-float32"),
    "avx512-vnni": ("float32", "int8"),
    "avx2": ("float32", "int8"),
}
#: the listwise engine has no int8 (engine/listwise.py)
LISTWISE_PRECISIONS = {
    "amx": ("bfloat16", "float32"),
    "zen4": ("bfloat16", "float32"),
    "avx512-vnni": ("float32",),
    "avx2": ("float32",),
}
#: compiling pays when the median paired speedup is at least this: the compiled path costs
#: start-up time (the C++ compile) and a compiler on the host, so a gain inside the run's
#: noise does not buy it
PAYS_AT = 1.05
WARMUP_SEED = 50
FIRST_SEED = 100
WORKER_TIMEOUT_S = 1800


def _log(msg: str) -> None:
    print(f"[bench_compile] {msg}", file=sys.stderr, flush=True)


# --- worker: one class x family x precision, in its own process ------------------------------


class _Warnings(logging.Handler):
    """rerankd's start-up warnings (why compiling or a kernel was refused), kept, and two
    INFO lines: the start-up compile check's verdict when it passed (its max |Δ| on the probe
    batch) and `--quantize int8`'s kernel choice (which int8 path the row measured)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.compile_check: str | None = None
        self.int8_choice: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.messages.append(message[:500])
        elif message.startswith("compiled the per-token work"):
            self.compile_check = message[:200]
        elif message.startswith("int8: "):
            self.int8_choice = message[:500]


def _limit_inductor_isa() -> str:
    """Drop from Inductor's vector ISA list what rerankd's CPU flags (the emulated class)
    lack; returns the ISA Inductor will now pick."""
    from torch._inductor import cpu_vec_isa

    from rerankd.ops.cpu import cpu_flags

    flags = cpu_flags()
    needs = {"amx_tile": "amx_bf16", "avx512": "avx512f", "avx512_vnni": "avx512_vnni"}
    found = cpu_vec_isa.valid_vec_isa_list()
    kept = [i for i in found if all(needs.get(f, f) in flags for f in str(i).split())]
    cpu_vec_isa.valid_vec_isa_list = lambda: kept
    return str(cpu_vec_isa.pick_vec_isa())


def _build(model_dir: str, precision: str):
    """rerankd's service for `model_dir` with `--compile on`, as the server builds it."""
    import asyncio

    from rerankd.runtime import build_service
    from rerankd.settings import Settings

    int8 = precision.startswith("int8")  # "int8": --dtype auto; "int8-float32": float32
    dtype = precision.removeprefix("int8").removeprefix("-") if int8 else precision
    settings = Settings(
        model=model_dir,
        dtype=dtype or "auto",
        quantize="int8" if int8 else "none",
        compile="on",
    )
    loop = asyncio.new_event_loop()
    service = build_service(settings)
    loop.run_until_complete(service.start())
    return loop, service, service.resolve(None)


def _use_compiled(engine, family: str, compiled: bool) -> None:
    """Swap the live engine's per-token kernels: the packed engine's model keeps the attention
    kernel its start-up picked; the listwise engine's decoder runs SDPA."""
    from rerankd.models.kernels import Kernels

    if family == "listwise":
        engine.model.decoder.set_kernels(Kernels("sdpa", compiled=compiled))
    else:
        engine.model.set_kernels(Kernels(engine.attention, compiled=compiled))


def _timed(loop, service, model, request) -> tuple[float, list[float]]:
    started = time.perf_counter()
    scored = loop.run_until_complete(service.rerank(model, request.query, list(request.documents)))
    return time.perf_counter() - started, list(scored.raw_scores)


def worker(family: str, model_dir: str, precision: str, docs: int, rounds: int) -> dict:
    """Compiled vs eager on one live engine: timings, paired ratios, max |Δ| of the scores."""
    import torch

    from benchmarks.workload import sweep_request
    from rerankd.ops.cpu import cpu_flags

    isa = _limit_inductor_isa()
    warnings = _Warnings()
    rerankd_log = logging.getLogger("rerankd")
    rerankd_log.addHandler(warnings)
    rerankd_log.setLevel(logging.INFO)  # the compile check's verdict is an INFO line
    started = time.perf_counter()
    loop, service, model = _build(model_dir, precision)
    engine = model.scheduler.engine
    out = {
        "family": family,
        "precision": precision,
        "engine_dtype": engine.dtype,
        "attention": getattr(engine, "attention", "sdpa"),  # the listwise engine: SDPA
        "compiled": engine.compiled,
        "inductor_isa": isa,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(cpu_flags()),
        "load_and_compile_s": round(time.perf_counter() - started, 1),
        "warnings": warnings.messages,
        "compile_check": warnings.compile_check,
        "int8_choice": warnings.int8_choice,
    }
    if not engine.compiled:  # the compiler failed or disagreed: nothing to compare
        return out
    times: dict[str, list[float]] = {"on": [], "off": []}
    worst = 0.0
    for r in range(-1, rounds):  # round -1: the warm-up, not counted
        request = sweep_request(docs, seed=WARMUP_SEED if r < 0 else FIRST_SEED + r)
        scores = {}
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            _use_compiled(engine, family, mode == "on")
            seconds, scores[mode] = _timed(loop, service, model, request)
            if r >= 0:
                times[mode].append(seconds)
        worst = max(worst, *(abs(a - b) for a, b in zip(scores["on"], scores["off"], strict=True)))
        if r >= 0:
            _log(f"{family} {precision} round {r}: on {times['on'][-1]:.2f}s "
                 f"off {times['off'][-1]:.2f}s")  # fmt: skip
    loop.run_until_complete(service.stop())
    ratios = [off / on for on, off in zip(times["on"], times["off"], strict=True)]
    return {
        **out,
        "docs_per_request": docs,
        "seconds": times,
        "docs_per_s": {m: round(docs * rounds / sum(t), 3) for m, t in times.items()},
        "paired_ratios": [round(x, 3) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "max_abs_delta": worst,
    }


# --- driver -----------------------------------------------------------------------------------


def _model_dirs(families: list[str], encoder_layers: int, listwise_layers: int) -> dict[str, str]:
    from benchmarks.family_checkpoints import ensure_checkpoint
    from benchmarks.make_encoder import ensure_encoder
    from benchmarks.make_model import ensure_model

    build = {
        "decoder": lambda: ensure_model("0.6b"),
        "encoder": lambda: ensure_encoder(encoder_layers),
        "listwise": lambda: ensure_checkpoint("jina-v3", layers=listwise_layers),
    }
    return {f: str(build[f]()) for f in families}


def run_one(cpu_class: str, family: str, model_dir: str, precision: str, args) -> dict:
    """One worker under `cpu_class`'s caps; its report, or the failure."""
    from rerankd.ops.cpu import CPU_CLASSES

    env = {**os.environ, **CPU_CLASSES[cpu_class], "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--worker",
           json.dumps([family, model_dir, precision, args.docs, args.rounds])]  # fmt: skip
    _log(f"{cpu_class} {family} {precision} ...")
    try:
        done = subprocess.run(
            cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"cpu_class": cpu_class, "family": family, "precision": precision,
                "error": f"timed out after {WORKER_TIMEOUT_S}s"}  # fmt: skip
    if done.returncode != 0:
        return {"cpu_class": cpu_class, "family": family, "precision": precision,
                "error": done.stderr[-2000:]}  # fmt: skip
    return {"cpu_class": cpu_class, **json.loads(done.stdout.strip().splitlines()[-1])}


def verdict(row: dict) -> str:
    if "error" in row or not row.get("compiled"):
        return "n/a"
    return "on" if row["median_ratio"] >= PAYS_AT else "off"


def report(rows: list[dict]) -> None:
    print(f"\n{'class':6} {'model':8} {'precision':9} {'engine dtype':34} {'on d/s':>7} "
          f"{'off d/s':>7} {'paired off/on':>22} {'median':>6} verdict")  # fmt: skip
    for row in rows:
        if "error" in row or not row.get("compiled"):
            print(f"{row['cpu_class']:6} {row['family']:8} {row['precision']:9} "
                  f"{row.get('error', 'compile refused')[-200:]}")  # fmt: skip
            continue
        ratios = " ".join(f"{x:.2f}" for x in row["paired_ratios"])
        print(f"{row['cpu_class']:6} {row['family']:8} {row['precision']:9} "
              f"{row['engine_dtype'][:34]:34} {row['docs_per_s']['on']:7.2f} "
              f"{row['docs_per_s']['off']:7.2f} {ratios:>22} {row['median_ratio']:6.2f} "
              f"{verdict(row)}")  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """docs/benchmarks.md's decision table (the rows `rerankd.engine.compile_policy` reads):
    class, model, activation dtype, linears, docs/s compiled and eager, paired speedups."""
    lines = [
        "| CPU class | model | activations | linears | compiled docs/s | eager docs/s "
        "| paired speedups | median | auto |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            continue
        dtype = row["engine_dtype"]
        activations = dtype.split("(")[1].split()[0] if "(" in dtype else dtype
        cells = [row["cpu_class"], row["family"], activations]
        cells.append("int8" if row["precision"].startswith("int8") else activations)
        if row["compiled"]:
            rates = row["docs_per_s"]
            ratios = ", ".join(f"{x:.2f}" for x in row["paired_ratios"])
            cells += [f"{rates['on']:.2f}", f"{rates['off']:.2f}", ratios]
            cells += [f"{row['median_ratio']:.2f}", f"**{verdict(row)}**"]
        else:  # rerankd's own check refused the compiled kernels: it runs eager anyway
            why = "; ".join(row.get("warnings") or ["compiling failed"])
            cells += ["—", "—", f"refused at start-up: {why}", "—", "**off**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default=",".join(CLASSES), help="comma-separated CPU classes")
    p.add_argument("--families", default=",".join(FAMILIES), help="decoder,encoder,listwise")
    p.add_argument("--precisions", default="", help="only these (default: per class)")
    p.add_argument("--docs", type=int, default=16, help="documents per request (16)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds per model (3)")
    p.add_argument("--encoder-layers", type=int, default=6, help="XLM-R layers of 24 (6)")
    p.add_argument("--listwise-layers", type=int, default=7, help="jina-v3 layers of 28 (7)")
    p.add_argument("--json", type=Path, help="append each result as a JSON line here")
    p.add_argument("--table", nargs="+", type=Path, help="only print the docs table of these")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))), flush=True)
        return 0
    if args.table:
        rows = [json.loads(line) for path in args.table for line in path.read_text().splitlines()]
        print(markdown(rows))
        return 0
    families = args.families.split(",")
    dirs = _model_dirs(families, args.encoder_layers, args.listwise_layers)
    wanted = set(args.precisions.split(",")) - {""}
    rows = []
    for cpu_class in args.classes.split(","):
        for family in families:
            table = LISTWISE_PRECISIONS if family == "listwise" else PRECISIONS
            for precision in table[cpu_class]:
                if wanted and precision not in wanted:
                    continue
                row = run_one(cpu_class, family, dirs[family], precision, args)
                row.update(docs=args.docs, rounds=args.rounds, loadavg=os.getloadavg())
                if family == "encoder":
                    row["encoder_layers"] = args.encoder_layers
                if family == "listwise":
                    row["listwise_layers"] = args.listwise_layers
                rows.append(row)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                report(rows[-1:])
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
