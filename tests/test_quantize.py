"""Opt-in int8: the quantized engine really runs int8 linears, and scores stay close."""

from __future__ import annotations

import pytest

from rerankd.errors import ModelLoadError
from rerankd.metrics import Metrics
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.paths import fixture_dir

DOCS = ["Beijing is the capital of China.", "Gravity is a force.", "北京是中国的首都", "Paris is in France", "yes no"]


def _scores(name: str, quantize: str):
    model = load_model(Settings(model=str(fixture_dir(name)), dtype="float32", quantize=quantize), Metrics())
    pairs = model.recipe.encode(["capital of china"] * len(DOCS), DOCS)
    return model, model.scheduler.engine.score(Batch(pairs, [0] * len(pairs)))


@pytest.mark.parametrize("name", ["qwen3", "gemma", "xlmr", "bert"])
def test_int8_scores_stay_close_to_float32(name):
    _, exact = _scores(name, "none")
    model, quantized = _scores(name, "int8")
    assert model.scheduler.engine.dtype == "int8-dynamic"
    linears = [m for m in model.scheduler.engine.model.modules() if type(m).__name__ == "Linear"]
    assert linears and all("quantized" in type(m).__module__ for m in linears)
    assert quantized != exact  # really a different computation
    # tiny random fixtures are a worst case for int8; real models move far less
    assert max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(exact, quantized, strict=True)) < 0.15
    best = max(range(len(exact)), key=exact.__getitem__)
    runner_up = sorted(exact)[-2]
    if exact[best] - runner_up > 0.3:
        assert max(range(len(quantized)), key=quantized.__getitem__) == best


def test_int8_needs_the_packed_engine():
    settings = Settings(model=str(fixture_dir("qwen3")), quantize="int8", engine="transformers")
    with pytest.raises(ModelLoadError, match="packed engine"):
        load_model(settings, Metrics())
