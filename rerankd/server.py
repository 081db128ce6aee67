"""Run the HTTP server: load the model (failing fast with a clear message), then uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from rerankd.api import create_app
from rerankd.runtime import build_service
from rerankd.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    service = build_service(settings)
    app = create_app(service, api_keys=settings.api_key)
    if settings.api_key:
        log.info(
            "API keys required on every route but /health and /version (%d keys)",
            len(settings.api_key),
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()
    return 0
