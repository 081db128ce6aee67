"""The HTTP app in-process, over a fake engine: the real recipe (tokenizer of the tiny Qwen3
fixture), the real service and scheduler, and an engine that scores without torch work.

Fast (no subprocess, no model weights), so every HTTP behaviour can be tested here; the
real-server suites (tests/e2e, tests/hardening) keep the end-to-end checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.testclient import TestClient

from rerankd.api import create_app
from rerankd.metrics import Metrics
from rerankd.runtime import load_recipe
from rerankd.scheduler import Scheduler
from rerankd.service import Limits, RerankService, ServedModel, aliases_for
from rerankd.settings import Settings
from rerankd.types import Batch


class FakeEngine:
    """Scores a pair by its token ids (deterministic, distinct per text); `nan` makes every
    score NaN, as a checkpoint with a NaN weight does; `fail_over` fails any batch holding
    a pair longer than that many tokens (a poison input: the engine itself is fine)."""

    name = "fake"
    default_batch_tokens = 8192

    def __init__(self, nan: bool = False, fail_over: int | None = None) -> None:
        self.nan = nan
        self.fail_over = fail_over
        self.batches: list[Batch] = []

    def score(self, batch: Batch) -> list[float]:
        self.batches.append(batch)
        if self.fail_over is not None and max(len(p) for p in batch.pairs) > self.fail_over:
            raise RuntimeError("poison input")
        if self.nan:
            return [math.nan] * len(batch.pairs)
        return [(sum(p.input_ids) % 1000) / 100 - 5 for p in batch.pairs]


@pytest.fixture(scope="session")
def qwen3_recipe(qwen3_dir):
    return load_recipe(Settings(model=str(qwen3_dir)))[2]


@pytest.fixture(scope="session")
def make_client(qwen3_recipe) -> Callable:
    """`with make_client(**options) as client:` an app over a fake engine.

    options: served_name, limits (a Limits), nan, fail_over (see FakeEngine), and create_app's
    api_keys, cors_origins, document_format.
    """

    @contextmanager
    def make(
        served_name: str = "tiny-qwen3",
        limits: Limits | None = None,
        nan: bool = False,
        fail_over: int | None = None,
        **app_options: Any,
    ) -> Iterator[TestClient]:
        metrics = Metrics()
        engine = FakeEngine(nan=nan, fail_over=fail_over)
        names = aliases_for("/models/tiny-qwen3", [served_name])
        model = ServedModel(names[0], qwen3_recipe, Scheduler(engine, metrics, names[0]), names[1:])
        service = RerankService([model], metrics, limits or Limits())
        app = create_app(service, **app_options)
        with TestClient(app, raise_server_exceptions=False) as client:
            client.engine = engine  # type: ignore[attr-defined]
            client.service = service  # type: ignore[attr-defined]
            yield client

    return make


@pytest.fixture()
def client(make_client) -> Iterator[TestClient]:
    with make_client() as c:
        yield c
