"""Every CPU class rerankd serves, tested from whatever machine runs the suite.

Each class is an environment (`rerankd.ops.cpu.CPU_CLASSES`): oneDNN's
`ONEDNN_MAX_CPU_ISA`, ATen's `ATEN_CPU_CAPABILITY`, MKL's and fbgemm's caps, and rerankd's
own `RERANKD_CPU_FLAGS`. A process started with it chooses kernels as on that class: on an
AMX Xeon the Zen 4 class must refuse oneDNN's reference int8 kernel (issue 18: the server
never became healthy there) and still serve int8 on an optimized one. Caps only lower what
a machine runs, so on a smaller machine the classes above it run as the machine itself
(still correct, no longer an emulation).

Per class, in a subprocess: bf16 and int8 scores of the tiny Qwen3 (decoder: gated MLP,
residual epilogues) and BERT (encoder: biases) fixtures against the model-card reference
(bf16 ≤ 2e-2, int8 < 0.15 on the activated score: tests/test_quantize.py), and the names of
the oneDNN kernels the int8 model really ran (none a reference kernel; none AMX below the
AMX class); then one server start (`--quantize int8`) answering a 16-document request.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import httpx
import pytest
import torch

from rerankd.ops.cpu import CPU_CLASSES, CPU_FLAGS_ENV
from tests import reference
from tests.fixtures.paths import fixture_dir

QUERY = "what is the capital of china?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。",
    "The capital of France is Paris, a city on the Seine.",
    "yes no yes no maybe",
]
#: family → (fixture, reference scorer, max_model_len)
FAMILIES = {
    "qwen3": ("qwen3", reference.qwen3_reference, 512),
    "bert": ("bert", reference.cross_encoder_reference, 128),
}
BF16_TOLERANCE = 2e-2  # docs: parity, bf16 (tests/test_parity.py)
INT8_TOLERANCE = 0.15  # tiny random fixtures are int8's worst case (tests/test_quantize.py)
WORKER_TIMEOUT_S = 300

each_class = pytest.mark.parametrize("cpu_class", list(CPU_CLASSES))


def test_rerankd_cpu_flags_replaces_cpuinfo(tmp_path, monkeypatch):
    from rerankd.engine import base
    from rerankd.ops import cpu

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k),
    )
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512f, avx512_bf16 avx512_vnni")  # a Zen 4
    assert cpu.cpu_flags() == {"avx512f", "avx512_bf16", "avx512_vnni"}
    assert cpu.cpu_supports_bf16() and not cpu.cpu_has_amx()
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2,fma")
    assert not cpu.cpu_supports_bf16()
    assert base.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setenv(CPU_FLAGS_ENV, " ")  # empty: /proc/cpuinfo's flags
    assert cpu.cpu_flags() == {"fpu", "avx512f", "avx512_bf16", "amx_bf16"}


@cache
def _reference(family: str) -> list[float]:
    fixture, scorer, max_len = FAMILIES[family]
    return [raw for _, raw in scorer(fixture_dir(fixture), QUERY, DOCUMENTS, max_length=max_len)]


@cache
def _run_worker(cpu_class: str) -> dict:
    """The worker's report for `cpu_class` (one subprocess per class, shared by its tests)."""
    fixtures = {family: str(fixture_dir(fixture)) for family, (fixture, _, _) in FAMILIES.items()}
    env = {**os.environ, **CPU_CLASSES[cpu_class]}
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_cpu_classes", json.dumps(fixtures)],
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        cwd=Path(__file__).parent.parent,
    )
    if done.returncode != 0:
        raise AssertionError(f"worker failed for {cpu_class}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@each_class
def test_the_class_is_really_emulated(cpu_class):
    report = _run_worker(cpu_class)
    int8_kernels = {name for family in FAMILIES for name in report[family]["int8_kernels"]}
    if cpu_class == "amx":
        assert report["cpu_flags_overridden"] is False
        return
    assert report["cpu_flags_overridden"] is True and "amx_bf16" not in report["cpu_flags"]
    assert not any("amx" in name for name in int8_kernels), int8_kernels
    if cpu_class == "avx2":
        assert report["aten_capability"] == "AVX2"


@each_class
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_and_int8_scores_match_the_reference(cpu_class, family):
    report = _run_worker(cpu_class)[family]
    expected = [_sigmoid(x) for x in _reference(family)]
    bf16 = [_sigmoid(x) for x in report["bfloat16"]]
    assert bf16 == pytest.approx(expected, abs=BF16_TOLERANCE)
    int8 = [_sigmoid(x) for x in report["int8"]]
    assert int8 == pytest.approx(expected, abs=INT8_TOLERANCE)
    assert report["int8"] != report["float32"]  # really a different computation


@each_class
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_never_runs_a_reference_kernel(cpu_class, family):
    report = _run_worker(cpu_class)
    choice, kernels = report["choice"], report[family]["int8_kernels"]
    assert choice["path"] in ("w8a8-brgemm", "w8a8-int8", "w8a8-uint8", "torch-ao"), choice
    assert not any(name.startswith("ref") for name in kernels + choice["implementations"])
    if choice["path"] in ("w8a8-int8", "w8a8-uint8"):
        assert kernels  # the oneDNN kernels were named, so the check above means something
    if choice["path"] == "w8a8-brgemm":  # rerankd's kernel: oneDNN's brgemm ukernels (JIT)
        assert choice["implementations"] in (
            ["brgemm:avx512_core_amx"],
            ["brgemm:avx512_core_vnni"],
        )
        # Caps only lower a machine: the AMX class has AMX only where the machine does.
        runs_on_amx = cpu_class == "amx" and "amx_bf16" in report["cpu_flags"]
        assert ("amx" in choice["implementations"][0]) == runs_on_amx, choice
    if cpu_class in ("zen4", "avx512-vnni"):
        # the configuration of issue 18: int8 activations have only the reference kernel here
        assert choice["path"] in ("w8a8-brgemm", "w8a8-uint8")
        assert any("reference kernel" in why for path, why in choice["refused"]), choice


@each_class
def test_an_int8_server_starts_and_answers_16_documents(cpu_class, start_server):
    documents = [f"document {i}: {DOCUMENTS[i % len(DOCUMENTS)]}" for i in range(16)]
    model = str(fixture_dir("qwen3"))
    with start_server("--model", model, "--quantize", "int8", env=CPU_CLASSES[cpu_class]) as url:
        response = httpx.post(
            f"{url}/v1/rerank", json={"query": QUERY, "documents": documents}, timeout=60
        )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(16))
    assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)


