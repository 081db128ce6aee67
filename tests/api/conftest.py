"""The HTTP app in-process, over a fake engine: the real recipe (tokenizer of the tiny Qwen3
fixture), the real service and scheduler, and an engine that scores without torch work.

Fast (no subprocess, no model weights), so every HTTP behaviour can be tested here; real
server processes are kept for what needs one (tests/hardening, the browser and concurrent
connections in tests/e2e, tests/clients: signals, the TCP-level stack, the CLI process, real
client libraries).

- `make_client(**options)`: an app over a fake engine, options given directly;
- `serve_flags(*flags, env=..., engine=...)`: the app `rerankd serve FLAGS` would build
  (flags and RERANKD_* variables parsed by Settings, the app wired by rerankd.api.build_app,
  which rerankd.server.serve and the Ray replicas call too), over a fake engine;
- `serve_real(*flags)`: the same over the real engine `serve` would load (in-process: the
  model loads in this process, no server process starts).

The last two are tests/in_process.py's `served` and `served_real`, which other test files use.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from rerankd.api import create_app
from rerankd.metrics import Metrics
from rerankd.runtime import limits_of, load_recipe
from rerankd.scheduler import Scheduler
from rerankd.service import Limits, RerankService, ServedModel, aliases_for
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.in_process import serve_settings, served, served_real


class FakeEngine:
    """Scores a pair by its token ids (deterministic, distinct per text); `nan` makes every
    score NaN, as a checkpoint with a NaN weight does; `fail_over` fails any batch holding
    a pair longer than that many tokens (a poison input: the engine itself is fine);
    `delay_s` makes every batch take that long (as `--fault-injection delay:S` does)."""

    name = "fake"
    default_batch_tokens = 8192

    def __init__(
        self, nan: bool = False, fail_over: int | None = None, delay_s: float = 0.0
    ) -> None:
        self.nan = nan
        self.fail_over = fail_over
        self.delay_s = delay_s
        self.batches: list[Batch] = []

    def score(self, batch: Batch) -> list[float]:
        if self.delay_s:
            time.sleep(self.delay_s)
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


# --- the app `rerankd serve` builds, in-process ------------------------------------------------


@pytest.fixture(scope="session")
def serve_flags(qwen3_dir, qwen3_recipe) -> Callable:
    """`with serve_flags(*flags, env={...}, engine=FakeEngine(...)) as client:` the app of
    `rerankd serve --model <tiny qwen3> FLAGS` over a fake engine (client.engine)."""

    @contextmanager
    def make(
        *flags: str, env: dict[str, str] | None = None, engine: FakeEngine | None = None
    ) -> Iterator[TestClient]:
        settings = serve_settings(qwen3_dir, flags, env)
        engine = engine or FakeEngine()
        metrics = Metrics()
        names = aliases_for(settings.model, settings.served_model_name)
        scheduler = Scheduler(
            engine, metrics, names[0], settings.max_batch_tokens, settings.max_queued_tokens
        )
        model = ServedModel(names[0], qwen3_recipe, scheduler, names[1:], source=settings.model)
        service = RerankService([model], metrics, limits_of(settings))
        with served(settings, service) as client:
            client.engine = engine  # type: ignore[attr-defined]
            yield client

    return make


@pytest.fixture(scope="session")
def serve_real(qwen3_dir) -> Callable:
    """`with serve_real(*flags, model=DIR) as client:` the app of `rerankd serve --model DIR
    --dtype float32 --device cpu FLAGS` with its real engine (default: the tiny Qwen3)."""

    def make(*flags: str, model=None) -> AbstractContextManager[TestClient]:
        return served_real(model or qwen3_dir, *flags)

    return make


@pytest.fixture()
def access_log(caplog) -> Callable[[str], dict[str, Any]]:
    """`access_log(request_id)`: the JSON access-log record the app wrote for that request."""
    caplog.set_level(logging.INFO, logger="rerankd.access")

    def record(request_id: str) -> dict[str, Any]:
        for entry in caplog.records:
            if entry.name == "rerankd.access":
                fields = orjson.loads(entry.getMessage())
                if fields["request_id"] == request_id:
                    return fields
        raise AssertionError(f"no access-log line for request id {request_id}")

    return record
