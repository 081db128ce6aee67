"""`--compile auto`: where compiling the per-token kernels was measured to pay.

The packed models run the work around their GEMMs and attention (norms, RoPE, residuals,
activations, int8 input quantization) eager or `torch.compile`d. Whether the compiled
kernels are faster depends on the CPU's instruction sets, the model family and the
precision, so `auto` reads a table measured per CPU class by `benchmarks/bench_compile.py`
(docs/benchmarks.md, "--compile auto, per CPU class"), and on CUDA a table measured on the
GPU machine (`CUDA_MEASURED`). What the tables do not list (fp16, a CPU class not measured,
CUDA encoders) runs eager: compiling costs start-up time and a C++ compiler,
so it is chosen only where a measurement showed a gain. `on`/`off` force either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rerankd.models.decoder import DecoderReranker
from rerankd.models.encoder import Encoder
from rerankd.models.minicpm import LayerwiseReranker
from rerankd.ops.cpu import cpu_flags

#: (CPU class, model family, activation dtype, int8 linears) -> compile. The comment is the
#: median paired speedup of compiled over eager (eager time / compiled time, 3 rounds; the
#: rows measured later say theirs) of `benchmarks/bench_compile.py --docs 8` on a shared
#: 2-core Xeon with AMX, the avx512-vnni and avx2 classes emulated on it
#: (`rerankd.ops.cpu.CPU_CLASSES`), zen4 on a real 2-core AMD EPYC Zen 4; compiled at >= 1.05
#: (`bench_compile.PAYS_AT`).
MEASURED: dict[tuple[str, str, str, bool], bool] = {
    # Intel Xeon with AMX (Sapphire Rapids and later)
    ("amx", "decoder", "bfloat16", False): True,  # 1.22
    ("amx", "decoder", "float32", False): True,  # 1.58
    ("amx", "decoder", "bfloat16", True): True,  # 1.95
    ("amx", "decoder", "float32", True): False,  # 0.94
    ("amx", "encoder", "bfloat16", False): False,  # 0.92
    ("amx", "encoder", "float32", False): False,  # 0.97
    ("amx", "encoder", "bfloat16", True): True,  # 1.44
    ("amx", "encoder", "float32", True): True,  # 1.05
    # AVX512-BF16 + VNNI without AMX (AMD EPYC Zen 4/5, Cooper Lake): measured on a real
    # 2-core AMD EPYC Zen 4, 2026-12-05, quiet; the float32 rows are the median over the
    # paired rounds of two runs (3 + 5 rounds). The emulated rows they replace (2026-12-04)
    # had decoder float32 off (1.04), encoder float32 on (1.44), encoder int8-float32 off (0.96)
    ("zen4", "decoder", "bfloat16", False): True,  # 1.12
    ("zen4", "decoder", "float32", False): True,  # 1.07 (1.07, 1.09)
    ("zen4", "decoder", "bfloat16", True): True,  # 1.31
    ("zen4", "decoder", "float32", True): True,  # 1.23 (1.25, 1.22)
    ("zen4", "encoder", "bfloat16", False): False,  # 0.98
    ("zen4", "encoder", "float32", False): False,  # 1.00 (0.99, 1.01)
    ("zen4", "encoder", "bfloat16", True): True,  # 1.06
    ("zen4", "encoder", "float32", True): True,  # 1.06 (1.08, 1.06)
    # AVX512-VNNI without BF16 (Cascade Lake, Ice Lake server), emulated, 2026-12-04: float32
    # activations (`--dtype auto`), int8 on rerankd's brgemm kernel; median over the paired
    # rounds of two runs (3 + 5 rounds, load 2.5-6; each run's median in brackets)
    ("avx512-vnni", "decoder", "float32", False): True,  # 1.10 (1.33, 1.09)
    # run 2 only: in run 1 (1.43) the kernel failed to build (a tree mid-edit), another path ran
    ("avx512-vnni", "decoder", "float32", True): True,  # 1.36
    ("avx512-vnni", "encoder", "float32", False): False,  # 1.00 (0.98, 1.02)
    ("avx512-vnni", "encoder", "float32", True): True,  # 1.18 (1.16, 1.21)
    # AVX2 only, emulated (float32 activations; int8 is torch.ao's dynamic quantization)
    ("avx2", "decoder", "float32", True): False,  # 0.88
    ("avx2", "encoder", "float32", True): False,  # 0.98
    # float32 re-measured 2026-12-04 (5 rounds, load 5-8, a second run to confirm) once
    # Inductor's cache was keyed by ISA (ops/compile_cache.py): held eager before, the
    # compiled scores were NaN / 0.15 off; now within 1.8e-6 / 4.0e-7 of eager
    ("avx2", "decoder", "float32", False): True,  # 1.19 (second run 1.28)
    ("avx2", "encoder", "float32", False): True,  # 1.33 (second run 1.07)
}

#: The listwise engine (engine/listwise.py: jina-reranker-v3, our decoder's per-token work on
#: window prompts, SDPA, no int8): its own rows, measured as `MEASURED` is but with the
#: jina-reranker-v3 shape (`bench_compile.py --families listwise --listwise-layers 7 --docs 8`,
#: 7 of 28 layers; one window per request), 2026-12-04, load 2-8, avx2 emulated; zen4
#: re-measured on a real 2-core AMD EPYC Zen 4, 2026-12-05, two runs of 5 rounds, load 1.2-1.7
#: (the emulated medians were 1.09 and 1.12: the same decisions).
#: The comment is the median over all paired rounds of 2-3 runs (each run's median in
#: brackets); compiled at >= 1.05, as above.
LISTWISE = "listwise"
LISTWISE_MEASURED: dict[tuple[str, str, str, bool], bool] = {
    ("amx", LISTWISE, "bfloat16", False): True,  # 1.36 (1.31, 1.40)
    ("amx", LISTWISE, "float32", False): True,  # 1.10 (1.21, 1.09)
    ("zen4", LISTWISE, "bfloat16", False): True,  # 1.085 (1.08, 1.09)
    # near the threshold: 2 of 10 rounds at 1.00, none below
    ("zen4", LISTWISE, "float32", False): True,  # 1.055 (1.03, 1.06)
    ("avx512-vnni", LISTWISE, "float32", False): True,  # 1.10 (1.11, 1.09)
    # no gain shown: 5 of 13 rounds < 1, the quietest run (load 2.5) 0.88, a same-request
    # recheck at load 1.2 0.58; the pooled 1.06 is the threshold, not a resolved gain: eager
    ("avx2", LISTWISE, "float32", False): False,  # 1.06 (1.13, 1.06, 0.88)
}
_DECISIONS = {**MEASURED, **LISTWISE_MEASURED}

#: CUDA: (model family, activation dtype, int8 linears) -> compile, measured on the GPU
#: machine (one H200, torch 2.11, `benchmarks/profile_gpu.py --compile-only` in
#: scripts/device_check.sh; docs/benchmarks.md "W-GPU"): one W-GPU request (1 x 100
#: documents, Qwen3-Reranker-0.6B shape), eager vs compiled per-token work, 5 timed requests
#: each. What is not listed (encoders, fp16, fp8) runs eager under `auto`.
CUDA_MEASURED: dict[tuple[str, str, bool], bool] = {
    # 1.15 (623.5 -> 714.7 docs/s) and 1.17 (704.1 -> 823.3) in two device runs, 2026-12-04
    ("decoder", "bfloat16", False): True,
}

#: CUDA graphs of the decoder's forward (engine/cuda_graphs.py) under `--cuda-graphs auto`:
#: (model family, activation dtype, int8 linears) -> capture, measured like `CUDA_MEASURED`
#: (W-GPU with and without graphs, `benchmarks/bench_gpu.py`). Empty until a device run
#: measures them: `auto` runs without graphs, `on` captures them (each checked against
#: the uncaptured forward at start-up).
CUDA_GRAPHS_MEASURED: dict[tuple[str, str, bool], bool] = {}


def graphs_pay(family: str, dtype: torch.dtype, quantized: bool) -> bool:
    """Whether `--cuda-graphs auto` captures graphs for this model on CUDA
    (`CUDA_GRAPHS_MEASURED`)."""
    name = str(dtype).removeprefix("torch.")
    return CUDA_GRAPHS_MEASURED.get((family, name, quantized), False)


def cpu_class(flags: set[str] | None = None) -> str:
    """This CPU's class, named as in `rerankd.ops.cpu.CPU_CLASSES`, from rerankd's CPU flags
    (`RERANKD_CPU_FLAGS` overrides /proc/cpuinfo): "amx", "zen4" (AVX512-BF16, no AMX),
    "avx512-vnni", "avx2", or "other" (no AVX2, or flags unreadable, e.g. not x86)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "zen4"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx2" in flags:
        return "avx2"
    return "other"


