"""Tiny fixtures loaded as `rerankd serve` loads them (`Settings` → `runtime.load_model`),
once per process per setting. Imports nothing of the HTTP stack, so GPU tests use it on a
machine without fastapi/pydantic-settings' web extras."""

from __future__ import annotations

import functools
from typing import Any

from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.settings import Settings
from tests.fixtures.paths import fixture_dir


@functools.cache
def loaded_fixture(name: str, max_model_len: int, **settings: Any):
    """The tiny fixture `name` served through the packed engine (`settings` override
    `Settings`' fields; float32, CPU, SDPA and eager unless given)."""
    fields = {
        "dtype": "float32",
        "device": "cpu",
        "engine": "packed",
        "attention": "sdpa",
        "compile": "off",
        **settings,
    }
    return load_model(
        Settings(model=str(fixture_dir(name)), max_model_len=max_model_len, **fields), Metrics()
    )
