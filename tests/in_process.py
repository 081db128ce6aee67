"""rerankd's app served in this process, as `rerankd serve` builds it, without a server process.

- `serve_settings(model_dir, flags, env)`: the Settings of `rerankd serve --model DIR FLAGS`
  with only `env` as the environment (never the shell's);
- `served(settings, service)`: a started TestClient over `rerankd.api.build_app` (the
  wiring `serve` uses), its lifespan running the service;
- `served_real(model_dir, *flags)`: the same over the real engine `serve` would load, float32
  on the CPU (the model loads in this process), compiled only if RERANKD_COMPILE says so;
- `AppTransport(test_client)`: an httpx transport, sync and async, that hands requests to
  that TestClient, so `rerankd.client.Client`/`AsyncClient` (and the CLI's --url mode) talk
  to the in-process app. The async side sends from a worker thread: the service runs on
  the TestClient's event loop, not on the caller's.

Tests of HTTP behaviour use this; signals, TCP-level behaviour, the CLI process and real
client libraries keep real processes (tests/harness.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import httpx
from starlette.testclient import TestClient

from rerankd.api import build_app
from rerankd.runtime import build_service
from rerankd.service import RerankService
from rerankd.settings import Settings, parse_settings

#: the flags of a float32 CPU server (after `--model DIR`), as the shared test server's
REAL_FLAGS = ("--dtype", "float32", "--device", "cpu")


def serve_settings(
    model_dir: object, flags: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Settings:
    """`serve --model MODEL FLAGS` with only `env` as the environment."""
    return parse_settings(["--model", str(model_dir), *flags], dict(env or {}))


@contextmanager
def served(settings: Settings, service: RerankService) -> Iterator[TestClient]:
    """A TestClient over the app `serve` builds; `.service` and `.settings` are attached."""
    app = build_app(settings, service)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.service = service  # type: ignore[attr-defined]
        client.settings = settings  # type: ignore[attr-defined]
        yield client


@contextmanager
def served_real(model_dir: object, *flags: str) -> Iterator[TestClient]:
    """`rerankd serve --model DIR --dtype float32 --device cpu FLAGS`, its real engine.

    RERANKD_COMPILE comes from this process's environment, as the servers tests start get
    it (tests/conftest.py: off unless the shell says otherwise: compiling costs seconds)."""
    env = {"RERANKD_COMPILE": os.environ.get("RERANKD_COMPILE", "off")}
    settings = serve_settings(model_dir, [*REAL_FLAGS, *flags], env)
    with served(settings, build_service(settings)) as client:
        yield client


class AppTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Sends each request to a started TestClient (so to the app in this process)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # re-sent as plain values: the TestClient's httpx is not necessarily the caller's
        answer = self.client.request(
            request.method,
            str(request.url),
            content=request.read(),
            headers=list(request.headers.multi_items()),
        )
        return httpx.Response(
            answer.status_code, headers=list(answer.headers.multi_items()), content=answer.content
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return await asyncio.to_thread(self.handle_request, request)
