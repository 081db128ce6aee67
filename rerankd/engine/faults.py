"""Fault injection for tests (`--fault-injection`): never enabled unless asked for.

Wraps any engine. Comma-separated directives:
- ``raise-on:TEXT``  a batch holding a pair whose ids contain TEXT's ids raises RuntimeError
- ``oom-above:N``    a batch of more than N pairs raises torch.OutOfMemoryError *inside* the
                     engine's split-and-retry path (so the split is exercised for real)
- ``delay:SECONDS``  every batch sleeps first (for timeout, overload and drain tests)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rerankd.types import Batch, EncodedPair


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


class FaultInjectingEngine:
    """Delegates to `engine`, failing as the plan says."""

    def __init__(self, engine, plan: FaultPlan) -> None:
        self.engine = engine
        self.plan = plan
        self.name = f"{engine.name}+faults"
        self.device, self.dtype = engine.device, engine.dtype
        self.default_batch_tokens = engine.default_batch_tokens
        if plan.oom_above is not None and hasattr(engine, "_forward"):
            inner = engine._forward

            def forward_or_oom(pairs: list[EncodedPair], *args):  # same signature as _forward
                if len(pairs) > plan.oom_above:
                    raise torch.OutOfMemoryError(f"injected: {len(pairs)} pairs > {plan.oom_above}")
                return inner(pairs, *args)

            engine._forward = forward_or_oom

    def score(self, batch: Batch) -> list[float]:
        if self.plan.delay_s:
            time.sleep(self.plan.delay_s)
        for pair in batch.pairs:
            for needle in self.plan.raise_on:
                if _contains(pair.input_ids, needle):
                    raise RuntimeError("injected engine failure")
        return self.engine.score(batch)