# --- the worker, run as `python -m tests.test_cpu_classes FIXTURES_JSON` ---------------------


def _worker(fixtures: dict[str, str]) -> dict:
    import torch

    from rerankd.metrics import Metrics
    from rerankd.ops.cpu import CPU_FLAGS_ENV, cpu_flags
    from rerankd.ops.onednn_ops import onednn_implementations
    from rerankd.ops.quantize import choose_int8
    from rerankd.runtime import load_model
    from rerankd.settings import Settings
    from rerankd.types import Batch

    report: dict = {
        "cpu_flags": sorted(cpu_flags()),
        "cpu_flags_overridden": bool(os.environ.get(CPU_FLAGS_ENV)),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for family, path in fixtures.items():
        max_len = FAMILIES[family][2]
        scores: dict = {}
        for label, dtype, quantize in (
            ("float32", "float32", "none"),
            ("bfloat16", "bfloat16", "none"),
            ("int8", "auto", "int8"),
        ):
            settings = Settings(
                model=path, dtype=dtype, quantize=quantize, compile="off", max_model_len=max_len
            )
            model = load_model(settings, Metrics())
            pairs = model.recipe.encode([QUERY] * len(DOCUMENTS), DOCUMENTS)
            batch = Batch(pairs, [0] * len(pairs))
            scores[label], kernels = onednn_implementations(
                lambda m=model, b=batch: m.scheduler.engine.score(b)
            )
            if label == "int8":
                scores["int8_kernels"] = sorted(kernels)
        report[family] = scores
    dtype = torch.bfloat16 if "avx512_bf16" in cpu_flags() else torch.float32
    choice = choose_int8(dtype)  # cached: the decision the int8 models above were built with
    report["choice"] = {
        "path": choice.path,
        "engine": choice.engine,
        "implementations": list(choice.implementations),
        "refused": [list(r) for r in choice.refused],
    }
    return report


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
