"""The FastAPI application: routes, error handlers, auth, request metrics, OpenAPI."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from rerankd import __version__
from rerankd.api import schemas
from rerankd.api.auth import APIKeyMiddleware
from rerankd.api.errors import install_error_handlers
from rerankd.api.routes import router
from rerankd.metrics import Metrics
from rerankd.service import RerankService


class RequestMetricsMiddleware:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            # unmatched paths share one label, so random URLs cannot blow up cardinality
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_latency.labels(path).observe(time.perf_counter() - started)


def create_app(service: RerankService, api_keys: list[str] | None = None) -> FastAPI:
    """Build the ASGI app around a ready-to-start service."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="rerankd",
        version=__version__,
        description="Fast self-hosted reranking with the model authors' exact recipes.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = service.metrics
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(APIKeyMiddleware, keys=list(api_keys or []))
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    """Describe request bodies we parse by hand (strict JSON) in the generated OpenAPI."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = default_openapi()
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for item in spec.get("paths", {}).values():
            for operation in item.values():
                names = operation.pop("x-request-model", None)
                if not names:
                    continue
                refs = []
                for name in names.split("|"):
                    model = getattr(schemas, name)
                    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                    components.update(schema.pop("$defs", {}))
                    components[name] = schema
                    refs.append({"$ref": f"#/components/schemas/{name}"})
                body_schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body_schema}},
                }
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
