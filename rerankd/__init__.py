"""rerankd: a fast, self-hosted reranking server with the model authors' exact recipes."""

__version__ = "0.1.0"

__all__ = ["__version__"]
