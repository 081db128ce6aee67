"""Engine faults through the HTTP app, in-process on the real engine
(`--fault-injection raise-on:FAULT_MARKER,oom-above:2,delay:0.5`).

- A batch holding a pair with FAULT_MARKER raises: that request must get a clear 500 error
  JSON, while requests without the marker (even those queued at the same moment) succeed
  and the app keeps serving.
- A batch of more than 2 pairs raises torch.OutOfMemoryError inside the engine: the engine
  splits and retries, so every request still succeeds with the scores of a fault-free app.
- Every batch sleeps 0.5 s, so requests sent together are queued together and share batches.

The apps are the ones `rerankd serve` builds (tests/api/conftest.py: `serve_real`), their
model loaded in this process; `co_batched_round` also drives a real server
(scripts/reliability.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.hardening.conftest import assert_error, assert_scores_close, scores_of
from tests.harness import metric_sum

FAULTS = ("--fault-injection", "raise-on:FAULT_MARKER,oom-above:2,delay:0.5")
MARKED = "text with FAULT_MARKER inside"  # tokenizes to contain the marker's ids (cf. test_faults)


class InProcessServer:
    """What `co_batched_round` asks of a server (`client()`, `metric()`), for an in-process
    app: every client is the app's one TestClient (a second one would start the app again)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def client(self) -> _Borrowed:
        return _Borrowed(self._client)

    def metric(self, name: str, **labels: str) -> float:
        response = self._client.get("/metrics")
        assert response.status_code == 200, response.text
        return metric_sum(response.text, name, **labels)


class _Borrowed:
    """The shared TestClient, with a `close()` that leaves it open."""

    def __init__(self, client: Any) -> None:
        self.get, self.post = client.get, client.post

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def plain(serve_real):
    """The fault-free app: the reference scores (same checkpoint, same dtype)."""
    with serve_real() as client:
        yield client


@pytest.fixture(scope="module")
def faults_client(serve_real):
    with serve_real(*FAULTS) as client:
        yield client


@pytest.fixture(scope="module")
def faults(faults_client) -> InProcessServer:
    return InProcessServer(faults_client)


def _innocent(n: int, docs: int = 5) -> dict:
    return {
        "query": f"innocent query {n}",
        "documents": [f"request {n} plain document {d} about the old bridge" for d in range(docs)],
    }


def _expected(plain, payload: dict, path: str = "/v1/rerank") -> list[float]:
    response = plain.post(path, json=payload)
    assert response.status_code == 200, response.text
    return scores_of(response.json())


def _assert_inference_failed(response: httpx.Response) -> None:
    error = assert_error(response, 500, param=None, contains=["inference failed"])
    assert error["type"] == "InternalServerError"
    assert "bug in rerankd" not in error["message"]  # a known failure, not an unhandled one


def test_a_request_holding_the_marker_gets_a_clear_500_and_the_app_keeps_serving(
    faults, faults_client, plain
):
    failures_before = faults.metric("rerankd_failures_total", kind="inference")
    client = faults_client
    response = client.post(
        "/v1/rerank", json={"query": "q", "documents": ["fine", MARKED, "also fine"]}
    )
    _assert_inference_failed(response)
    for path, payload in [
        ("/v1/score", {"queries": "q", "documents": [MARKED]}),
        ("/rerank", {"query": "q", "texts": [MARKED]}),
    ]:
        _assert_inference_failed(client.post(path, json=payload))
    assert faults.metric("rerankd_failures_total", kind="inference") >= failures_before + 3
    # the same app goes on serving
    assert client.get("/health").status_code == 200
    after = client.post("/v1/rerank", json=_innocent(99))
    assert after.status_code == 200, after.text
    assert_scores_close(scores_of(after.json()), _expected(plain, _innocent(99)))


