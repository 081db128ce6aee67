"""Engines turn a `Batch` of token ids into raw scores. They never see text or HTTP."""

from rerankd.engine.base import resolve_device, resolve_dtype
from rerankd.types import Engine

__all__ = ["Engine", "resolve_device", "resolve_dtype"]
