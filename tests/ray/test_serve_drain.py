"""`rerankd serve --ray` on SIGTERM (issue 15, item 13): one signal drains as the single
process does (/health and new requests 503, in-flight requests answered with 503 JSON when
the drain timeout runs out) and the process exits soon after, without a second signal.

The end-to-end test starts its own Serve application (40-90 s on a 2-core machine, most of
it start-up) and is `slow`; the parts it relies on are tested here without a cluster.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from ray_cluster import cluster_fixture
from serve_helpers import QUIET, ray_server

from rerankd.errors import ShuttingDown

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

DRAIN_TIMEOUT_S = 3.0
#: after the drain timeout: the replicas' poll (0.5 s) and abort grace (1 s), deleting the
#: application and stopping Serve (~3 s on a quiet 2-core machine), and CI's load
EXIT_MARGIN_S = 15.0


@pytest.fixture(scope="module")
def cluster(request):
    yield from cluster_fixture(request)


def _is_error(response: httpx.Response, status: int) -> bool:
    if response.status_code != status:
        return False
    error = response.json().get("error", {})
    return error.get("code") == status and bool(error.get("message"))


@pytest.mark.slow
def test_one_sigterm_drains_answers_in_flight_requests_with_503_json_and_exits(
    cluster, qwen3_dir, tmp_path
):
    args = ("--model", str(qwen3_dir), "--dtype", "float32", *QUIET)
    slow = ("--fault-injection", "delay:60", "--drain-timeout", str(DRAIN_TIMEOUT_S))
    with ray_server(cluster, tmp_path / "serve.log", *args, *slow) as server:
        url = server.wait_healthy()
        result: dict[str, object] = {}

        def in_flight() -> None:
            try:
                result["response"] = httpx.post(
                    f"{url}/v1/rerank",
                    json={"query": "drain", "documents": ["one", "two"]},
                    headers={"X-Request-Id": "ray-drain-1"},
                    timeout=120,
                )
            except httpx.HTTPError as exc:
                result["error"] = exc

        thread = threading.Thread(target=in_flight, daemon=True)
        thread.start()
        time.sleep(3)  # inside its 60 s batch
        assert thread.is_alive(), result

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # while draining: /health and new requests are 503 JSON, as in one process
        health = late = None
        while time.monotonic() - signalled < DRAIN_TIMEOUT_S:
            health = httpx.get(f"{url}/health", timeout=10)
            if health.status_code == 503:
                late = httpx.post(
                    f"{url}/v1/rerank", json={"query": "late", "documents": ["x"]}, timeout=10
                )
                break
            time.sleep(0.1)
        assert health is not None and _is_error(health, 503), health and health.text
        assert late is not None and _is_error(late, 503), late and late.text

        thread.join(timeout=DRAIN_TIMEOUT_S + 30)
        response = result.get("response")
        assert isinstance(response, httpx.Response), result
        assert _is_error(response, 503), response.text
        assert "drain timeout" in response.json()["error"]["message"]
        assert response.headers["x-request-id"] == "ray-drain-1"
        try:
            code = server.proc.wait(timeout=DRAIN_TIMEOUT_S + EXIT_MARGIN_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail("still running long after one SIGTERM")
        exited = time.monotonic() - signalled
        assert code == 0, server.log_path.read_text()[-3000:]
        assert exited < DRAIN_TIMEOUT_S + EXIT_MARGIN_S, f"exited {exited:.1f}s after SIGTERM"


# --- the parts, without a cluster ---------------------------------------------------------


class _FakeService:
    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.draining = False
        self.aborted = 0

    def begin_drain(self) -> None:
        self.draining = True

    def abort_in_flight(self) -> int:
        self.aborted, self.in_flight = self.in_flight, 0
        return self.aborted


def test_a_replica_drains_then_aborts_what_is_left_at_the_timeout():
    from rerankd.ray.drain import DrainWatcher

    async def scenario(service: _FakeService, finish_after: float | None) -> tuple[int, float]:
        async def finish() -> None:
            await asyncio.sleep(finish_after)
            service.in_flight = 0

        if finish_after is not None:
            asyncio.ensure_future(finish())
        started = time.monotonic()
        aborted = await DrainWatcher("key", service).drain(0.5)
        return aborted, time.monotonic() - started

    stuck = _FakeService(in_flight=2)
    aborted, took = asyncio.run(scenario(stuck, None))
    assert stuck.draining and aborted == 2 == stuck.aborted
    assert 0.5 <= took < 1.5, took

    quick = _FakeService(in_flight=1)
    aborted, took = asyncio.run(scenario(quick, 0.1))
    assert quick.draining and aborted == 0 == quick.aborted
    assert took < 0.4, took


class _NeverAnswered:
    """An engine call that never answers (a replica inside a long batch)."""

    def __init__(self) -> None:
        self.cancelled = False
        self._future = asyncio.get_running_loop().create_future()

    def __await__(self):
        return self._future.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self) -> None:
        self.calls: list[_NeverAnswered] = []

    def remote(self, pairs):
        self.calls.append(_NeverAnswered())
        return self.calls[-1]


class _Engine:
    def __init__(self) -> None:
        self.submit = _Method()


def test_remote_scheduler_abort_fails_waiting_submits_and_cancels_their_engine_calls():
    from rerankd.ray.remote_scheduler import RemoteScheduler
    from rerankd.types import EncodedPair

    async def scenario() -> tuple[BaseException | None, int, bool, int]:
        engine = _Engine()
        scheduler = RemoteScheduler(engine, "m")
        task = asyncio.ensure_future(scheduler.submit([EncodedPair((1, 2, 3))]))
        await asyncio.sleep(0.05)
        count = scheduler.abort(ShuttingDown("drain timeout"))
        try:
            await asyncio.wait_for(task, 2)
            error = None
        except ShuttingDown as exc:
            error = exc
        await asyncio.sleep(0.05)
        return error, count, engine.submit.calls[0].cancelled, len(scheduler._gates)

    error, count, cancelled, left = asyncio.run(scenario())
    assert isinstance(error, ShuttingDown) and count == 1
    assert cancelled, "the engine call was not cancelled"
    assert left == 0


def test_run_signal_handlers_first_drains_second_forces_sighup_is_ignored():
    from rerankd.ray.serve import _on_signals

    stop, force = threading.Event(), threading.Event()
    previous = _on_signals(stop, force)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
        assert not stop.is_set() and not force.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.is_set() and not force.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert force.is_set()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
