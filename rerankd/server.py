"""Run the HTTP server: load the model (failing fast with a clear message), then uvicorn.

Shutdown is a drain: the first SIGTERM/SIGINT turns /health and new requests to 503 while
in-flight requests finish (up to --drain-timeout), then the process exits 0. A second
signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType

import uvicorn

from rerankd.api import create_app
from rerankd.runtime import build_service
from rerankd.service import RerankService
from rerankd.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal first drains the service."""

    def __init__(
        self, config: uvicorn.Config, service: RerankService, drain_timeout: float
    ) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's _captured_signals: re-raising the signal after a clean
        # drain would turn exit code 0 into "killed by SIGTERM".
        if self._drain_deadline is not None:
            log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        log.info(
            "%s: draining (%d requests in flight, up to %.0fs)",
            signal.Signals(sig).name,
            self.service.in_flight,
            self.drain_timeout,
        )
        self.service.begin_drain()
        self._drain_deadline = time.monotonic() + self.drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None:
            if self.service.in_flight == 0:
                return True
            if time.monotonic() > self._drain_deadline:
                log.warning("drain timeout: %d requests still in flight", self.service.in_flight)
                return True
        return await super().on_tick(counter)


def _configure_access_log() -> None:
    """Access records go to stdout as bare JSON lines, one per request."""
    access = logging.getLogger("rerankd.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def serve(settings: Settings) -> int:
    api_keys = settings.all_api_keys()
    if settings.access_log:
        _configure_access_log()
    service = build_service(settings)
    app = create_app(
        service,
        api_keys=api_keys,
        cors_origins=settings.cors_origin,
        max_request_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
    )
    if api_keys:
        log.info(
            "API keys required on every route but /health and /version (%d keys)", len(api_keys)
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # ours is structured and carries the request id
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
    )
    DrainingServer(config, service, settings.drain_timeout).run()
    return 0
