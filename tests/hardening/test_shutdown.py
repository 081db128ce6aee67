"""Draining shutdown: SIGTERM/SIGINT under load, and a second signal that exits at once.

Each test owns a server whose batches hold one pair and sleep 0.25 s, so requests stay in
flight for seconds: long enough to watch the drain from outside.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rerankd.metrics import Metrics
from rerankd.scheduler import Scheduler
from rerankd.types import EncodedPair
from tests.harness import metric_sum

from .conftest import Server, assert_error, assert_scores_close, scores_of

DELAY_S = 0.25


SERVERS = ("plain", "sigterm", "sigint", "twice")


def _payload(n: int, docs: int) -> dict:
    return {
        "query": f"drain query {n}",
        "documents": [f"request {n} document {d} about rivers" for d in range(docs)],
    }


def _wait_for_compute(server: Server, requests: int = 1, timeout: float = 30.0) -> None:
    """Until `requests` requests are tokenized (admitted: in flight) and a batch has run."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics_text()
        if (
            metric_sum(text, "rerankd_tokenize_seconds_count") >= requests
            and metric_sum(text, "rerankd_batch_pairs_count") >= 1
        ):
            return
        assert time.monotonic() < deadline, "the requests did not start"
        time.sleep(0.05)


def _drain_under_load(server: Server, sig: int, plain: httpx.Client) -> None:
    payloads = [_payload(n, 4) for n in range(3)]  # 12 one-pair batches: ~3 s of work
    expected = []
    for payload in payloads:
        response = plain.post("/v1/rerank", json=payload)
        assert response.status_code == 200
        expected.append(scores_of(response.json()))

    with ThreadPoolExecutor(3) as pool, server.client(timeout=60) as client:
        in_flight = [pool.submit(client.post, "/v1/rerank", json=p) for p in payloads]
        _wait_for_compute(server, requests=len(payloads))
        signalled = time.monotonic()
        server.signal(sig)

        # /health turns 503 (with Retry-After) while the in-flight requests are still running
        while True:
            health = httpx.get(f"{server.url}/health", timeout=10)
            if health.status_code == 503 or time.monotonic() - signalled > 2:
                break
            time.sleep(0.02)
        assert_error(health, 503, contains=["draining"])
        assert health.headers["retry-after"].isdigit()
        assert not any(f.done() for f in in_flight), "the load finished before the drain began"

        # new work is refused with 503 + Retry-After, on every scoring route
        for path, body in [
            ("/v1/rerank", {"query": "late", "documents": ["too late"]}),
            ("/v1/score", {"queries": "late", "documents": ["too late"]}),
            ("/rerank", {"query": "late", "texts": ["too late"]}),
        ]:
            late = httpx.post(f"{server.url}{path}", json=body, timeout=10)
            assert_error(late, 503, contains=["shutting down"])
            assert late.headers["retry-after"].isdigit()

        # every request already admitted finishes with 200 and the right scores
        for future, want in zip(in_flight, expected, strict=True):
            response = future.result(timeout=60)
            assert response.status_code == 200, response.text
            assert_scores_close(scores_of(response.json()), want)

    code = server.wait(timeout=30)
    assert code == 0, server.output()[-3000:]
    output = server.output()
    assert "draining" in output
    assert "Traceback" not in output, output[-3000:]


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(servers, plain):
    _drain_under_load(servers["sigterm"], signal.SIGTERM, plain)


def test_sigint_drains_like_sigterm(servers, plain):
    _drain_under_load(servers["sigint"], signal.SIGINT, plain)


def test_a_second_signal_exits_promptly_without_waiting_for_the_drain(servers):
    server = servers["twice"]
    payload = _payload(0, 40)  # 40 one-pair batches of 0.25 s: 10 s to drain
    result: dict[str, object] = {}

    def long_request() -> None:
        try:
            result["response"] = httpx.post(f"{server.url}/v1/rerank", json=payload, timeout=60)
        except httpx.HTTPError as exc:
            result["error"] = exc

    thread = threading.Thread(target=long_request, daemon=True)
    thread.start()
    _wait_for_compute(server)
    compute_started = time.monotonic()
    server.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "not draining"
        time.sleep(0.05)
    time.sleep(0.5)
    assert server.proc.poll() is None, "exited before the in-flight request finished"

    second = time.monotonic()
    server.signal(signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail(
            "still running 10 s after the second SIGTERM (see "
            "test_scheduler_stop_returns_when_its_loop_was_cancelled_with_work_queued)"
        )
    took = time.monotonic() - second
    remaining = 40 * DELAY_S - (second - compute_started)  # what a full drain would still take
    assert remaining > 5, remaining
    assert took < 3.0, f"exit took {took:.1f}s after the second signal ({remaining:.1f}s left)"
    assert "second SIGTERM" in server.output()
    thread.join(timeout=30)
    response = result.get("response")
    # the abandoned request never gets a (wrong) 200
    assert response is None or response.status_code != 200, response.text


class _SlowEngine:
    name, device, dtype, default_batch_tokens = "slow", "cpu", None, 1

    def score(self, batch) -> list[float]:
        time.sleep(0.05)
        return [0.0] * len(batch.pairs)


def test_scheduler_stop_returns_when_its_loop_was_cancelled_with_work_queued():
    """What asyncio.run does on a forced exit (second signal): it cancels every task, the
    scheduler loop and the requests included; the app's lifespan `finally` then awaits
    `service.stop()` → `Scheduler.stop()`, which must not wait for a queue nobody drains."""

    async def scenario() -> bool:
        scheduler = Scheduler(_SlowEngine(), Metrics(), "m", max_batch_tokens=1)
        scheduler.start()
        work = asyncio.ensure_future(scheduler.submit([EncodedPair((1, 2, 3))] * 20))
        await asyncio.sleep(0.2)
        work.cancel()
        (loop_task,) = [t for t in asyncio.all_tasks() if t.get_name() == "rerankd-scheduler"]
        loop_task.cancel()  # as asyncio.run cancels every task on a forced exit
        await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(scheduler.stop(), 3)
        except TimeoutError:
            return False
        return True

    assert asyncio.run(scenario()), "Scheduler.stop() hung on a queue its cancelled loop left"
