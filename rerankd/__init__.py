"""rerankd: a fast, self-hosted reranking server with the model authors' exact recipes."""

__version__ = "0.1.0"

from rerankd.client import AsyncClient, Client  # noqa: E402  (needs __version__)

__all__ = ["AsyncClient", "Client", "__version__"]
