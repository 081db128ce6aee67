"""The HTTP layer: request/response shapes, routes, errors, auth. Never imports torch."""

from rerankd.api.app import build_app, create_app

__all__ = ["build_app", "create_app"]
