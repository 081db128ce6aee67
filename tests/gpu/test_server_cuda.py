"""The whole server on CUDA (needs fastapi and uvicorn: on the GPU machine from the device
kit, `scripts/device_check.sh`). Imported only inside the test, so collection never needs
them."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.gpu


def test_server_reranks_on_cuda(start_server, qwen3_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    documents = ["Beijing is the capital of China.", "Gravity attracts mass.", "Paris, France"]
    with start_server("--model", str(qwen3_dir), "--device", "cuda", "--dtype", "bfloat16") as url:
        response = httpx.post(
            f"{url}/v1/rerank",
            json={"query": "capital of china?", "documents": documents},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert models and models[0]["max_model_len"] > 0
