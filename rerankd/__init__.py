"""rerankd: a fast, self-hosted reranking server with the model authors' exact recipes."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    """`rerankd.Client` without importing httpx for every `import rerankd.*` (the server,
    the engine and the tests of either never need the client)."""
    if name in ("Client", "AsyncClient"):
        from rerankd import client

        return getattr(client, name)
    raise AttributeError(f"module 'rerankd' has no attribute {name!r}")
