"""One benchmark run over several CPU classes: a child run per class, under its caps.

A session lands on one CPU class (an AMX Xeon, an AMD EPYC Zen 4, ...), but rerankd must be
ahead on every class. `rerankd.ops.cpu.CPU_CLASSES` holds the environment that makes a
process behave like a class as far as rerankd, oneDNN, ATen, MKL and fbgemm can tell. This
module reruns a benchmark once per class with that environment, so every engine it measures
(the servers it starts inherit it; the in-process peer and the GEMM peak run in the child)
sees the class's instruction sets, and gathers the children's JSON into one report.

Ratios are only taken within a class: each child is its own interleaved run, and a capped
Xeon is not the class's chip (caches, clocks and port counts stay the Xeon's), so rates
across classes say which kernels run and roughly how they compare, not what a Zen 4 does.
A peer's own kernels may ignore the caps where they read CPUID themselves; the table's
footer says so rather than assume otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from rerankd.ops.cpu import CPU_CLASSES

#: set in each child to the class it runs as (read back into the child's machine facts)
CLASS_ENV = "RERANKD_BENCH_CPU_CLASS"


def parse_classes(text: str) -> list[str]:
    """`amx,zen4` → ["amx", "zen4"]; an unknown class is a ValueError naming the known ones."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CPU_CLASSES]
    if unknown or not classes:
        raise ValueError(
            f"unknown CPU class {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(CPU_CLASSES)}"
        )
    return list(dict.fromkeys(classes))


def without_options(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """`argv` without each of `options` and its value (`--opt value` or `--opt=value`)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def class_environment(cpu_class: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: `base` (default: this process's) without any class's caps,
    then this class's caps and name. So a parent run under a cap does not leak it into the
    other classes, and "amx" (the machine itself) runs uncapped."""
    every_cap = {key for caps in CPU_CLASSES.values() for key in caps}
    clean = {k: v for k, v in (os.environ if base is None else base).items() if k not in every_cap}
    return {**clean, **CPU_CLASSES[cpu_class], CLASS_ENV: cpu_class}


def class_caps(cpu_class: str) -> dict[str, str]:
    """The variables a class sets to a value (none for the machine's own class)."""
    return {k: v for k, v in CPU_CLASSES[cpu_class].items() if v}


def caps_text(cpu_class: str) -> str:
    """The caps a class sets, for the log."""
    caps = class_caps(cpu_class)
    return ", ".join(f"{k}={v}" for k, v in caps.items()) or "none (the machine itself)"


def with_class_suffix(path: Path, cpu_class: str) -> Path:
    """docs/benchmarks-cpu.png → docs/benchmarks-cpu-zen4.png"""
    return path.with_name(f"{path.stem}-{cpu_class}{path.suffix}")


def run_per_class(
    module: str,
    argv: Sequence[str],
    classes: Sequence[str],
    log: Callable[[str], None],
    plot: Path | None = None,
) -> dict[str, dict]:
    """Run `python -m module argv --json ...` once per class, in this order, and return
    each child's JSON by class (a child that wrote none: {"failures": {...}}). `argv` must
    not hold the options this adds (`--json`, `--plot`, the class list)."""
    results: dict[str, dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="rerankd-bench-classes-"))
    for cpu_class in classes:
        out = workdir / f"{cpu_class}.json"
        cmd = [sys.executable, "-m", module, *argv, "--json", str(out)]
        if plot is not None:
            cmd += ["--plot", str(with_class_suffix(plot, cpu_class))]
        log(f"\n######## CPU class {cpu_class}: caps {caps_text(cpu_class)} ########")
        done = subprocess.run(cmd, env=class_environment(cpu_class), check=False)
        if out.exists():
            results[cpu_class] = json.loads(out.read_text())
        else:
            results[cpu_class] = {"failures": {"run": f"exited {done.returncode}, no results"}}
            log(f"   !! class {cpu_class}: the run exited {done.returncode} without results")
    return results
