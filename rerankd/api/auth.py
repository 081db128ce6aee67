"""Bearer-key authentication as pure ASGI middleware (runs before body parsing)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from rerankd.api.errors import error_response

#: open routes: probes for orchestrators, and the playground page (static, holds no data;
#: its own API calls send the key typed into it)
OPEN_PATHS = frozenset({"/health", "/version", "/"})


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches one of the keys (constant time)."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys if key]

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # compare against every key, always, so timing says nothing about which one matched
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization")
        if self._authorized(header):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send `Authorization: Bearer <key>`"
            if header is None
            else "invalid API key"
        )
        response = error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
