"""Domain errors shared by the service, recipes and engine.

They carry what went wrong in the client's terms (which field, which document); the HTTP
layer alone maps them to status codes, so nothing below `api/` knows about HTTP.
"""

from __future__ import annotations


class RerankdError(Exception):
    """Base class; `param` names the request field at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RerankdError):
    """The request is well-formed JSON but cannot be served as asked (→ 400)."""


class ModelNotFound(RerankdError):
    """The request named a model this server does not serve (→ 404)."""


class Overloaded(RerankdError):
    """The queue is full; the client should retry later (→ 429)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(RerankdError):
    """The server is draining and takes no new work (→ 503)."""


class RequestTimeout(RerankdError):
    """The request took longer than the server's timeout; its work was cancelled (→ 504)."""


class InferenceFailed(RerankdError):
    """The engine failed on this request's batch; the server itself keeps serving (→ 500)."""


class ModelLoadError(RerankdError):
    """The model could not be resolved, downloaded or loaded; the server cannot start."""