def co_batched_round(faults: Any, payloads: list[dict]) -> tuple[bool, list[httpx.Response]]:
    """Send `payloads` at once while a blocker request holds the engine (0.5 s batch);
    return whether they all ended up in one batch, and their responses. `faults` is a
    harness `Server` or an `InProcessServer`."""
    clients = [faults.client() for _ in range(len(payloads) + 1)]
    for client in clients:  # connect now, not inside the 0.5 s window
        assert client.get("/health").status_code == 200
    start = threading.Barrier(len(payloads))

    def send(client, payload: dict, together: bool = True) -> httpx.Response:
        if together:
            start.wait()
        return client.post("/v1/rerank", json=payload)

    batches = faults.metric("rerankd_batch_pairs_count")
    tokenized = faults.metric("rerankd_tokenize_seconds_count")
    try:
        with ThreadPoolExecutor(len(payloads) + 1) as pool:
            blocker = pool.submit(send, clients[-1], _innocent(50, docs=1), False)
            deadline = time.monotonic() + 30
            while faults.metric("rerankd_batch_pairs_count") < batches + 1:  # blocker runs
                assert time.monotonic() < deadline
                time.sleep(0.02)
            futures = [pool.submit(send, c, p) for c, p in zip(clients, payloads, strict=False)]
            all_queued_in_time = False
            while not blocker.done():
                if faults.metric("rerankd_tokenize_seconds_count") >= tokenized + 1 + len(payloads):
                    all_queued_in_time = not blocker.done()
                    break
                time.sleep(0.02)
            responses = [f.result(timeout=60) for f in futures]
            assert blocker.result(timeout=60).status_code == 200
    finally:
        for client in clients:
            client.close()
    one_batch = faults.metric("rerankd_batch_pairs_count") == batches + 2
    return all_queued_in_time and one_batch, responses


def test_requests_queued_together_with_a_marked_one_still_succeed(faults, plain):
    """The marked request fails alone: requests that happen to share its batch are not
    failed with it."""
    innocents = [_innocent(n) for n in range(3)]
    expected = [_expected(plain, p) for p in innocents]
    marked = {"query": "q", "documents": ["one", MARKED, "two"]}
    for _attempt in range(3):  # on a busy machine the four may miss the blocker's batch
        shared, responses = co_batched_round(faults, [marked, *innocents])
        if shared:
            break
    else:
        pytest.fail("could not get the marked and innocent requests into one batch")
    _assert_inference_failed(responses[0])
    for n, (response, want) in enumerate(zip(responses[1:], expected, strict=True)):
        assert response.status_code == 200, f"innocent request {n}: {response.text}"
        assert_scores_close(scores_of(response.json()), want)


def test_simulated_out_of_memory_is_split_and_retried_with_identical_scores(
    faults, faults_client, plain, caplog
):
    caplog.set_level(logging.WARNING, logger="rerankd")
    failures_before = faults.metric("rerankd_failures_total", kind="inference")
    payloads = [_innocent(n, docs=7) for n in range(10, 14)]
    expected = [_expected(plain, p) for p in payloads]
    score_payload = {"queries": "q", "documents": [f"pair document {d}" for d in range(9)]}
    client = faults_client
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(client.post, "/v1/rerank", json=p) for p in payloads]
        score = pool.submit(client.post, "/v1/score", json=score_payload)
        for future, want in zip(futures, expected, strict=True):
            response = future.result(timeout=60)
            assert response.status_code == 200, response.text
            assert_scores_close(scores_of(response.json()), want)
        assert score.result(timeout=60).status_code == 200
        assert_scores_close(
            scores_of(score.result().json()), _expected(plain, score_payload, "/v1/score")
        )
    # batches of up to 7+ pairs ran, and each one was split to 2 pairs and retried
    assert faults.metric("rerankd_batch_pairs_sum") > 2 * faults.metric("rerankd_batch_pairs_count")
    assert faults.metric("rerankd_failures_total", kind="inference") == failures_before
    assert "out of memory on" in caplog.text
