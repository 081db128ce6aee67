"""Engines turn a `Batch` of token ids into raw scores. They never see text or HTTP."""

from rerankd.engine.base import Engine, resolve_device, resolve_dtype

__all__ = ["Engine", "resolve_device", "resolve_dtype"]
