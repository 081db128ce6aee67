"""Body limits, backpressure and client-disconnect cancellation, end to end.

What needs the real HTTP stack runs here: bodies refused by Content-Length, chunked or
before they arrive, a flood timed by the server's access log, a client whose socket closes.
The limits an in-process app checks equally well (--max-documents, --max-query-tokens,
--max-concurrent-requests, --request-timeout) are tested in tests/api/test_limits.py.

One server with tight limits runs next to the shared default one (which supplies the
reference scores: same checkpoint, same dtype, so every score must match to 1e-6):
- `queue`: every batch sleeps 0.3 s and holds one pair (--max-batch-tokens 1), at most
           2,000 tokens may wait (--max-queued-tokens 2000), and bodies above 4,096 bytes
           are refused (--max-request-bytes 4096; the flood's and the disconnect test's
           bodies are under it)
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.harness import metric_sum

from .conftest import (
    Server,
    assert_error,
    assert_scores_close,
    raw_http,
    raw_post,
    scores_of,
)

MAX_BYTES = 4096
QUEUE_DELAY_S = 0.3
QUEUE_LIMIT = 2000


SERVERS = ("plain", "queue")


@pytest.fixture(scope="module")
def limited(servers) -> Iterator[httpx.Client]:
    """The `queue` server, for its --max-request-bytes."""
    args = " ".join(servers["queue"].args)
    assert f"--max-request-bytes {MAX_BYTES}" in args, args
    with servers["queue"].client() as client:
        yield client


def reference(plain: httpx.Client, path: str, payload: dict) -> list[float]:
    response = plain.post(path, json=payload)
    assert response.status_code == 200, response.text
    return scores_of(response.json())


def wait_idle(server: Server, timeout: float = 30.0) -> None:
    """Until nothing is queued and no batch has run for a little while."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        text = server.metrics_text()
        state = (
            metric_sum(text, "rerankd_queued_tokens"),
            metric_sum(text, "rerankd_batch_pairs_count"),
        )
        if state == last and state[0] == 0:
            return
        last = state
        time.sleep(0.7)
    raise AssertionError(f"{server.name} did not become idle")


# --- body size (413) ------------------------------------------------------------------------


def _body_of_size(size: int) -> bytes:
    """A valid rerank body of exactly `size` bytes."""
    head = b'{"query":"which one?","documents":["'
    tail = b'"]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_a_body_over_max_request_bytes_with_content_length_is_413(limited):
    response = limited.post(
        "/v1/rerank",
        content=_body_of_size(MAX_BYTES + 1),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, param=None, contains=["--max-request-bytes"])
    assert response.request.headers["content-length"] == str(MAX_BYTES + 1)
    # the limit, not the content, is what was refused: the same shape at the limit is served
    ok = limited.post(
        "/v1/rerank", content=_body_of_size(MAX_BYTES), headers={"content-type": "application/json"}
    )
    assert ok.status_code == 200, ok.text


