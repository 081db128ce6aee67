"""bf16 on CUDA against float32 on CPU, on the tiny fixture of every family: the engine
picks a fused attention kernel and gives the CPU's scores within bf16 noise."""

from __future__ import annotations

import functools

import pytest

from tests.fixtures.paths import fixture_dir

pytestmark = pytest.mark.gpu

FAMILIES = {"qwen3": 512, "qwen3-seq-cls": 512, "gemma": 128, "xlmr": 128, "bert": 128}
QUERY = "what is the capital of china?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。🎉",
    "The capital of France is Paris, a city on the Seine.",
    "",
    "yes no yes no maybe",
    "word " * 700,
]


@functools.cache
def _served(fixture: str, device: str, dtype: str):
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    settings = Settings(
        model=str(fixture_dir(fixture)),
        device=device,
        dtype=dtype,
        engine="packed",
        max_model_len=FAMILIES[fixture],
        compile="off",
    )
    return load_model(settings, Metrics())


def _scores(served, shared: bool) -> list[float]:
    from rerankd.recipes import sigmoid
    from rerankd.types import Batch

    pairs = served.recipe.encode([QUERY] * len(DOCUMENTS), DOCUMENTS)
    groups = [0] * len(pairs) if shared else None
    return [sigmoid(x) for x in served.scheduler.engine.score(Batch(pairs, groups))]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "unshared"])
@pytest.mark.parametrize("fixture", FAMILIES)
def test_cuda_bf16_matches_cpu_float32(fixture, shared):
    gpu = _served(fixture, "cuda", "bfloat16")
    engine = gpu.scheduler.engine
    assert engine.device.startswith("cuda") and engine.dtype == "bfloat16"
    assert engine.attention != "sdpa", f"no fused kernel passed its probe: {engine.kernel}"
    expected = _scores(_served(fixture, "cpu", "float32"), shared)
    got = _scores(gpu, shared)
    assert got == pytest.approx(expected, abs=2e-2)
    for i in range(len(expected)):  # same ranking wherever the float32 gap is clear
        for j in range(len(expected)):
            if expected[i] - expected[j] > 0.05:
                assert got[i] > got[j], (i, j)


def test_cuda_batch_budget_holds_a_whole_w_gpu_request():
    from benchmarks.bench_gpu import workload

    engine = _served("qwen3", "cuda", "bfloat16").scheduler.engine
    tokens = sum(map(len, workload(151669, 100, seed=0, doc_range=(128, 512))))
    assert tokens <= engine.default_batch_tokens
