"""Fault injection for tests (`--fault-injection`): never enabled unless asked for.

Wraps any engine. Comma-separated directives:
- ``raise-on:TEXT``  a batch holding a pair whose ids contain TEXT's ids raises RuntimeError
- ``oom-above:N``    a sub-batch of more than N items (pairs; sequences for the embedding
                     engine) raises torch.OutOfMemoryError from the engine's `forward`, the
                     public seam every engine runs through `split_on_oom` (so the split is
                     exercised for real)
- ``delay:SECONDS``  every batch sleeps first (for timeout, overload and drain tests)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from rerankd.types import Batch

T = TypeVar("T")


@dataclass
class FaultPlan:
    raise_on: list[tuple[int, ...]]
    oom_above: int | None = None
    delay_s: float = 0.0

    @classmethod
    def parse(cls, spec: str, encode: Callable[[str], list[int]]) -> FaultPlan:
        plan = cls(raise_on=[])
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, value = item.partition(":")
            if kind == "raise-on":
                plan.raise_on.append(tuple(encode(value)))
            elif kind == "oom-above":
                plan.oom_above = int(value)
            elif kind == "delay":
                plan.delay_s = float(value)
            else:
                raise ValueError(f"unknown fault directive {item!r}")
        return plan


def _contains(haystack: tuple[int, ...], needle: tuple[int, ...]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _oom_above(forward: Callable[..., T], limit: int) -> Callable[..., T]:
    """`forward(items, groups)` that runs out of memory on more than `limit` items."""

    def forward_or_oom(items: Sequence[object], groups: list[int] | None) -> T:
        if len(items) > limit:
            raise torch.OutOfMemoryError(f"injected: {len(items)} items > {limit}")
        return forward(items, groups)

    return forward_or_oom


class FaultInjectingEngine:
    """Delegates to `engine`, failing as the plan says."""

    def __init__(self, engine, plan: FaultPlan) -> None:
        self.engine = engine
        self.plan = plan
        self.name = f"{engine.name}+faults"
        self.device, self.dtype = engine.device, engine.dtype
        self.default_batch_tokens = engine.default_batch_tokens
        if plan.oom_above is not None:
            engine.forward = _oom_above(engine.forward, plan.oom_above)

    def score(self, batch: Batch) -> list[float]:
        if self.plan.delay_s:
            time.sleep(self.plan.delay_s)
        for pair in batch.pairs:
            for needle in self.plan.raise_on:
                if _contains(pair.input_ids, needle):
                    raise RuntimeError("injected engine failure")
        return self.engine.score(batch)
