"""The local Ray cluster of tests/ray (marker `ray`): two simulated nodes.

tests/ray has no __init__.py on purpose: as a package it would be named `ray` (tests/ is on
sys.path, as for tests/e2e) and hide the real Ray. Its modules import this one by name.

The cluster is started once per test process (`shared_cluster`), the first time a test
asks for it, and stopped at exit. It stays small: 2 logical CPUs and a 100 MiB object
store per node, all processes on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Ray binds its processes to the machine's address unless told it runs on one machine
#: only; read when `ray` is first imported, so set here, before any test module imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
#: no idle Python workers started ahead of need (each holds ~100 MB)
os.environ.setdefault("RAY_enable_worker_prestart", "0")

NODES = 2
CPUS_PER_NODE = 2
OBJECT_STORE_BYTES = 100 * 1024 * 1024

_lock = threading.Lock()
_cluster: Any = None


def shared_cluster():
    """The running `ray.cluster_utils.Cluster` of this test process; this process is
    connected to it as a driver."""
    global _cluster
    with _lock:
        if _cluster is None:
            import ray
            from ray.cluster_utils import Cluster

            node = {
                "num_cpus": CPUS_PER_NODE,
                "object_store_memory": OBJECT_STORE_BYTES,
                "include_dashboard": False,
            }
            cluster = Cluster(initialize_head=True, head_node_args=node)
            for _ in range(NODES - 1):
                cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            _cluster = cluster
            atexit.register(_shutdown)
        return _cluster


def cluster_fixture(request) -> Iterator[Any]:
    """Body of each module's `cluster` fixture: the shared cluster, stopped after the last
    module of tests/ray that the session runs, so it holds no memory during other tests."""
    yield shared_cluster()
    items = request.session.items
    here = Path(__file__).parent
    module = request.module.__file__
    positions = [i for i, item in enumerate(items) if str(item.fspath) == module]
    later = items[max(positions) + 1 :] if positions else []
    if not any(Path(str(item.fspath)).parent == here for item in later):
        _shutdown()


def _shutdown() -> None:
    global _cluster
    with _lock:
        if _cluster is None:
            return
        import ray

        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        _cluster.shutdown()
        _cluster = None
