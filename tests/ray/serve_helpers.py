"""What the Serve tests of tests/ray share: starting `rerankd serve --ray` on the test
cluster, generated request bodies, and comparing answers with the single-process server's."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ports import free_port
from tests.words import WORDS as ALL_WORDS

QUIET = ("--no-access-log", "--log-level", "warning")
WORDS = ALL_WORDS[:12]  # the plain English words
START_TIMEOUT_S = 240
#: concurrent requests share engine batches differently on each server: last-bit noise only
TOL = 1e-6


@dataclass
class RayServer:
    """A `rerankd serve --ray` process started by `ray_server`."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def wait_healthy(self) -> str:
        """Its URL, once /health answers 200 (the model loaded in every replica)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.5)


@contextmanager
def ray_server(cluster: Any, log_path: Path, *args: str) -> Iterator[RayServer]:
    """Start `rerankd serve --ray ARGS` on the test cluster, on a free loopback port (the
    caller may start other servers while it loads, then `wait_healthy()`); on exit SIGTERM,
    which must drain and exit 0."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "rerankd.cli", "serve", "--ray",
        "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield RayServer(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log_path.read_text()  # SIGTERM: drained, deleted, exit 0


def wait_running(deployments: dict[str, int], timeout: float = START_TIMEOUT_S) -> None:
    """Until the application runs with these deployments at these healthy replica counts."""
    deadline = time.monotonic() + timeout
    while True:
        status = serve_status().applications.get("rerankd")
        if status is not None and status.status == "RUNNING":
            states = {name: status.deployments[name].replica_states for name in deployments
                      if name in status.deployments}  # fmt: skip
            if all(
                states.get(name, {}).get("RUNNING", 0) == count and len(states[name]) == 1
                for name, count in deployments.items()
            ):
                return
        assert time.monotonic() < deadline, f"rerankd on Ray not running: {status}"
        time.sleep(0.5)


def serve_status():
    """`serve.status()` from the Serve controller running now: a `rerankd serve --ray` that
    started Serve shuts it down on exit, and this process may still hold a client of it."""
    from ray import serve
    from ray.serve import context

    check = getattr(context, "_check_cached_client_alive", None)  # Ray 2.60: drops a dead one
    if check is not None:
        check()
    return serve.status()


def rerank_body(seed: int, words: list[str] = WORDS) -> dict[str, Any]:
    rng = random.Random(seed)
    documents: list[Any] = [
        " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        for _ in range(rng.randint(1, 12))
    ]
    documents[0] = {"text": documents[0], "source": seed}
    body: dict[str, Any] = {
        "query": " ".join(rng.choice(words) for _ in range(4)),
        "documents": documents,
    }
    if seed % 3 == 0:
        body["top_n"] = 3
    if seed % 4 == 1:
        body["instruction"] = "Find passages about rivers"
    return body


def without_ids(body: Any) -> Any:
    """The body less what differs on every answer: ids and creation times."""
    if isinstance(body, dict):
        return {k: without_ids(v) for k, v in body.items() if k not in ("id", "created")}
    if isinstance(body, list):
        return [without_ids(v) for v in body]
    return body


def assert_same_answer(got: httpx.Response, want: httpx.Response, tol: float = 0.0) -> None:
    assert got.status_code == want.status_code, got.text
    assert got.headers["content-type"] == want.headers["content-type"]
    a, b = without_ids(got.json()), without_ids(want.json())
    if tol and isinstance(b, dict) and "results" in b:
        # the same ranking in both shapes: `results` and Voyage's `data`
        for key in ("results", "data"):
            if key not in b:
                continue
            scores = {r["index"]: r["relevance_score"] for r in a[key]}
            assert sorted(scores) == sorted(r["index"] for r in b[key])
            for r in b[key]:
                assert scores[r["index"]] == pytest.approx(r["relevance_score"], abs=tol)
            a, b = dict(a, **{key: None}), dict(b, **{key: None})
    assert _equal_within(a, b, tol), (a, b)


def _equal_within(a: Any, b: Any, tol: float) -> bool:
    """`a == b`, floats anywhere in the JSON within `tol` (`/v1/score` and TEI's `/rerank`
    answer scores outside `results`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_within(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal_within(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return type(a) is type(b) and a == b


def call(client: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    return (
        client.request(method, path, json=body)
        if body is not None
        else client.request(method, path)
    )


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