def test_a_chunked_body_without_content_length_over_the_limit_is_413(limited):
    def chunks(body: bytes) -> Iterator[bytes]:
        for start in range(0, len(body), 700):
            yield body[start : start + 700]

    big = _body_of_size(MAX_BYTES + 1500)
    response = limited.post(
        "/v1/rerank", content=chunks(big), headers={"content-type": "application/json"}
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413, contains=["--max-request-bytes"])
    small = limited.post(
        "/v1/rerank",
        content=chunks(_body_of_size(MAX_BYTES - 100)),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200, small.text
    assert limited.get("/health").status_code == 200


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_arrives(servers):
    """413 on the header alone: the server does not wait for (or read) a 1 GB body."""
    server = servers["queue"]
    reply = raw_http(
        server.port,
        b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n{",
        timeout=10,
    )
    assert reply.status == 413, reply.raw[:300]
    assert json.loads(reply.body)["error"]["type"] == "RequestTooLargeError", reply.body


# --- queue limit (429) ----------------------------------------------------------------------


def test_a_flood_beyond_max_queued_tokens_gets_fast_429s_while_admitted_requests_are_right(
    servers, plain
):
    server = servers["queue"]
    wait_idle(server)
    # 12 requests of 5 documents of ~110 tokens each: the first 3 or so fit in 2,000 tokens
    payloads = [
        {
            "query": f"flood query {n}",
            "documents": [f"request {n} document {d} " + "word " * 25 for d in range(5)],
        }
        for n in range(12)
    ]
    ids = [f"flood-{n}-{uuid.uuid4().hex[:8]}" for n in range(12)]
    barrier = threading.Barrier(12)

    def send(n: int) -> tuple[int, httpx.Response, float]:
        with server.client() as client:
            barrier.wait()
            started = time.perf_counter()
            response = client.post("/v1/rerank", json=payloads[n], headers={"X-Request-Id": ids[n]})
            return n, response, time.perf_counter() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(12)))

    admitted = [(n, r) for n, r, _ in results if r.status_code == 200]
    rejected = [(n, r) for n, r, _ in results if r.status_code == 429]
    assert len(admitted) + len(rejected) == 12, [(n, r.status_code, r.text) for n, r, _ in results]
    assert admitted, "nothing was admitted"
    assert len(rejected) >= 4, f"only {len(rejected)} of 12 were refused with a {QUEUE_LIMIT} limit"

    server_latency = {n: server.access_record(ids[n])["latency_ms"] / 1000 for n in range(12)}
    fastest_admitted = min(server_latency[n] for n, _ in admitted)
    # an admitted request waits for at least its 5 one-pair batches of 0.3 s
    assert fastest_admitted >= 5 * QUEUE_DELAY_S * 0.9, fastest_admitted
    for n, response in rejected:
        assert_error(response, 429, contains=["tokens queued", str(QUEUE_LIMIT)])
        assert response.headers["retry-after"].isdigit(), response.headers
        assert int(response.headers["retry-after"]) >= 1
        # refused at once, not after waiting in the queue
        assert server_latency[n] < min(1.0, fastest_admitted / 2), (n, server_latency[n])
    for n, response in admitted:
        assert_scores_close(scores_of(response.json()), reference(plain, "/v1/rerank", payloads[n]))
    assert server.metric("rerankd_rejected_requests_total") >= len(rejected)


# --- client disconnect ----------------------------------------------------------------------


def test_a_client_that_disconnects_stops_consuming_compute(servers):
    server = servers["queue"]
    wait_idle(server)
    before = server.metrics_text()
    pairs_before = metric_sum(before, "rerankd_batch_pairs_sum")
    docs_before = metric_sum(before, "rerankd_documents_total")
    closed_before = metric_sum(before, "rerankd_requests_total", status="499")

    sent = 60  # one pair per 0.3 s batch: 18 s of work if nobody cancels it
    body = json.dumps(
        {"query": "cancel me", "documents": [f"document number {i}" for i in range(sent)]}
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw_post("/v1/rerank", body))
        time.sleep(0.6)
    time.sleep(1.5)
    mid = metric_sum(server.metrics_text(), "rerankd_batch_pairs_sum")
    time.sleep(1.2)
    after = server.metrics_text()
    computed = metric_sum(after, "rerankd_batch_pairs_sum") - pairs_before
    # 0.6 s of 0.3 s batches, plus the one running when the disconnect is seen
    assert computed <= 6, f"{computed} of {sent} pairs were computed (the client left after 0.6 s)"
    assert metric_sum(after, "rerankd_batch_pairs_sum") == mid, "compute went on"
    assert metric_sum(after, "rerankd_documents_total") == docs_before
    assert metric_sum(after, "rerankd_requests_total", status="499") == closed_before + 1
    assert server.metric("rerankd_queued_tokens") == 0
    assert server.healthy()
