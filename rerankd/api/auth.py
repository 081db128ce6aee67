"""Bearer-key authentication as pure ASGI middleware (runs before body parsing).

Keys live in an `APIKeys` store the server can swap at run time (SIGHUP re-reads
--api-key-file), so the middleware reads the current set on every request.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from rerankd.api.errors import error_response

#: open routes: probes for orchestrators, and the playground page (static, holds no data;
#: its own API calls send the key typed into it)
OPEN_PATHS = frozenset({"/health", "/version", "/"})


class APIKeys:
    """The set of accepted keys; empty means authentication is off (never by accident:
    Settings refuses an empty key file or an empty `--api-key`)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys: tuple[bytes, ...] = ()
        self.replace(keys)

    def replace(self, keys: Iterable[str]) -> None:
        """Swap the whole set at once (a request sees the old set or the new, never a mix)."""
        self._keys = tuple(key.encode() for key in keys if key)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, token: bytes) -> bool:
        # compare against every key, always, so timing says nothing about which one matched
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches one of the keys (constant time).

    A request with more than one Authorization header is refused: proxies and servers
    disagree on which one counts, and that disagreement is how auth gets bypassed.
    """

    def __init__(self, app: ASGIApp, keys: APIKeys | Iterable[str]) -> None:
        self.app = app
        self.keys = keys if isinstance(keys, APIKeys) else APIKeys(keys)

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return self.keys.match(token.strip())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = [value for name, value in scope.get("headers") or [] if name == b"authorization"]
        if len(headers) == 1 and self._authorized(headers[0]):
            await self.app(scope, receive, send)
            return
        if not headers:
            status, message = 401, "missing API key: send `Authorization: Bearer <key>`"
        elif len(headers) > 1:
            status, message = 400, "more than one Authorization header; send exactly one"
        else:
            status, message = 401, "invalid API key"
        response = error_response(status, message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