def model_family(model: nn.Module) -> str:
    """Which per-token kernels a packed model runs: the encoder's (BERT / XLM-R), the
    decoder's (Qwen3, Qwen2, Gemma, the MiniCPM layerwise model), or "other" (not in the
    table: eager under `auto`)."""
    if isinstance(model, Encoder):
        return "encoder"
    if isinstance(model, DecoderReranker | LayerwiseReranker):
        return "decoder"
    return "other"


def compile_pays(
    cpu: str, family: str, dtype: torch.dtype, quantized: bool, device: torch.device
) -> bool:
    """Whether `--compile auto` compiles: on CPU where `MEASURED` (or, for the listwise
    engine's family `LISTWISE`, `LISTWISE_MEASURED`) says so for this CPU class, on CUDA
    where `CUDA_MEASURED` does; nowhere else."""
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return CUDA_MEASURED.get((family, name, quantized), False)
    if device.type != "cpu":
        return False
    return _DECISIONS.get((cpu, family, name, quantized), False)


def wants_compile(
    mode: str, family: str, dtype: torch.dtype, quantized: bool, device: torch.device
) -> bool:
    """`--compile MODE` for a model of `family`: `auto` compiles where `compile_pays` says
    (this CPU's class); `on`/`off` force either way. (`mode` is checked by the caller.)"""
    if mode == "auto":
        return compile_pays(cpu_class(), family, dtype, quantized, device)
    return mode == "on"


def scores_disagree(
    expected: Sequence[float] | torch.Tensor, got: Sequence[float] | torch.Tensor
) -> float:
    """The most a compiled path moves any score from eager's (max |Δ|), or infinity when
    either side has a non-finite score: compared to a tolerance, `abs(a - b) > tol` is
    False for NaN, so a compiled path scoring NaN passed as agreeing."""
    a = torch.as_tensor(expected, dtype=torch.float64).flatten()
    b = torch.as_tensor(got, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"{a.numel()} eager scores against {b.numel()} compiled ones")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return (a - b).abs().max().item() if a.numel() else 0.0
