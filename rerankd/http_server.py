"""uvicorn's httptools protocol with the connection limits it lacks.

Stock uvicorn + httptools sets no limit on the request head (100 MB of headers stalled
/health for 9 s: the parser grows one header by bytes concatenation), no deadline for a head
or a body (a slowloris socket trickling a byte a second is held forever; uvicorn's keep-alive
timer is cancelled by the first byte and never re-armed) and no connection cap.

`GuardedHttpToolsProtocol` adds, per connection:

* head size: bytes received while the head is incomplete; beyond `max_header_bytes` the
  client gets a 431 JSON error and the connection is closed (checked after each read, so
  at most one socket read, 256 KiB, is parsed beyond the limit);
* head deadline: the whole head within `header_timeout` seconds, counted from the
  connection's opening for its first request and from the first byte of each later one
  (before that byte, the keep-alive timeout applies). An idle new connection is closed
  silently, a partial head gets 408 JSON;
* body deadline: the whole body within `body_timeout` seconds of the end of its head
  (a deadline, not an idle timer, so a body trickled a byte a second cannot hold it); 408
  JSON if no response started, else the connection is closed;
* a cap: a connection opened while `max_connections` are open gets a 503 JSON error with
  Retry-After and is closed (after reading what the client sent for up to a second, so
  the kernel does not reset the connection before the client has read its 503).

Why this and not h11 (uvicorn's other parser: it has a head limit but no head or body
deadline either) or another server: measured, see docs/benchmarks.md ("HTTP stack limits:
cost"); the guard costs a few timer calls per request and keeps httptools' speed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger(__name__)

#: the largest request head `max_header_bytes` may allow (the documented ceiling)
MAX_HEADER_BYTES_CEILING = 64 * 1024
#: how long a refused (over the cap) connection is read from before it is closed
REFUSED_LINGER_S = 1.0
#: the cap's warning is logged at most every 10 s
_refusals = {"next_log": 0.0}


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits (Settings: --max-header-bytes, --header-timeout,
    --body-timeout, --keep-alive-timeout, --max-connections)."""

    max_header_bytes: int = 16_384
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if not 1024 <= self.max_header_bytes <= MAX_HEADER_BYTES_CEILING:
            raise ValueError(
                f"--max-header-bytes must be between 1024 and {MAX_HEADER_BYTES_CEILING}"
            )
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_connections < 1:
            raise ValueError("--max-connections must be at least 1")

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_connections=settings.max_connections,
        )


def error_bytes(status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete `Connection: close` HTTP/1.1 response carrying rerankd's error JSON."""
    from rerankd.api.errors import error_response  # the app's own shape (one definition)

    response = error_response(status, message)
    reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(
        status, b"Service Unavailable" if status == 503 else b"Error"
    )
    headers = [
        *response.raw_headers,
        *extra_headers,
        (b"x-request-id", uuid.uuid4().hex.encode()),
        (b"connection", b"close"),
    ]
    head = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, reason, head, response.body)


class GuardedConfig(uvicorn.Config):
    """uvicorn.Config that serves with `GuardedHttpToolsProtocol` and `limits`."""

    def __init__(self, app: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs.setdefault("http", GuardedHttpToolsProtocol)
        kwargs["timeout_keep_alive"] = limits.keep_alive_timeout
        super().__init__(app, **kwargs)
        self.limits = limits


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus head size, head and body deadlines and a connection cap."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "limits", None) or ConnectionLimits()
        self._in_head = True  # no complete head since the last message (or the opening)
        self._head_bytes = 0
        self._got_bytes = False  # any byte of the current head yet
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._oversized = False  # a whole head over the limit was just parsed

    # --- deadlines ------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._responding():  # a pipelined head behind a running request: end after it
            self.cycle.keep_alive = False
            return
        if not self._got_bytes:  # a new connection that never sent anything
            self.transport.close()
            return
        log.debug(
            "closing a connection: no complete request head in %gs", self.limits.header_timeout
        )
        self._reject(
            408,
            f"the request head did not arrive within {self.limits.header_timeout:g}s "
            "(--header-timeout)",
            answer=True,
        )

    def _body_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.debug(
            "closing a connection: request body not complete in %gs", self.limits.body_timeout
        )
        self._reject(
            408,
            f"the request body did not arrive within {self.limits.body_timeout:g}s "
            "(--body-timeout)",
            answer=self.cycle is None or not self.cycle.response_started,
        )

    def _reject(self, status: int, message: str, answer: bool) -> None:
        """Write `status` as error JSON if `answer`, then close; a request being served
        sees a disconnect (its own response, if any, goes nowhere)."""
        if answer:
            self.transport.write(error_bytes(status, message))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    # --- the protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
            return
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)  # counts no more; closes itself
        now = self.loop.time()
        if now >= _refusals["next_log"]:  # a flood must not flood the log too
            _refusals["next_log"] = now + 10.0
            log.warning(
                "refusing connections: %d open (--max-connections %d)",
                len(self.connections),
                self.limits.max_connections,
            )
        self.transport.write(
            error_bytes(
                503,
                f"too many open connections (limit {self.limits.max_connections}, "
                "--max-connections); retry shortly",
                [(b"retry-after", b"1")],
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the linger ends
        counting = self._in_head
        if counting:
            self._head_bytes += len(data)
            self._got_bytes = True
        super().data_received(data)
        over = counting and self._in_head and self._head_bytes > self.limits.max_header_bytes
        if (over or self._oversized) and not self.transport.is_closing():
            log.debug(
                "closing a connection: request head over %d bytes", self.limits.max_header_bytes
            )
            self._disarm()
            self._reject(
                431,
                f"the request line and headers exceed {self.limits.max_header_bytes} bytes "
                "(--max-header-bytes)",
                answer=not self._responding(),
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._deadline is None:  # a later request: its head's clock starts now
            self._arm(self.limits.header_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        # a head that arrived whole in one read was not counted by data_received
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._oversized = True  # answered by data_received once the parser returns
            return
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._arm(self.limits.body_timeout, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if not self._oversized:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._oversized:
            return
        self._head_bytes = 0
        self._disarm()
        self._in_head = True
        self._got_bytes = False
        super().on_message_complete()
