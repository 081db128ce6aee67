"""The GPU machine's checks, rehearsed on CPU: `scripts/device_check.sh --dry-run` runs every
step with tiny shapes and writes sane results; the GPU tests collect without the packages the
GPU machine lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the GPU machine does not have (the device kit brings the server's share)
ABSENT = (
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_core",
    "orjson",
    "ray",
    "hypothesis",
)


def test_device_check_dry_run_writes_sane_results(tmp_path, qwen3_dir):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "DEVICE_CHECK_MODEL": str(qwen3_dir),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,  # the dry run's budget is 85 s
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    assert summary["elapsed_s"] <= summary["budget_s"]
    names = [s["name"] for s in summary["steps"]]
    required = {"env", "pytest-gpu", "w-gpu-0.6b", "w-gpu-graphs-0.6b", "w-gpu-4b"}
    assert required <= set(names)
    # the W-GPU runs are required; the profiles after them only take what budget is left
    optional = {s["name"] for s in summary["steps"] if s["optional"]}
    assert not optional & required and {"compile-0.6b", "profile-0.6b"} <= optional
    assert summary["optional_missed"] == []  # the dry run has time for every step
    # every GPU test collected, and skipped here (no CUDA)
    tests = summary["pytest_gpu"]
    assert tests["tests"] >= 30 and tests["skipped"] == tests["tests"], tests
    assert tests["failures"] == tests["errors"] == 0
    modules = {path.stem for path in (ROOT / "tests" / "gpu").glob("test_*.py")}
    assert {path.stem.removeprefix("junit-") for path in tmp_path.glob("junit-*.xml")} == modules
    for size in ("0.6b", "4b"):
        result = json.loads((tmp_path / f"w-gpu-{size}.json").read_text())
        assert result == summary["w_gpu"][size]
        assert result["device"] == "cpu" and result["docs"] == 8 and result["tokens"] > 8 * 16
        # the 0.6B step runs rerankd --quantize fp8 too (on CPU: the benchmark's stand-in)
        assert len(result["docs_per_s"]) == (4 if size == "0.6b" else 3)
        assert all(0 < v < 1e6 for v in result["docs_per_s"].values())
        assert bool(result["fp8"]) == (size == "0.6b")
        assert set(result["rerankd_over"]) == {
            "transformers model-card",
            "transformers best-effort",
        }
        assert result["p50_ms_1x16"] > 0 and result["kernel"]
    # CUDA graphs, paired with and without: on CPU they stay off, reported and not raised
    graphs = summary["w_gpu"]["graphs-0.6b"]
    assert graphs["device"] == "cpu" and len(graphs["docs_per_s"]) == 1
    assert graphs["rerankd_over"] == {} and graphs["p50_ms_1x16"] > 0
    assert graphs["cuda_graphs"]["mode"] == "on" and not graphs["cuda_graphs"]["on"]
    assert "they run on CUDA only" in graphs["cuda_graphs"]["warnings"][0]
    assert not summary["w_gpu"]["0.6b"]["cuda_graphs"]["on"]
    fp8 = summary["w_gpu"]["0.6b"]["fp8"]
    assert fp8["path"].startswith("stand-in, not served") and fp8["over_bf16"] > 0
    assert "fp8-e4m3" in fp8["dtype"] and fp8["fidelity"]["documents"] == 8
    # the fp8 linears really ran (scores moved), and kept the order of most document pairs
    assert 0 < fp8["fidelity"]["max_abs_raw_diff"] < 5
    assert fp8["fidelity"]["pairwise_order_agreement"] >= 0.75
    assert (tmp_path / "device_check.log").read_text().count("rc 0") >= 4
    # where a request's time goes: on CPU the engine's ops by their own time, eager and
    # compiled, and the GEMM ceiling (the device run reads kernels instead)
    profiles = summary["profiles"]
    assert {"profile-0.6b", "compile-0.6b"} <= set(profiles)
    eager = profiles["profile-0.6b"]
    assert eager["profile"]["top_cpu_ops"] and eager["gemm_ceiling"]["tflops"] > 0
    compiled = profiles["compile-0.6b"]["compiled"]
    assert compiled["compiled"] and compiled["profile"]["top_cpu_ops"]


@pytest.mark.parametrize("where", [["tests/gpu"], []], ids=["tests-gpu", "bare"])
def test_gpu_tests_collect_without_the_server_stack(tmp_path, where):
    """`pytest -m gpu` (given tests/gpu, or bare from the root: the root conftest then
    collects tests/gpu only) collects the GPU tests with fastapi, uvicorn, pydantic, orjson,
    ray and hypothesis unimportable and no third-party pytest plugins, as on the GPU machine;
    and the import trace of that collection names none of them."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        ABSENT = {ABSENT!r}

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ABSENT:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")

        sys.meta_path.insert(0, Absent())
        import pytest
        code = pytest.main(["-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", *{where!r}])
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(ABSENT))
        print("LOADED", loaded)
        sys.exit(int(code))
        """
    )
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED []" in proc.stdout
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 30 and all(line.startswith("tests/gpu/") for line in collected)
    assert any("test_server_cuda.py" in line for line in collected)
