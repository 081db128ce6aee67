"""Cluster-wide /metrics on Ray Serve: every live replica's counters in one answer.

Each replica keeps its own prometheus_client registry (the HTTP app's replicas count
requests, tokenization and documents; with several models, each engine replica counts its
queue, batches and inference). Serve's proxy sends a GET /metrics to one replica of its
choice, so that replica alone could only answer for itself. Instead:

* every replica pushes a snapshot of its registry (the text format) to the application's
  `MetricsHub` deployment every `PUSH_INTERVAL_S` (`MetricsPusher`, an asyncio task of the
  replica): a push needs no replica addresses, which Serve's handles do not give out;
* GET /metrics on an HTTP replica asks the hub for the snapshots younger than
  `STALE_AFTER_S` (a replica that died or was scaled down drops out by itself), puts its
  own live registry in place of its snapshot, and answers them merged (`merge`): each sample
  gets a `replica` label naming the replica that counted it, each metric's HELP and TYPE
  appear once. `sum without (replica) (...)` gives the cluster's totals.

Another replica's samples are at most `PUSH_INTERVAL_S` old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 2.0
#: a snapshot this old belongs to a replica that stopped pushing: it died or was removed
STALE_AFTER_S = 10.0
#: how long GET /metrics waits for the hub before answering 503
HUB_TIMEOUT_S = 5.0
REPLICA_LABEL = "replica"


class MetricsHub:
    """A one-replica Serve deployment holding the latest registry snapshot of each replica.

    Held in memory only: when the hub restarts, every replica's next push refills it.
    """

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self.stale_after_s = stale_after_s
        self._snapshots: dict[str, tuple[float, str]] = {}

    async def push(self, replica: str, text: str) -> None:
        self._snapshots[replica] = (time.monotonic(), text)

    async def snapshots(self) -> dict[str, str]:
        """Replica → snapshot, for the replicas that pushed within `stale_after_s`."""
        horizon = time.monotonic() - self.stale_after_s
        for replica in [r for r, (at, _) in self._snapshots.items() if at < horizon]:
            del self._snapshots[replica]
        return {replica: text for replica, (_, text) in self._snapshots.items()}


class _Families:
    """A collector that yields already-built metric families (for `generate_latest`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge(snapshots: Mapping[str, str]) -> bytes:
    """The replicas' snapshots (text format) as one exposition, each sample labelled with
    its replica. Parsed with prometheus_client's own parser, written by its own writer."""
    families: dict[str, Metric] = {}
    for replica in sorted(snapshots):
        for family in text_string_to_metric_families(snapshots[replica]):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: replica}
                merged.samples.append(sample._replace(labels=labels))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def replica_label() -> str:
    """This Serve replica's name in the `replica` label: `deployment#id`, as Serve logs it."""
    from ray import serve

    context = serve.get_replica_context()
    return f"{context.deployment}#{context.replica_id.unique_id}"


class MetricsPusher:
    """Pushes one replica's registry to the hub, and answers /metrics for the cluster.

    Built in a replica's constructor, which Serve runs on the replica's event loop: the
    push loop is a task of that loop, as are the requests.
    """

    def __init__(self, hub: Any, registry: CollectorRegistry, replica: str) -> None:
        self.hub = hub
        self.registry = registry
        self.replica = replica
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="rerankd-metrics-push"
        )

    def _snapshot(self) -> str:
        return generate_latest(self.registry).decode()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(
                    _awaited(self.hub.push.remote(self.replica, self._snapshot())),
                    HUB_TIMEOUT_S,
                )
            except Exception as exc:  # the hub starting or restarting: the next push refills
                log.debug("metrics push failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def export(self) -> bytes:
        """GET /metrics: every live replica's registry, this one's live."""
        from rerankd.api.errors import HTTPError

        try:
            snapshots = await asyncio.wait_for(_awaited(self.hub.snapshots.remote()), HUB_TIMEOUT_S)
        except Exception as exc:
            raise HTTPError(
                503,
                "the cluster's metrics are unavailable (their hub deployment did not answer: "
                f"{type(exc).__name__}); retry shortly",
                headers={"Retry-After": "5"},
            ) from exc
        snapshots[self.replica] = self._snapshot()
        return merge(snapshots)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _awaited(response: Any) -> Any:
    """A Serve DeploymentResponse as a coroutine (for `asyncio.wait_for`), cancelled
    downstream too when the wait is."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
