"""A loopback HTTP proxy that forwards to a rerankd and records every exchange.

The client libraries talk to this proxy as if it were the server; it changes nothing in
either direction. Each exchange is filed under the probe that announced itself last
(`POST /__probe__/NAME`, sent by tests/clients/probes.py before each probe, not by the
library), so a failing test can show exactly what the library sent and got back.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

#: hop-by-hop or recomputed headers, never forwarded
_DROP = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "accept-encoding",
    "content-encoding",
}
ANNOUNCE = "/__probe__/"


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:2000].decode("utf-8", "replace")


def _shorten(value: Any) -> Any:
    """`value` with every string over 100 characters cut, for readable failure messages."""
    if isinstance(value, str) and len(value) > 100:
        return f"{value[:60]}...({len(value)} chars)"
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    return value


@dataclass
class Exchange:
    probe: str
    server: str
    method: str
    path: str
    request: Any
    status: int
    response: Any

    def describe(self) -> str:
        request = json.dumps(_shorten(self.request), ensure_ascii=False)[:2000]
        response = json.dumps(_shorten(self.response), ensure_ascii=False)[:2000]
        return (
            f"  {self.method} {self.path} ({self.server} server)\n"
            f"    sent: {request}\n    got {self.status}: {response}"
        )


@dataclass
class Recorder:
    """Shared by the proxies of one test session: the probe now running and the log."""

    current: str = "(none)"
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, probe: str) -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges if e.probe == probe]


class RecordingProxy:
    """Listens on a free loopback port; `url` is what the libraries are given."""

    def __init__(self, upstream: str, recorder: Recorder, label: str, port: int) -> None:
        self.upstream, self.recorder, self.label = upstream.rstrip("/"), recorder, label
        self._client = httpx.Client(base_url=self.upstream, timeout=300)
        handler = self._handler()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"proxy-{label}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                if self.path.startswith(ANNOUNCE):
                    with proxy.recorder.lock:
                        proxy.recorder.current = self.path[len(ANNOUNCE) :]
                    self._reply(204, [], b"")
                    return
                headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _DROP]
                try:
                    upstream = proxy._client.request(
                        self.command, self.path, content=body, headers=headers
                    )
                except httpx.HTTPError as exc:
                    self._reply(502, [("Content-Type", "text/plain")], repr(exc).encode())
                    return
                content = upstream.content
                with proxy.recorder.lock:
                    proxy.recorder.exchanges.append(
                        Exchange(
                            probe=proxy.recorder.current,
                            server=proxy.label,
                            method=self.command,
                            path=self.path,
                            request=_decode(body) if body else None,
                            status=upstream.status_code,
                            response=_decode(content),
                        )
                    )
                kept = [(k, v) for k, v in upstream.headers.multi_items() if k.lower() not in _DROP]
                self._reply(upstream.status_code, kept, content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        return Handler
