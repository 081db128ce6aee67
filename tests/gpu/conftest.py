"""GPU tests: marked `gpu` (run with `pytest -m gpu`), skipped without CUDA.

Collectable with only what the GPU machine has (torch, transformers, tokenizers, safetensors,
httpx, prometheus-client, pytest): nothing here imports fastapi, uvicorn, pydantic or orjson
at collection time (tests/test_device_check.py checks it with those modules blocked).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items) -> None:
    """Skip this folder's tests (each module is marked `gpu`) where torch sees no CUDA."""
    if torch.cuda.is_available():
        return
    here = config.rootpath / "tests" / "gpu"
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)
