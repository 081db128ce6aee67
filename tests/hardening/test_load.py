"""Sustained concurrent load on the default server: 64 clients, every answer exact.

Before the load, each distinct request of the workload is sent once, sequentially: those
answers are the reference. Under load, every response must be a 200 whose scores equal the
sequential answer to 1e-6 (batching with other requests must not change a score), and the
server's resident memory must not grow without bound. `run_load` is reused by
scripts/reliability.py for the 2-minute run.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.words import WORDS

from .conftest import Server, percentile, scores_of

SERVERS = ("plain",)
CLIENTS = 64
RSS_GROWTH_LIMIT = 300 * 1024 * 1024


def make_workload(size: int = 24, seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    """Distinct requests over every scoring dialect: 1-24 documents of 3-60 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    workload = []
    for n in range(size):
        docs = [f"doc {n}.{d}: {text(3, 60)}" for d in range(rng.randint(1, 24))]
        query = f"query {n}: {text(2, 12)}"
        kind = n % 4
        if kind == 0:
            workload.append(("/v1/rerank", {"query": query, "documents": docs}))
        elif kind == 1:
            workload.append(("/v2/rerank", {"query": query, "documents": docs, "top_n": 3}))
        elif kind == 2:
            workload.append(("/v1/score", {"queries": query, "documents": docs}))
        else:
            workload.append(("/rerank", {"query": query, "texts": docs, "raw_scores": True}))
    return workload


def _scores(path: str, body: Any) -> list[float] | list[tuple[int, float]]:
    if path == "/v2/rerank":  # top_n: compare the exact (index, score) list
        return [(r["index"], r["relevance_score"]) for r in body["results"]]
    return scores_of(body)


def _tolerance(payload: dict[str, Any]) -> float:
    """Activated scores (probabilities) to 1e-6. Raw logits to 1e-5: float32 rounding in a
    differently composed batch moves a logit of order 1 by a few 1e-6 (the same rule as
    tests/e2e/test_concurrency.py)."""
    raw = payload.get("raw_scores") is True or payload.get("use_activation") is False
    return 1e-5 if raw else 1e-6


def _same(got, want, tol: float) -> bool:
    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        if isinstance(a, tuple):
            if a[0] != b[0] or abs(a[1] - b[1]) > tol:
                return False
        elif abs(a - b) > tol:
            return False
    return True


@dataclass
class LoadStats:
    clients: int
    duration_s: float
    requests: int = 0
    documents: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s

    def summary(self) -> str:
        return (
            f"{self.clients} clients × {self.duration_s:.0f}s: {self.requests} requests "
            f"({self.throughput:.1f}/s, {self.documents} documents), {len(self.errors)} errors, "
            f"p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, RSS "
            f"{self.rss_before / 2**20:.0f} → {self.rss_after / 2**20:.0f} MiB"
        )


def sequential_answers(url: str, workload) -> list[Any]:
    answers = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for path, payload in workload:
            response = client.post(path, json=payload)
            assert response.status_code == 200, response.text
            answers.append(_scores(path, response.json()))
    return answers


def run_load(
    server: Server,
    clients: int = CLIENTS,
    duration_s: float = 15.0,
    workload: list[tuple[str, dict]] | None = None,
    max_requests_per_client: int = 100_000,
) -> LoadStats:
    """`clients` threads, each with its own keep-alive connection, for `duration_s`."""
    workload = workload or make_workload()
    expected = sequential_answers(server.url, workload)
    stats = LoadStats(clients, duration_s, rss_before=server.rss_bytes())
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop(cid: int) -> None:
        latencies, errors, docs = [], [], 0
        with httpx.Client(base_url=server.url, timeout=120) as client:
            start.wait()
            deadline = time.monotonic() + duration_s
            k = 0
            while time.monotonic() < deadline and k < max_requests_per_client:
                i = (cid * 7 + k) % len(workload)
                k += 1
                path, payload = workload[i]
                t0 = time.perf_counter()
                try:
                    response = client.post(path, json=payload)
                except httpx.HTTPError as exc:
                    errors.append(f"client {cid}: {exc!r}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    errors.append(f"{path}: {response.status_code} {response.text[:200]}")
                elif not _same(_scores(path, response.json()), expected[i], _tolerance(payload)):
                    errors.append(f"{path} request {i}: scores differ from the sequential answer")
                else:
                    docs += len(payload.get("documents") or payload.get("texts"))
        with lock:
            stats.latencies.extend(latencies)
            stats.errors.extend(errors)
            stats.requests += len(latencies)
            stats.documents += docs

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join(timeout=duration_s + 300)
    stats.duration_s = time.monotonic() - began
    stats.rss_after = server.rss_bytes()
    return stats


def _check(stats: LoadStats) -> None:
    print(f"\nload: {stats.summary()}")
    assert not stats.errors, f"{len(stats.errors)} errors, e.g. {stats.errors[:5]}"
    assert stats.requests >= stats.clients, stats.summary()
    growth = stats.rss_after - stats.rss_before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.0f} MiB"


def test_64_concurrent_clients_for_15s_get_exact_answers(plain_server):
    stats = run_load(plain_server, duration_s=15)
    _check(stats)
    assert plain_server.healthy()


@pytest.mark.slow
def test_64_concurrent_clients_for_2_minutes_get_exact_answers(plain_server):
    stats = run_load(plain_server, duration_s=120)
    _check(stats)
    assert plain_server.healthy()
