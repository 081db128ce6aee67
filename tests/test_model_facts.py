"""/v1/models says how each model runs: device, dtype, quantization, compiled kernels and
the attention kernel, as the engine chose them at start-up, and whether CUDA graphs replay
now (a user checking that `--quantize int8`, `--compile auto` or `--cuda-graphs on` took
effect reads it here, not in the logs)."""

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


def test_models_say_whether_cuda_graphs_replay_now(monkeypatch):
    """Read live: graphs a failure turned off while serving are no longer listed as on.
    (On CPU through the stand-ins of tests/test_cuda_graphs.py.)"""
    from rerankd.ops import attention
    from tests.test_attention import aten_flash_2_11
    from tests.test_cuda_graphs import stand_in_capture

    monkeypatch.setattr(attention, "aten_flash_kernel", lambda: aten_flash_2_11)
    metrics = Metrics()
    settings = Settings(model=str(fixture_dir("qwen3")), device="cpu", dtype="float32")
    service = RerankService([load_model(settings, metrics)], metrics)
    engine = service.models[0].scheduler.engine
    engine.use_kernels("flash_gqa")
    assert engine.enable_graphs(capture=stand_in_capture)
    with TestClient(create_app(service)) as client:
        (model,) = client.get("/v1/models").json()["data"]
        assert model["cuda_graphs"] is True
        engine.graphs = None  # as a failed capture leaves it
        (model,) = client.get("/v1/models").json()["data"]
        assert model["cuda_graphs"] is False


def test_models_name_the_device_dtype_and_that_nothing_is_quantized_or_compiled():
    model = _listed(dtype="float32", compile="off")
    assert model["device"] == "cpu"
    assert model["dtype"] == "float32"
    assert model["quantization"] is None
    assert model["compiled"] is False
    assert model["cuda_graphs"] is False
    assert model["attention"].startswith("sdpa")  # float32: no bf16 CPU kernel applies


@pytest.mark.parametrize("engine", ["packed", "transformers"])
def test_models_name_the_dtype_each_engine_serves(engine):
    model = _listed(dtype="bfloat16", compile="off", engine=engine)
    assert (model["device"], model["dtype"]) == ("cpu", "bfloat16")


def test_models_name_the_quantization_in_use():
    model = _listed(dtype="float32", quantize="int8", compile="off")
    assert model["quantization"] == "int8"
