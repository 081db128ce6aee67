"""The FastAPI application: routes, error handlers, auth, request metrics, OpenAPI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from rerankd import __version__
from rerankd.api import schemas
from rerankd.api.auth import APIKeyMiddleware, APIKeys
from rerankd.api.errors import install_error_handlers
from rerankd.api.middleware import (
    AccessMiddleware,
    BodyLimitMiddleware,
    JSONCORSMiddleware,
    TrailingSlashMiddleware,
    WebSocketRefusal,
)
from rerankd.api.playground import router as playground_router
from rerankd.api.routes import router
from rerankd.service import RerankService
from rerankd.settings import Settings


def create_app(
    service: RerankService,
    api_keys: APIKeys | list[str] | None = None,
    cors_origins: list[str] | None = None,
    max_request_bytes: int = 64 * 1024 * 1024,
    access_log: bool = True,
    metrics_export: Callable[[], Awaitable[bytes]] | None = None,
    document_format: str = "object",
) -> FastAPI:
    """Build the ASGI app around a ready-to-start service.

    `api_keys`: an `APIKeys` store (the server swaps its contents on SIGHUP) or a plain
    list; the store is `app.state.api_keys`. `metrics_export` answers GET /metrics instead
    of the service's own registry (on Ray: every replica's registry, merged; see
    rerankd.ray.metrics). `document_format`: "object" (default) or "string", the shape of
    `results[].document` for clients that do not say (see --rerank-document-format).
    """

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
        redirect_slashes=False,  # TrailingSlashMiddleware serves those paths instead
    )
    app.state.service = service
    app.state.metrics = service.metrics
    app.state.metrics_export = metrics_export
    app.state.document_format = document_format
    keys = api_keys if isinstance(api_keys, APIKeys) else APIKeys(api_keys or [])
    app.state.api_keys = keys
    app.include_router(router)
    app.include_router(playground_router)
    install_error_handlers(app)
    # added last = runs first: WebSocket refusal → access log/ids → trailing slash → CORS →
    # size limit → auth → routes
    app.add_middleware(APIKeyMiddleware, keys=keys)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if cors_origins:
        app.add_middleware(
            JSONCORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(TrailingSlashMiddleware)
    app.add_middleware(AccessMiddleware, metrics=service.metrics, log_requests=access_log)
    app.add_middleware(WebSocketRefusal)
    _install_openapi(app)
    return app


def build_app(
    settings: Settings,
    service: RerankService,
    api_keys: APIKeys | None = None,
    metrics_export: Callable[[], Awaitable[bytes]] | None = None,
) -> FastAPI:
    """The app as `rerankd serve` (and each Ray HTTP replica) wires it from `settings`:
    keys, CORS, body limit, access log, document format. One definition, so the tests that
    build it over a fake engine exercise the served wiring.

    `api_keys`: the store to serve (the server keeps it to swap on SIGHUP); by default
    the keys `settings` names.
    """
    return create_app(
        service,
        api_keys=api_keys if api_keys is not None else APIKeys(settings.all_api_keys()),
        cors_origins=settings.cors_origin,
        max_request_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
        metrics_export=metrics_export,
        document_format=settings.rerank_document_format,
    )


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
