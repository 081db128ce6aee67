"""/v1/models says how each model runs: device, dtype, quantization, compiled kernels and
the attention kernel, as the engine chose them at start-up (a user checking that
`--quantize int8` or `--compile auto` took effect reads it here, not in the logs)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from rerankd.api.app import create_app
from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.service import RerankService
from rerankd.settings import Settings
from tests.fixtures.paths import fixture_dir


def _listed(**flags) -> dict:
    metrics = Metrics()
    settings = Settings(model=str(fixture_dir("qwen3")), device="cpu", **flags)
    service = RerankService([load_model(settings, metrics)], metrics)
    with TestClient(create_app(service)) as client:
        (model,) = client.get("/v1/models").json()["data"]
    return model


def test_models_name_the_device_dtype_and_that_nothing_is_quantized_or_compiled():
    model = _listed(dtype="float32", compile="off")
    assert model["device"] == "cpu"
    assert model["dtype"] == "float32"
    assert model["quantization"] is None
    assert model["compiled"] is False
    assert model["attention"].startswith("sdpa")  # float32: no bf16 CPU kernel applies


@pytest.mark.parametrize("engine", ["packed", "transformers"])
def test_models_name_the_dtype_each_engine_serves(engine):
    model = _listed(dtype="bfloat16", compile="off", engine=engine)
    assert (model["device"], model["dtype"]) == ("cpu", "bfloat16")


def test_models_name_the_quantization_in_use():
    model = _listed(dtype="float32", quantize="int8", compile="off")
    assert model["quantization"] == "int8"
