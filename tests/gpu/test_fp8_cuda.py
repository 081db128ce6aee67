"""`--quantize fp8` on CUDA: the kernel passes its start-up probe, every aligned linear of
the served model is fp8, and the tiny fixtures' scores stay within fp8 noise of bf16 on the
same GPU, with the ranking kept where bf16's scores are clearly apart. Skipped without CUDA
(conftest) or on GPUs below compute capability 8.9 (no fp8 tensor cores)."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.fixtures.paths import fixture_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="fp8 needs CUDA compute capability 8.9+",
    ),
]

FAMILIES = {"qwen3": 512, "gemma": 128, "xlmr": 128, "bert": 128}
QUERY = "what is the capital of china?"
DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "北京是中华人民共和国的首都。🎉",
    "The capital of France is Paris, a city on the Seine.",
    "yes no yes no maybe",
    "Photosynthesis turns light into chemical energy in plants.",
    "word " * 100,
]


@functools.cache
def _served(fixture: str, quantize: str):
    from rerankd.metrics import Metrics
    from rerankd.runtime import load_model
    from rerankd.settings import Settings

    settings = Settings(
        model=str(fixture_dir(fixture)),
        device="cuda",
        dtype="bfloat16",
        engine="packed",
        quantize=quantize,
        max_model_len=FAMILIES[fixture],
        compile="off",
    )
    return load_model(settings, Metrics())


def _raw(served) -> list[float]:
    from rerankd.types import Batch

    pairs = served.recipe.encode([QUERY] * len(DOCUMENTS), DOCUMENTS)
    return served.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


def test_the_fp8_kernel_passes_its_probe_in_bf16():
    from rerankd.ops.fp8 import probe_fp8

    fused, worst = probe_fp8(torch.device("cuda"), torch.bfloat16)
    # Hopper's fp8 accumulation: 0.0085-0.0104 measured on an H200 (ops/fp8.py)
    assert worst < 2.0**-5
    print(f"fp8 probe: bias in the epilogue {fused}, worst relative error {worst:.2g}")


@pytest.mark.parametrize("fixture", FAMILIES)
def test_fp8_scores_stay_close_to_bf16_and_keep_clear_rankings(fixture):
    from rerankd.ops.fp8 import Fp8Linear
    from rerankd.recipes import sigmoid

    fp8 = _served(fixture, "fp8")
    engine = fp8.scheduler.engine
    assert engine.dtype.startswith("fp8-e4m3")
    layers = [m for m in engine.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) >= 8 and all(m.qweight.is_cuda for m in layers)
    bf16, got = _raw(_served(fixture, "none")), _raw(fp8)
    worst = max(abs(a - b) for a, b in zip(bf16, got, strict=True))
    moved = max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(bf16, got, strict=True))
    print(f"{fixture}: fp8 vs bf16 max |Δ raw| {worst:.4f}, |Δ probability| {moved:.4f}")
    # tiny random fixtures are the worst case (see tests/test_fp8.py): int8's bound
    assert moved < 0.15
    for i in range(len(bf16)):
        for j in range(len(bf16)):
            if bf16[i] - bf16[j] > 2 * worst + 0.05:
                assert got[i] > got[j], (i, j, bf16, got)
