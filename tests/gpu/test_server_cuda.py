"""The whole server on CUDA (needs fastapi and uvicorn: on the GPU machine from the device
kit, `scripts/device_check.sh`). Imported only inside the test, so collection never needs
them; on a CUDA machine without them the test fails (a kit that did not install must not
pass as a skip)."""

from __future__ import annotations

import httpx
import pytest

from rerankd.types import Batch
from tests.loaded import loaded_fixture

pytestmark = pytest.mark.gpu

DOCUMENTS = [
    "Beijing is the capital of China.",
    "Gravity attracts mass.",
    "Paris, France",
    "the capital of china is beijing " * 20,
]


def test_server_reranks_on_cuda(start_server, qwen3_dir):
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401

    # the reference: the same fixture in float32 on CPU, in process
    cpu = loaded_fixture("qwen3", 512)
    pairs = cpu.recipe.encode(["capital of china?"] * len(DOCUMENTS), DOCUMENTS)
    expected = [cpu.recipe.activate(raw) for raw in cpu.scheduler.engine.score(Batch(pairs))]
    with start_server("--model", str(qwen3_dir), "--device", "cuda", "--dtype", "bfloat16") as url:
        response = httpx.post(
            f"{url}/v1/rerank",
            json={"query": "capital of china?", "documents": DOCUMENTS},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
        got = {r["index"]: r["relevance_score"] for r in results}
        for index, score in enumerate(expected):
            assert got[index] == pytest.approx(score, abs=2e-2), (index, got, expected)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        assert model["device"].startswith("cuda") and model["dtype"] == "bfloat16", model
        # a fused kernel, never per-sequence SDPA (its math kernel with a prefix and GQA)
        assert model["attention"] and model["attention"] != "sdpa (per sequence)", model
