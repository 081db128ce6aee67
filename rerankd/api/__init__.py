"""The HTTP layer: request/response shapes, routes, errors, auth. Never imports torch."""

from rerankd.api.app import create_app

__all__ = ["create_app"]
