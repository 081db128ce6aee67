"""Draining on Ray: `rerankd serve --ray` tells every HTTP replica, through Ray's key-value
store, to drain as the single process does on SIGTERM, then waits until each says it is done.

Two sides of one protocol: `DrainWatcher` runs in each HTTP replica; `request_drain`,
`wait_drained` and `forget` run in `run`'s driver (rerankd.ray.serve).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from rerankd.ray.options import APP_NAME, DEPLOYMENT_NAME

log = logging.getLogger(__name__)

#: namespace of the drain keys in Ray's internal key-value store (held by the GCS)
DRAIN_NAMESPACE = "rerankd"
#: how often a replica looks for its drain key
DRAIN_POLL_S = 0.5
#: after the drain timeout aborts what is still in flight, how long its 503s get
ABORT_GRACE_S = 1.0


def _kv() -> Any:
    # private but stable since Ray 1.x; Serve keeps its own checkpoints there
    from ray.experimental import internal_kv

    return internal_kv


class DrainWatcher:
    """The single process's drain, in each HTTP replica of a `rerankd serve --ray` run.

    `run` writes the drain timeout under `drain_key` on the first SIGTERM/SIGINT. Each
    replica polls for it (every `DRAIN_POLL_S`); once there, the replica drains as one
    process does: /health and new requests get 503, in-flight requests go on until the
    drain timeout, then the rest are answered with 503 JSON (`abort_in_flight`). It then
    writes `<drain_key>/idle/<replica>`, so `run` knows when every replica is done and
    deletes the application without waiting longer.

    Serve's own shutdown (`serve.delete`) cannot do this: it removes the route at once, so
    new requests get 404, and a replica past its graceful timeout is killed with its
    requests unanswered.
    """

    def __init__(self, drain_key: str, service: Any) -> None:
        self.drain_key = drain_key
        self.service = service
        self.task: asyncio.Task | None = None

    @classmethod
    def start(cls, drain_key: str | None, service: Any) -> DrainWatcher | None:
        """Watch `drain_key` on the replica's event loop (None: Serve's config files and
        hand-built deployments, where Serve's own shutdown applies)."""
        if not drain_key:
            return None
        watcher = cls(drain_key, service)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover (Serve runs constructors on the loop)
            log.warning("no event loop in the replica's constructor: drain on SIGTERM is off")
            return None
        watcher.task = loop.create_task(watcher._run(), name="rerankd-drain-watcher")
        return watcher

    async def _run(self) -> None:
        kv = _kv()
        while True:
            value = await asyncio.to_thread(
                kv._internal_kv_get, self.drain_key, namespace=DRAIN_NAMESPACE
            )
            if value is not None:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        await self.drain(float(value))
        await asyncio.to_thread(
            kv._internal_kv_put,
            f"{self.drain_key}/idle/{_replica_id()}",
            b"1",
            namespace=DRAIN_NAMESPACE,
        )

    async def drain(self, timeout: float) -> int:
        """Drain for up to `timeout` seconds; returns how many requests were aborted."""
        service = self.service
        log.info("draining (%d requests in flight, up to %gs)", service.in_flight, timeout)
        service.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while service.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if not service.in_flight:
            return 0
        aborted = service.abort_in_flight()
        log.warning(
            "drain timeout (%gs): answering %d requests still in flight with 503", timeout, aborted
        )
        grace = loop.time() + ABORT_GRACE_S
        while service.in_flight and loop.time() < grace:
            await asyncio.sleep(0.05)
        return aborted


def _replica_id() -> str:
    try:
        from ray import serve

        context = serve.get_replica_context()
        unique = getattr(getattr(context, "replica_id", None), "unique_id", None)
        return str(unique or context.replica_tag)
    except Exception:
        return f"pid-{os.getpid()}"


# --- the driver's side (`run`) ---------------------------------------------------------------


def request_drain(drain_key: str, timeout: float) -> None:
    """Tell every HTTP replica watching `drain_key` to drain for up to `timeout` seconds."""
    _kv()._internal_kv_put(drain_key, str(timeout).encode(), namespace=DRAIN_NAMESPACE)


def wait_drained(serve: Any, drain_key: str, timeout: float, force: threading.Event) -> None:
    """Wait until every running HTTP replica reports its drain done, at most `timeout` plus
    the replicas' poll and abort grace (or until `force` is set)."""
    kv = _kv()
    deadline = time.monotonic() + timeout + DRAIN_POLL_S + ABORT_GRACE_S + 1.0
    while time.monotonic() < deadline and not force.is_set():
        idle = kv._internal_kv_list(f"{drain_key}/idle/", namespace=DRAIN_NAMESPACE)
        running = _running_http_replicas(serve)
        if running is not None and len(idle) >= running:
            return
        force.wait(0.25)
    if not force.is_set():
        log.warning("not every replica reported its drain done in time; deleting anyway")


def forget(drain_key: str) -> None:
    """Delete `drain_key` and the replicas' reports under it."""
    _kv()._internal_kv_del(drain_key, del_by_prefix=True, namespace=DRAIN_NAMESPACE)


def _running_http_replicas(serve: Any) -> int | None:
    """RUNNING replicas of the HTTP deployment (the model's, or the ingress of several)."""
    try:
        states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states
    except Exception:
        return None
    return sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")
