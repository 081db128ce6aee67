"""Run the HTTP server: load the model (failing fast with a clear message), then uvicorn.

Shutdown is a drain: the first SIGTERM/SIGINT turns /health and new requests to 503 while
in-flight requests finish, up to --drain-timeout. Requests still running then are answered
with a 503 JSON error (`RerankService.abort_in_flight`), and the process exits 0 within
about a second after that, even if the engine is still inside a batch (its thread is not
waited for: nobody is left to read its result). A second signal exits at once.

SIGHUP re-reads --api-key-file (plus --api-key) and swaps the accepted keys without a
restart; a file that cannot be read or holds no key leaves the old keys in place. Without a
key file SIGHUP is ignored. It never stops the server.

The HTTP protocol is uvicorn's httptools with rerankd's connection limits
(rerankd.http_server): head size, head and body deadlines, keep-alive, connection cap.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import uvicorn

from rerankd.api import build_app
from rerankd.api.auth import APIKeys
from rerankd.http_server import ConnectionLimits, GuardedConfig
from rerankd.runtime import build_service
from rerankd.service import RerankService
from rerankd.settings import Settings

log = logging.getLogger(__name__)

#: after the drain timeout aborts the requests still in flight, how long their 503s get
#: to be written before the server stops
ABORT_GRACE_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal first drains the service, then aborts what is left."""

    def __init__(
        self, config: uvicorn.Config, service: RerankService, drain_timeout: float
    ) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self._drain_deadline: float | None = None
        self._aborted_at: float | None = None

    @property
    def aborted(self) -> bool:
        """Whether the drain timed out and requests were answered with 503."""
        return self._aborted_at is not None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's _captured_signals: re-raising the signal after a clean
        # drain would turn exit code 0 into "killed by SIGTERM".
        if self._drain_deadline is not None:
            log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        log.info(
            "%s: draining (%d requests in flight, up to %gs)",
            signal.Signals(sig).name,
            self.service.in_flight,
            self.drain_timeout,
        )
        self.service.begin_drain()
        self._drain_deadline = time.monotonic() + self.drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None:
            now = time.monotonic()
            if self.service.in_flight == 0:
                return True
            if self._aborted_at is None and now > self._drain_deadline:
                aborted = self.service.abort_in_flight()
                log.warning(
                    "drain timeout (%gs): answering %d requests still in flight with 503",
                    self.drain_timeout,
                    aborted,
                )
                self._aborted_at = now
            if self._aborted_at is not None and now > self._aborted_at + ABORT_GRACE_S:
                return True
        return await super().on_tick(counter)


class KeyReloader:
    """SIGHUP handler: re-read the API keys into the app's `APIKeys` store."""

    def __init__(self, settings: Settings, keys: APIKeys) -> None:
        self.settings = settings
        self.keys = keys

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        self.reload()

    def reload(self) -> bool:
        """True if the keys were swapped; never raises (a bad file keeps the old keys)."""
        if not self.settings.api_key_file:
            log.info("SIGHUP ignored: no --api-key-file to reload")
            return False
        try:
            keys = self.settings.all_api_keys()
        except Exception as exc:  # unreadable, or no key in it: keep serving with the old set
            log.error("SIGHUP: keeping the %d current API keys: %s", len(self.keys), exc)
            return False
        if not keys:
            log.error("SIGHUP: keeping the %d current API keys: no key found", len(self.keys))
            return False
        self.keys.replace(keys)
        log.info("SIGHUP: reloaded %s: %d API keys", self.settings.api_key_file, len(self.keys))
        return True


def configure_access_log() -> None:
    """Access records go to stdout as bare JSON lines, one per request."""
    access = logging.getLogger("rerankd.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def _engine_threads_busy() -> bool:
    return any(t.name.startswith("rerankd-engine") and t.is_alive() for t in threading.enumerate())


def _exit_now(code: int) -> None:
    """Exit without joining the engine thread (still inside a batch nobody waits for)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(settings: Settings) -> int:
    keys = APIKeys(settings.all_api_keys())
    try:
        limits = ConnectionLimits.from_settings(settings)
    except ValueError as exc:  # a usage error, like cli's other checks
        print(f"rerankd: cannot start: {exc}", file=sys.stderr)
        return 2
    # before the model loads, so that a SIGHUP during start-up cannot kill the process
    reloader = KeyReloader(settings, keys)
    previous_hup = signal.signal(signal.SIGHUP, reloader)
    try:
        if settings.access_log:
            configure_access_log()
        service = build_service(settings)
        app = build_app(settings, service, api_keys=keys)
        if keys.enabled:
            log.info(
                "API keys required on every route but /health and /version (%d keys)", len(keys)
            )
        config = GuardedConfig(
            app,
            limits,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,  # ours is structured and carries the request id
            # the drain itself happens before uvicorn's shutdown (DrainingServer.on_tick);
            # this only bounds the wait for responses still being written after it
            timeout_graceful_shutdown=2,
        )
        server = DrainingServer(config, service, settings.drain_timeout)
        server.run()
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
    if (server.aborted or server.force_exit) and _engine_threads_busy():
        log.warning("exiting while the engine is still inside a batch nobody waits for")
        _exit_now(0)
    return 0
