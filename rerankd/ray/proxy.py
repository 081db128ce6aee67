"""Serve's HTTP proxy, answering as rerankd does: `ServeErrorsAsJSON` turns the failures
Serve's proxy answers itself (no replica reachable, its queue full, its timeout, a replica
that died mid-request) into rerankd's JSON errors, with the app's own error shape.

It runs in Serve's proxy actor, not in a replica (rerankd.ray.serve:proxy_middlewares is
what the proxy loads); it knows nothing of models or services.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from rerankd.api.errors import error_response

log = logging.getLogger(__name__)

REPLICA_LOST = (
    "the replicas serving this request stopped before answering (they failed, were replaced "
    "or were scaled down); the request was not completed: retry it"
)


SERVE_TIMEOUT = (
    "No answer within Serve's request timeout (http_options.request_timeout_s); the request "
    "was cancelled: send fewer or shorter documents, or raise --request-timeout"
)


class ServeErrorsAsJSON:
    """ASGI middleware for Serve's HTTP proxy.

    rerankd's app answers every error in JSON; what is not JSON with a 4xx/5xx status was
    written by Serve itself (no replica reachable, its queue full, its timeout): the text
    becomes the message of a JSON error with the same status.

    Serve's own timeout (`http_options.request_timeout_s`, see
    `options.serve_http_options`) answers 408 in plain text; it becomes rerankd's timeout
    error, 504 JSON, as a slow request gets from the single-process server.

    A request whose replica died before answering gets no response at all from Serve. Every
    rerankd route is free of side effects, so it is sent again, once (`RETRIES`), with the
    same body, to whichever replica Serve picks then; if that fails too, the client gets a
    503 JSON error with Retry-After, never a half-answer. Only once: a request that itself
    kills replicas (say, one too large for the host's memory) must not take down them all.

    Also keeps one X-Request-Id header (the app's and the proxy's are equal unless the
    client sent an id the app would not echo).

    Checked when a request on a killed replica once hung in CI: nothing here waits on its
    own. An attempt ends when Serve's proxy call ends, and a retry replays the recorded body,
    then reads the client's receive as the first attempt did. The wait was Serve's: with no
    `request_timeout_s`, its proxy waits on a lost replica's response as long as the client
    does; `run` now always sets one. The flaw found on the way: the attempts shared one scope,
    which Serve edits (root_path under a route prefix); each attempt now gets a copy.
    """

    RETRIES = 1

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received: list[dict] = []  # the request's messages so far, for a second attempt
        disconnected = False

        async def recording_receive():
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.request":
                received.append(message)
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        for attempt in range(self.RETRIES + 1):
            replay = list(received)

            async def attempt_receive(replay=replay):
                return replay.pop(0) if replay else await recording_receive()

            # a fresh scope each time: Serve's proxy writes into it (root_path for a route
            # prefix), and a second attempt must not see the first one's edits
            if await self._attempt(dict(scope), attempt_receive, send):
                return
            if disconnected:
                return  # nobody is waiting for an answer
            if attempt < self.RETRIES:
                log.warning("a replica failed before answering %s; sending it again", scope["path"])
                await asyncio.sleep(0.2)
        await _send_json(send, 503, REPLICA_LOST)

    async def _attempt(self, scope, receive, send) -> bool:
        """Run the proxy once; True when the client got a response (or part of one)."""
        started = False
        rewrite: dict[str, Any] | None = None

        async def wrapped_send(message) -> None:
            nonlocal started, rewrite
            kind = message["type"]
            if kind == "http.response.start":
                headers = _one_request_id(message.get("headers") or [])
                status = int(message["status"])
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if status >= 400 and not ctype.startswith(b"application/json"):
                    rewrite = {"status": status, "headers": headers, "body": b""}
                    return
                started = True
                await send({**message, "headers": headers})
            elif kind == "http.response.body" and rewrite is not None:
                rewrite["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    text = rewrite["body"].decode("utf-8", "replace").strip()
                    status, headers = rewrite["status"], rewrite["headers"]
                    rewrite = None
                    started = True
                    if status == 408:  # Serve's request_timeout_s: rerankd's timeout answer
                        status, text = 504, f"{text} {SERVE_TIMEOUT}".strip()
                    await _send_json(send, status, text or f"HTTP {status}", headers)
            else:
                await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        except Exception:
            if started:
                raise
            log.warning("Serve's proxy failed on a request", exc_info=True)
            return False
        if not started and rewrite is not None:  # a start without its final body
            status = 504 if rewrite["status"] == 408 else rewrite["status"]
            await _send_json(send, status, SERVE_TIMEOUT if status == 504 else f"HTTP {status}")
            return True
        return started


async def _send_json(send, status: int, message: str, headers: list | None = None) -> None:
    """rerankd's JSON error (`api.errors.error_response`), keeping Serve's Retry-After."""
    retry = [(k, v) for k, v in headers or [] if k.lower() == b"retry-after"]
    if status == 503 and not retry:
        retry = [(b"retry-after", b"1")]
    response = error_response(status, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*response.raw_headers, *retry],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _one_request_id(headers) -> list:
    seen = False
    kept = []
    for key, value in headers:
        if bytes(key).lower() == b"x-request-id":
            if seen:
                continue
            seen = True
        kept.append((key, value))
    return kept
