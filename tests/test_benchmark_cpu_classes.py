"""`bench_cpu --cpu-classes`: one run per CPU class under that class's caps, one table.

The children are real subprocesses of a stand-in benchmark module that records the
environment it ran under, so what is checked is what a server or peer started by the real
benchmark would inherit."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_cpu
from benchmarks.cpu_classes import (
    CLASS_ENV,
    parse_classes,
    run_per_class,
    with_class_suffix,
    without_options,
)
from rerankd.ops.cpu import CPU_CLASSES, CPU_FLAGS_ENV

_STAND_IN = """
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--json") + 1]
if os.environ.get("{class_env}") == "avx2" and "--fail-avx2" in args:
    sys.exit(3)
json.dump({{"env": dict(os.environ), "argv": args}}, open(out, "w"))
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A module `fake_bench` on the children's path that writes its environment as JSON."""
    (tmp_path / "fake_bench.py").write_text(_STAND_IN.format(class_env=CLASS_ENV))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fake_bench"


def test_classes_are_parsed_in_order_without_repeats():
    assert parse_classes("zen4, amx,zen4") == ["zen4", "amx"]


@pytest.mark.parametrize("text", ["zen5", "", "amx,sapphire"])
def test_an_unknown_class_names_the_known_ones(text):
    with pytest.raises(ValueError, match="known: amx, zen4"):
        parse_classes(text)


def test_the_class_list_json_and_plot_are_not_passed_to_the_children():
    argv = ["--interleave", "--cpu-classes", "amx,zen4", "--json=x.json", "--plot", "p.png", "-q"]
    assert without_options(argv, ("--cpu-classes", "--json", "--plot")) == ["--interleave", "-q"]


def test_each_class_runs_under_its_own_caps(stand_in, monkeypatch):
    # the parent itself runs under another class's caps: none of them may leak
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 fma")
    logged: list[str] = []
    results = run_per_class(stand_in, ["--repeats", "1"], ["amx", "zen4", "avx2"], logged.append)
    assert list(results) == ["amx", "zen4", "avx2"]
    for cpu_class, got in results.items():
        env = got["env"]
        assert env[CLASS_ENV] == cpu_class
        for key, value in CPU_CLASSES[cpu_class].items():
            assert env.get(key) == value
        assert got["argv"][:2] == ["--repeats", "1"]
    assert "ONEDNN_MAX_CPU_ISA" not in results["amx"]["env"]
    assert "ATEN_CPU_CAPABILITY" not in results["zen4"]["env"]
    assert results["amx"]["env"][CPU_FLAGS_ENV] == ""
    assert results["avx2"]["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert any("zen4" in line and "AVX512_CORE_BF16" in line for line in logged)


def test_a_class_whose_run_fails_is_reported_and_the_others_kept(stand_in):
    logged: list[str] = []
    results = run_per_class(stand_in, ["--fail-avx2"], ["avx2", "zen4"], logged.append)
    assert "exited 3" in results["avx2"]["failures"]["run"]
    assert results["zen4"]["env"][CLASS_ENV] == "zen4"
    assert any("avx2" in line and "exited 3" in line for line in logged)


def test_plots_get_one_file_per_class(tmp_path):
    assert with_class_suffix(tmp_path / "cpu.png", "zen4") == tmp_path / "cpu-zen4.png"


def _class_result(rerankd: float, int8: float, vllm: float, peak: float) -> dict:
    def modes(rate):
        return {"sequential": {"docs_per_s": rate}, "concurrent": {"docs_per_s": rate * 0.9}}

    return {
        "rerankd": modes(rerankd),
        bench_cpu.INT8_KEY: {
            **modes(int8),
            "fidelity_vs_bf16": {"max_abs_score_diff": 0.02, "pairwise_order_agreement": 0.95},
        },
        "vllm": modes(vllm),
        "paired": {
            "rerankd/vllm": {"median": {"better": 1.25}},
            f"{bench_cpu.INT8_KEY}/vllm": {"median": {"better": 1.9}},
        },
        "gemm": {"peak_tflops": peak},
        "unshared_flops_per_run": 64 * 0.2e12,
        "docs_per_run": 64,
    }


def test_the_table_takes_ratios_and_rates_within_each_class(capsys):
    rows = bench_cpu.report_classes(
        {
            "amx": _class_result(8.0, 11.0, 6.0, peak=2.0),
            "zen4": {"failures": {"run": "exited 1, no results"}},
        }
    )
    amx, zen4 = rows
    assert amx["docs_per_s"] == {"rerankd": 8.0, bench_cpu.INT8_KEY: 11.0, "vllm": 6.0}
    assert amx["rerankd/vllm"] == 1.25  # the paired median, not 8 / 6
    assert amx[f"{bench_cpu.INT8_KEY}/vllm"] == 1.9
    assert amx["rerankd_of_peak"] == pytest.approx(8.0 * 0.2 / 2.0)
    assert amx["int8_pair_order"] == 0.95
    assert zen4["docs_per_s"] == {} and zen4["rerankd_of_peak"] is None
    assert math.isnan(zen4["gemm_peak_tflops"])
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "zen4 run: exited 1, no results" in text
    assert "1.25" in text and "80%" in text


def test_an_unknown_class_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        bench_cpu.parse_args(["--cpu-classes", "amx,zen5"])
    assert exited.value.code == 2
    assert "unknown CPU class zen5" in capsys.readouterr().err
