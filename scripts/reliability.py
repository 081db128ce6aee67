#!/usr/bin/env python
"""Dedicated reliability run: fuzz, load, overload, fault, cancellation, shutdown and
hostile-input (issue 15: many-value bodies, 10 MB fields, a flood, NaN scores, slowloris)
scenarios against freshly started `rerankd serve` processes on the tiny Qwen3 fixture
(127.0.0.1 only), then docs/reliability.md with what was measured.

    python scripts/reliability.py                 # the full run (~15 minutes on 2 cores)
    python scripts/reliability.py --quick         # a short smoke run of every scenario
    python scripts/reliability.py --output /tmp/r.md

Every number in the report comes from this run; nothing is written by hand. The exit code
is 1 when a scenario's outcome breaks the contract (the report says which), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from tests.api.test_engine_faults import co_batched_round  # noqa: E402
from tests.api.test_limits import NAN_REQUESTS  # noqa: E402
from tests.hardening.conftest import (  # noqa: E402
    SLOW_DRAIN,
    HealthPoller,
    RssSampler,
    Server,
    error_shape_problem,
    launch_servers,
    nan_model_dir,
    percentile,
    raw_post,
    scores_of,
    send_raw_request,
)
from tests.hardening.test_fuzz import (  # noqa: E402
    BAD_INPUTS,
    ODD_BUT_VALID,
    check_input,
    run_schemathesis,
)
from tests.hardening.test_hostile_inputs import (  # noqa: E402
    FLOOD_QUEUE_TOKENS,
    HOSTILE_BODIES,
    OVERSIZED,
    TEN_MB,
    health_baseline_p99,
    run_flood,
)
from tests.hardening.test_load import run_load  # noqa: E402
from tests.harness import metric_sum  # noqa: E402

MARKED = "text with FAULT_MARKER inside"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def close(a: list[float], b: list[float], tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def reference(plain: Server, path: str, payload: dict) -> list[float]:
    response = httpx.post(f"{plain.url}{path}", json=payload, timeout=120)
    response.raise_for_status()
    return scores_of(response.json())


class Report:
    def __init__(self) -> None:
        self.sections: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.violations: list[str] = []

    def add(self, title: str, what: str, rows: list[tuple[str, Any]]) -> None:
        self.sections.append((title, what, [(k, str(v)) for k, v in rows]))
        print(f"\n== {title}", flush=True)
        for key, value in rows:
            print(f"  {key}: {value}", flush=True)

    def violate(self, message: str) -> None:
        self.violations.append(message)
        print(f"  !! {message}", flush=True)


# --- scenarios ----------------------------------------------------------------------------------


def fuzz(report: Report, plain: Server, examples: int, budget_s: float) -> None:
    stats = run_schemathesis(plain.url, examples=examples, time_budget_s=budget_s, get_examples=50)
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(stats.by_status.items()))
    report.add(
        "Fuzzing: schemathesis from /openapi.json",
        "Positive and negative cases generated from the OpenAPI document for the five scoring "
        "routes and four GET routes. Checks: no 5xx; every 4xx is the error JSON.",
        [
            ("requests sent", stats.requests),
            ("time", f"{stats.seconds:.0f} s"),
            ("statuses", statuses),
            ("5xx or badly shaped 4xx", len(stats.problems)),
            ("server healthy afterwards", plain.healthy()),
        ],
    )
    for problem in stats.problems[:10]:
        report.violate(f"schemathesis: {problem}")

    problems = []
    with httpx.Client(base_url=plain.url, timeout=300) as client:
        for bad in BAD_INPUTS + ODD_BUT_VALID:
            problem = check_input(client, bad)
            if problem:
                problems.append(problem)
        deep = []
        for depth in (300, 900):
            body = (
                b'{"query": "q", "documents": [{"text": "a", "meta": '
                + b"[" * depth
                + b'"x"'
                + b"]" * depth
                + b"}]}"
            )
            # a fresh connection: after a 500, uvicorn closes the connection it came on
            response = httpx.post(
                f"{plain.url}/v1/rerank",
                content=body,
                headers={"content-type": "application/json", "connection": "close"},
                timeout=60,
            )
            deep.append(f"{depth} deep → {response.status_code}")
            if response.status_code >= 500:
                problems.append(f"document object nested {depth} deep: {response.status_code}")
        big = []
        for where in ("query", "document"):
            text = "word " * 2_000_000
            payload = (
                {"query": text, "documents": ["a"]}
                if where == "query"
                else {"query": "q", "documents": [text], "truncate": False}
            )
            started = time.perf_counter()
            response = client.post("/v1/rerank", json=payload)
            took = time.perf_counter() - started
            big.append(f"10 MB {where} → {response.status_code} in {took:.1f} s")
            if response.status_code != 400 or error_shape_problem(response):
                problems.append(f"10 MB {where}: {response.status_code}")
    report.add(
        "Fuzzing: hand-written hostile inputs",
        "Malformed JSON, wrong content types, invalid UTF-8, lone surrogates, NaN/Infinity, "
        "null everywhere, bad top_n, 100k documents, deep nesting, 1 MB and 10 MB strings.",
        [
            ("inputs", len(BAD_INPUTS) + len(ODD_BUT_VALID) + 4),
            (
                "answered as the contract says",
                len(BAD_INPUTS) + len(ODD_BUT_VALID) + 4 - len(problems),
            ),
            ("deeply nested document objects", "; ".join(deep)),
            ("10 MB strings", "; ".join(big)),
            ("server healthy afterwards", plain.healthy()),
        ],
    )
    for problem in problems:
        report.violate(f"hostile input: {problem}")


def load(report: Report, plain: Server, seconds: float) -> None:
    stats = run_load(plain, clients=64, duration_s=seconds)
    growth = (stats.rss_after - stats.rss_before) / 2**20
    report.add(
        "Load: 64 concurrent clients",
        "64 threads with their own keep-alive connection send a mix of 24 distinct requests "
        "(/v1/rerank, /v2/rerank top_n, /v1/score, TEI /rerank raw scores; 1-24 documents of "
        "3-60 words). Every answer is compared with the same request sent alone beforehand.",
        [
            ("duration", f"{stats.duration_s:.0f} s"),
            ("requests", stats.requests),
            ("documents scored", stats.documents),
            ("throughput", f"{stats.throughput:.1f} requests/s"),
            ("errors (non-200, transport, or a score off by > 1e-6 / raw 1e-5)", len(stats.errors)),
            ("latency p50", f"{stats.p50_ms:.0f} ms"),
            ("latency p99", f"{stats.p99_ms:.0f} ms"),
            ("latency max", f"{max(stats.latencies) * 1000:.0f} ms"),
            (
                "server RSS before → after",
                f"{stats.rss_before / 2**20:.0f} → {stats.rss_after / 2**20:.0f} MiB ({growth:+.0f} MiB)",
            ),
        ],
    )
    for error in stats.errors[:10]:
        report.violate(f"load: {error}")
    if growth > 300:
        report.violate(f"load: RSS grew {growth:.0f} MiB")


def overload(report: Report, plain: Server, queue: Server, slow: Server, rounds: int) -> None:
    admitted = rejected = wrong = other = 0
    reject_latency: list[float] = []
    admit_latency: list[float] = []
    for round_ in range(rounds):
        payloads = [
            {
                "query": f"flood {round_}.{n}",
                "documents": [f"request {n} document {d} " + "word " * 25 for d in range(5)],
            }
            for n in range(12)
        ]
        ids = [f"flood-{uuid.uuid4().hex}" for _ in payloads]
        barrier = threading.Barrier(12)

        def send(n: int, payloads=payloads, ids=ids, barrier=barrier) -> httpx.Response:
            with httpx.Client(base_url=queue.url, timeout=120) as client:
                barrier.wait()
                return client.post("/v1/rerank", json=payloads[n], headers={"X-Request-Id": ids[n]})

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(send, range(12)))
        for n, response in enumerate(responses):
            latency = queue.access_record(ids[n])["latency_ms"] / 1000
            if response.status_code == 200:
                admitted += 1
                admit_latency.append(latency)
                if not close(
                    scores_of(response.json()), reference(plain, "/v1/rerank", payloads[n])
                ):
                    wrong += 1
            elif response.status_code == 429 and response.headers.get("retry-after", "").isdigit():
                rejected += 1
                reject_latency.append(latency)
            else:
                other += 1
        time.sleep(1)
    report.add(
        "Overload: queue limit (--max-queued-tokens 2000)",
        f"{rounds} rounds of 12 simultaneous 5-document requests (~570 tokens each) against a "
        "server whose batches hold one pair and sleep 0.3 s. Latencies are the server's own "
        "(access log).",
        [
            ("admitted (200)", admitted),
            ("refused (429 with Retry-After)", rejected),
            ("other outcomes", other),
            ("admitted answers differing from a fault-free server", wrong),
            (
                "429 latency median / max",
                f"{ms(statistics.median(reject_latency)) if reject_latency else '-'} / {ms(max(reject_latency)) if reject_latency else '-'}",
            ),
            (
                "200 latency median / max",
                f"{ms(statistics.median(admit_latency)) if admit_latency else '-'} / {ms(max(admit_latency)) if admit_latency else '-'}",
            ),
        ],
    )
    if wrong or other or not rejected:
        report.violate(f"queue limit: {wrong} wrong, {other} unexpected, {rejected} refused")

    # concurrency cap and timeout on the slow server (delay 2 s, timeout 1 s, 2 at once)
    payload = {"query": "q", "documents": ["one document"]}
    capped = extra_total = late = 0
    cap_latency: list[float] = []
    held_statuses: list[int] = []
    for _ in range(rounds):
        clients = [httpx.Client(base_url=slow.url, timeout=60) for _ in range(6)]
        for client in clients:
            client.get("/health")  # connected before the measurement
        tokenized = slow.metric("rerankd_tokenize_seconds_count")
        ids = [f"cap-{uuid.uuid4().hex}" for _ in range(4)]
        with ThreadPoolExecutor(6) as pool:
            holders = [pool.submit(c.post, "/v1/rerank", json=payload) for c in clients[:2]]
            while slow.metric("rerankd_tokenize_seconds_count") < tokenized + 2:
                time.sleep(0.02)  # both held requests admitted
            extra = [
                pool.submit(c.post, "/v1/rerank", json=payload, headers={"X-Request-Id": i})
                for c, i in zip(clients[2:], ids, strict=True)
            ]
            answers = [f.result() for f in extra]
            in_flight = not any(h.done() for h in holders)
            held_statuses += [h.result().status_code for h in holders]
        for client in clients:
            client.close()
        if not in_flight:
            late += 1
            continue
        extra_total += len(answers)
        capped += sum(r.status_code == 429 for r in answers)
        cap_latency += [slow.access_record(i)["latency_ms"] / 1000 for i in ids]
    timeouts = []
    for _ in range(5):
        request_id = f"timeout-{uuid.uuid4().hex}"
        response = httpx.post(
            f"{slow.url}/v1/rerank", json=payload, headers={"X-Request-Id": request_id}, timeout=60
        )
        timeouts.append((response.status_code, slow.access_record(request_id)["latency_ms"] / 1000))
    healthy = slow.healthy()
    report.add(
        "Overload: concurrency cap and request timeout",
        "Server with --max-concurrent-requests 2 --request-timeout 1 and batches that sleep "
        f"2 s. {rounds} rounds: 2 requests held in flight, then 4 more at once. Latencies are "
        "the server's own (access log).",
        [
            ("requests beyond the cap answered 429", f"{capped} of {extra_total}"),
            ("429 latency median / max", f"{ms(statistics.median(cap_latency)) if cap_latency else '-'} / {ms(max(cap_latency)) if cap_latency else '-'}"),
            ("rounds discarded (held requests ended first)", late),
            ("held requests (each times out at 1 s)", ", ".join(map(str, sorted(set(held_statuses))))),
            ("timed-out requests (status, server seconds)", ", ".join(f"{s} in {t:.2f}" for s, t in timeouts)),
            ("healthy afterwards", healthy),
        ],
    )  # fmt: skip
    if capped != extra_total or any(s != 504 for s, _ in timeouts) or not healthy:
        report.violate("concurrency cap / timeout outcomes differ from the contract")


def cancellation(report: Report, queue: Server) -> None:
    before = queue.metrics_text()
    sent = 60
    body = json.dumps(
        {"query": "cancel me", "documents": [f"document number {i}" for i in range(sent)]}
    ).encode()
    with socket.create_connection(("127.0.0.1", queue.port), timeout=10) as sock:
        sock.sendall(raw_post("/v1/rerank", body))
        time.sleep(0.6)
    time.sleep(3)
    after = queue.metrics_text()
    computed = metric_sum(after, "rerankd_batch_pairs_sum") - metric_sum(
        before, "rerankd_batch_pairs_sum"
    )
    closed = metric_sum(after, "rerankd_requests_total", status="499") - metric_sum(
        before, "rerankd_requests_total", status="499"
    )
    report.add(
        "Cancellation: client disconnect",
        f"A {sent}-document request (one pair per 0.3 s batch: 18 s of work) whose client "
        "closes the connection after 0.6 s.",
        [
            ("pairs sent", sent),
            ("pairs computed", int(computed)),
            ("requests counted as 499", int(closed)),
        ],
    )
    if computed > sent / 4 or closed != 1:
        report.violate(f"cancellation: {computed} of {sent} pairs computed")


def faults(report: Report, plain: Server, faulty: Server) -> None:
    alone = httpx.post(
        f"{faulty.url}/v1/rerank", json={"query": "q", "documents": ["a", MARKED]}, timeout=60
    )
    alone_ok = alone.status_code == 500 and "inference failed" in alone.json()["error"]["message"]

    innocents = [
        {"query": f"innocent {n}", "documents": [f"plain document {n}.{d}" for d in range(5)]}
        for n in range(3)
    ]
    marked = {"query": "q", "documents": [MARKED]}
    for _attempt in range(3):
        shared, co_batched = co_batched_round(faulty, [marked, *innocents])
        if shared:
            break
    innocent_ok = sum(r.status_code == 200 for r in co_batched[1:])

    payloads = [
        {
            "query": f"oom {n}",
            "documents": [f"document {n}.{d} about stone bridges" for d in range(7)],
        }
        for n in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda p: httpx.post(f"{faulty.url}/v1/rerank", json=p, timeout=60), payloads)
        )
    identical = sum(
        r.status_code == 200 and close(scores_of(r.json()), reference(plain, "/v1/rerank", p))
        for r, p in zip(responses, payloads, strict=True)
    )
    report.add(
        "Faults: --fault-injection raise-on:FAULT_MARKER,oom-above:2,delay:0.5",
        "An engine failure on one request's document, alone and while other requests share "
        "its batch; and a simulated CUDA out-of-memory on every batch of more than 2 pairs.",
        [
            (
                "marked request alone",
                f"{alone.status_code} {alone.json()['error']['type'] if alone.status_code >= 400 else ''}",
            ),
            (
                "innocent requests batched with a marked one that succeeded",
                f"{innocent_ok} of {len(innocents)}"
                + ("" if shared else " (could not get all four into one batch in 3 tries)"),
            ),
            (
                "requests under simulated OOM with scores identical to a fault-free server",
                f"{identical} of {len(payloads)}",
            ),
            ("server healthy afterwards", faulty.healthy()),
        ],
    )
    if not alone_ok:
        report.violate(f"raise-on: marked request got {alone.status_code}")
    if innocent_ok != len(innocents):
        report.violate(
            f"raise-on: {len(innocents) - innocent_ok} of {len(innocents)} innocent requests "
            "sharing a batch with the marked one failed with it"
        )
    if identical != len(payloads):
        report.violate(f"oom-above: {len(payloads) - identical} requests differ or failed")


def shutdown(report: Report, plain: Server, drain: dict[str, Server]) -> None:
    rows = []
    for name, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        server = drain[name]
        payloads = [
            {"query": f"drain {n}", "documents": [f"request {n} document {d}" for d in range(4)]}
            for n in range(3)
        ]
        with ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(httpx.post, f"{server.url}/v1/rerank", json=p, timeout=60)
                for p in payloads
            ]
            while (
                server.metric("rerankd_tokenize_seconds_count") < len(payloads)
                or server.metric("rerankd_batch_pairs_count") < 1
            ):
                time.sleep(0.05)  # until all three are admitted and computing
            signalled = time.monotonic()
            server.signal(sig)
            time.sleep(0.3)
            health = httpx.get(f"{server.url}/health", timeout=10).status_code
            late = httpx.post(
                f"{server.url}/v1/rerank", json={"query": "q", "documents": ["late"]}, timeout=10
            )
            done = [f.result() for f in futures]
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = "did not exit in 30 s"
        took = time.monotonic() - signalled
        correct = sum(
            r.status_code == 200 and close(scores_of(r.json()), reference(plain, "/v1/rerank", p))
            for r, p in zip(done, payloads, strict=True)
        )
        rows.append(
            (
                signal.Signals(sig).name,
                f"/health {health}, new request {late.status_code} "
                f"(Retry-After {late.headers.get('retry-after')}), in-flight {correct}/3 "
                f"finished with correct scores (statuses {[r.status_code for r in done]}), "
                f"exit code {code} after {took:.1f} s",
            )
        )
        if health != 503 or late.status_code != 503 or correct != 3 or code != 0:
            report.violate(f"{signal.Signals(sig).name} drain: {rows[-1][1]}")

    server = drain["twice"]
    thread = threading.Thread(
        target=lambda: httpx.post(
            f"{server.url}/v1/rerank",
            json={"query": "q", "documents": [f"d {i}" for i in range(40)]},
            timeout=60,
        ),
        daemon=True,
    )
    thread.start()
    while server.metric("rerankd_batch_pairs_count") < 1:
        time.sleep(0.05)
    server.signal(signal.SIGTERM)
    time.sleep(1)
    second = time.monotonic()
    server.signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=15)
        outcome = f"exited with {code} {time.monotonic() - second:.1f} s after the second SIGTERM"
        prompt = time.monotonic() - second < 3
    except subprocess.TimeoutExpired:
        outcome = "still running 15 s after the second SIGTERM (killed)"
        prompt = False
        server.proc.kill()
        server.proc.wait()
    rows.append(("second SIGTERM during a 10 s drain", outcome))
    if not prompt:
        report.violate(f"second signal: {outcome}")
    report.add(
        "Shutdown: draining on SIGTERM / SIGINT",
        "Servers whose batches hold one pair and sleep 0.25 s; 3 requests of 4 documents in "
        "flight when the signal arrives.",
        rows,
    )


def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


def hostile_bodies(report: Report, hostile: Server) -> None:
    """Issue 15 item 7: many-small-values bodies, /health polled from another process."""
    rows = []
    baseline = health_baseline_p99(hostile)
    for name, make in HOSTILE_BODIES.items():
        body = make()
        with HealthPoller(hostile.url) as poller, RssSampler(hostile) as rss:
            before = hostile.rss_bytes()
            started = time.monotonic()
            status, raw = send_raw_request(hostile, raw_post("/v1/rerank", body))
            finished = time.monotonic()
            time.sleep(0.2)
        during = poller.latencies(started, finished)
        p99 = percentile(during, 99) if during else float("nan")
        growth = rss.peak - before
        rows.append(
            (
                name,
                f"{status} in {finished - started:.2f} s; /health p99 {ms(p99)} "
                f"(max {ms(max(during)) if during else '-'}, {len(during)} polls); "
                f"peak RSS +{mib(growth)} ({growth / len(body):.1f}x the body)",
            )
        )
        # over the value bound: drained as it arrives, never held; else parsed (about 3x)
        held_at_most = 16 * 2**20 if b"JSON values" in raw else 4 * len(body)
        if status != 400 or p99 > 0.100 + baseline or growth > held_at_most:
            report.violate(f"hostile body {name}: {rows[-1][1]}")
    rows.append(("/health p99 with no hostile body (same poller)", ms(baseline)))
    report.add(
        "Hostile bodies: many small JSON values (issue 15, item 7)",
        "Each body sent once on its own connection to a default server while another process "
        "polls /health every 10 ms; the p99 and max are of the polls in flight while the body "
        "was sent and answered. Peak RSS sampled from /proc every 10 ms. Contract: 400, "
        "/health p99 under 100 ms (beyond the idle p99 below); peak RSS growth at most 16 MiB "
        "for a body over the value bound (drained as it arrives, never held), 4x the body for "
        "one that is parsed.",
        rows,
    )


def oversized_fields(report: Report, hostile: Server) -> None:
    """Issue 15 item 8: 10 MB text fields refused (or cut) fast; memory comes back."""
    rows = []
    for field, (path, payload) in OVERSIZED.items():
        request_id = f"oversized-{uuid.uuid4().hex}"
        response = httpx.post(
            f"{hostile.url}{path}", json=payload, headers={"X-Request-Id": request_id}, timeout=60
        )
        server_s = hostile.access_record(request_id)["latency_ms"] / 1000
        rows.append((f"10 MB {field}", f"{response.status_code} in {ms(server_s)}"))
        if response.status_code != 400 or server_s >= 1.0:
            report.violate(f"10 MB {field}: {response.status_code} in {server_s:.2f} s")
    cut = {"query": "q", "documents": [{"title": TEN_MB, "text": "a"}], "rank_fields": ["title"]}
    request_id = f"cut-{uuid.uuid4().hex}"
    response = httpx.post(
        f"{hostile.url}/v1/rerank", json=cut, headers={"X-Request-Id": request_id}, timeout=60
    )
    server_s = hostile.access_record(request_id)["latency_ms"] / 1000
    rows.append(
        (
            "10 MB rank_fields value, truncate on (cut, scored)",
            f"{response.status_code} in {ms(server_s)}",
        )
    )
    cases = [*OVERSIZED.values(), ("/v1/rerank", cut)]
    before = hostile.rss_bytes()
    rss = []
    with httpx.Client(base_url=hostile.url, timeout=60) as client:
        for n in range(20):
            path, payload = cases[n % len(cases)]
            client.post(path, json=payload)
            rss.append(hostile.rss_bytes())
    rows.append(
        (
            "RSS before / after 2 / after 20 oversized requests",
            f"{mib(before)} / {mib(rss[1])} / {mib(rss[-1])}",
        )
    )
    if rss[-1] - rss[1] > 64 * 2**20:
        report.violate(f"oversized requests: RSS kept growing ({mib(rss[1])} -> {mib(rss[-1])})")
    report.add(
        "Oversized text fields (issue 15, item 8)",
        "A 10 MB (2 M words) value in each text field of a default server; server-side "
        "latency from its access log. Then 20 such requests in a row, RSS read after each.",
        rows,
    )  # fmt: skip


def flood(report: Report, server: Server, seconds: float) -> None:
    """Issue 15 item 9: 2,000-document requests against --max-queued-tokens 50000."""
    figures = run_flood(server, seconds=seconds)
    srv, cli = figures["server_429_s"], figures["client_429_s"]
    report.add(
        f"Flood: 2,000-document requests against --max-queued-tokens {FLOOD_QUEUE_TOKENS} "
        "(issue 15, item 9)",
        f"8 clients send 2,000-document requests (95 KB, ~38,000 estimated tokens) back to "
        f"back for {seconds:.0f} s, pausing 50 ms after a 429. One request fits the queue at a "
        "time; the rest must be refused before they are tokenized. Server latency from the "
        "access log; client latency includes the client's own 8 threads.",
        [
            ("admitted (200) / refused (429) / other", f"{figures['admitted']} / {figures['refused']} / {len(figures['other'])}"),
            ("429 latency, server: p50 / p99 / max", f"{ms(percentile(srv, 50))} / {ms(percentile(srv, 99))} / {ms(max(srv))}"),
            ("429 latency, client: p50 / p99 / max", f"{ms(percentile(cli, 50))} / {ms(percentile(cli, 99))} / {ms(max(cli))}"),
            ("RSS before / peak / after", f"{mib(figures['rss_before'])} / {mib(figures['rss_peak'])} / {mib(figures['rss_after'])}"),
            ("healthy afterwards", server.healthy()),
        ],
    )  # fmt: skip
    if figures["other"] or percentile(srv, 99) > 0.100:
        report.violate(f"flood: 429 p99 {ms(percentile(srv, 99))}, other {figures['other'][:5]}")
    if figures["rss_peak"] - figures["rss_before"] > 300 * 2**20:
        report.violate(f"flood: RSS peak {mib(figures['rss_peak'])}")


def non_finite(report: Report, nan: Server) -> None:
    """Issue 15 item 10: a checkpoint whose scores are NaN."""
    rows = []
    for path, payload in NAN_REQUESTS:
        response = httpx.post(f"{nan.url}{path}", json=payload, timeout=60)
        message = response.json().get("error", {}).get("message", "") if response.content else ""
        rows.append((path, f"{response.status_code}: {message[:90]}"))
        if response.status_code != 500 or "non-finite" not in message:
            report.violate(f"NaN checkpoint {path}: {response.status_code}")
    started = time.monotonic()
    while (health := httpx.get(f"{nan.url}/health", timeout=10)).status_code == 200:
        if time.monotonic() - started > 15:
            break
        time.sleep(0.1)
    rows.append(
        (
            "/health after them",
            f"{health.status_code} {health.json().get('error', health.json())}"[:160],
        )
    )
    rows.append(
        (
            'rerankd_failures_total{kind="non_finite"}',
            int(nan.metric("rerankd_failures_total", kind="non_finite")),
        )
    )
    if health.status_code != 503:
        report.violate("NaN checkpoint: /health did not turn 503")
    report.add(
        "Non-finite scores: a checkpoint with one NaN weight (issue 15, item 10)",
        "The tiny fixture with model.norm.weight[0] = NaN, so every score is NaN.",
        rows,
    )  # fmt: skip


def slowloris(report: Report, plain: Server, per_kind: int) -> None:
    """How long the default limits let trickling clients hold a connection."""
    kinds = {
        "idle (connects, sends nothing)": b"",
        "slow head (a byte a second)": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200,
        "slow body (a byte a second)": b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n" + b" " * 200,
    }  # fmt: skip

    def hold(payload: bytes, limit_s: float = 120.0) -> float:
        """Seconds until the server closed the connection (inf: still open at limit_s)."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", plain.port), timeout=5) as sock:
            head_end = payload.find(b"\r\n\r\n")
            if head_end >= 0:  # a complete head at once: only its body trickles
                sock.sendall(payload[: head_end + 4])
                payload = payload[head_end + 4 :]
            sent = 0
            while time.monotonic() - started < limit_s:
                try:
                    if sent < len(payload):
                        sock.sendall(payload[sent : sent + 1])
                        sent += 1
                    readable, _, _ = select.select([sock], [], [], 1.0)
                    if readable and sock.recv(65536) == b"":
                        break  # closed (after a 408, or silently when idle)
                except OSError:
                    break
            else:
                return float("inf")
        return time.monotonic() - started

    rows = []
    sockets_before = len(list(Path(f"/proc/{plain.pid}/fd").iterdir()))
    with HealthPoller(plain.url) as poller, ThreadPoolExecutor(per_kind * len(kinds)) as pool:
        futures = {k: [pool.submit(hold, p) for _ in range(per_kind)] for k, p in kinds.items()}
        time.sleep(2)
        held = len(list(Path(f"/proc/{plain.pid}/fd").iterdir())) - sockets_before
        times = {k: sorted(f.result() for f in fs) for k, fs in futures.items()}
    for kind, values in times.items():
        rows.append(
            (kind, f"{per_kind} clients, each closed after {values[0]:.1f}-{values[-1]:.1f} s")
        )
        if values[-1] == float("inf"):
            report.violate(f"slowloris {kind}: a connection was never closed")
    rows.append(("server file descriptors held 2 s in", held))
    rows.append(
        (
            "server file descriptors after",
            len(list(Path(f"/proc/{plain.pid}/fd").iterdir())) - sockets_before,
        )
    )
    rows.append(
        (
            "/health p99 / max meanwhile",
            f"{ms(percentile(poller.latencies(), 99))} / {ms(max(poller.latencies()))}",
        )
    )
    report.add(
        "Connections held: slowloris clients against the default limits",
        "Clients that connect and send nothing, trickle a request head a byte a second, or "
        "send a head and trickle its body a byte a second (defaults: --header-timeout 10, "
        "--body-timeout 30). Each row: when the server closed those connections.",
        rows,
    )  # fmt: skip


# --- the report -----------------------------------------------------------------------------------


def git_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "rerankd"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + (" (rerankd/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 2**20:.0f}"
    except (OSError, ValueError, IndexError):
        return "?"


def write(report: Report, path: Path, args: argparse.Namespace, started: float) -> None:
    import fastapi
    import torch
    import uvicorn

    import rerankd

    lines = [
        "# rerankd reliability report",
        "",
        f"Written by `python scripts/reliability.py{' --quick' if args.quick else ''}`; every "
        "number below was measured by that run. Regenerate it rather than edit it. The same "
        'scenarios, as assertions: `python -m pytest tests/hardening -m "slow or not slow"`.',
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- rerankd {rerankd.__version__} at {args.revision}; torch {torch.__version__}, "
        f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, Python {platform.python_version()}",
        f"- machine: {os.cpu_count()} CPU cores ({cpu_model()}), {memory_gib()} GiB memory, "
        f"load average before the run {args.load_before}, after it "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; servers and clients share "
        "these cores, and timings move with the load",
        "- model: the tiny seeded Qwen3-Reranker test fixture (float32, CPU), so latencies "
        "measure the server, not a real model",
        f"- total time: {time.monotonic() - started:.0f} s",
        "",
        "## Outcome",
        "",
    ]
    if report.violations:
        lines.append(f"{len(report.violations)} contract violations:")
        lines.append("")
        lines += [f"- {v}" for v in report.violations]
    else:
        lines.append("No contract violations.")
    for title, what, rows in report.sections:
        lines += ["", f"## {title}", "", what, "", "| measure | result |", "|---|---|"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run of every scenario")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--load-seconds", type=float, default=None, help="default 120 (quick: 10)")
    parser.add_argument(
        "--fuzz-examples", type=int, default=None,
        help="schemathesis cases per POST route and mode (default 520 → >5,000 requests; quick: 10)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    load_s = args.load_seconds or (10 if args.quick else 120)
    examples = args.fuzz_examples or (10 if args.quick else 520)
    args.load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    args.revision = git_revision()  # what the servers run: taken before they start
    started = time.monotonic()
    report = Report()

    print("starting servers ...", flush=True)
    servers = launch_servers(
        {
            "plain": [],
            "queue": ["--fault-injection", "delay:0.3", "--max-batch-tokens", "1", "--max-queued-tokens", "2000"],
            "slow": ["--fault-injection", "delay:2", "--request-timeout", "1", "--max-concurrent-requests", "2"],
            "faults": ["--fault-injection", "raise-on:FAULT_MARKER,oom-above:2,delay:0.5"],
            "sigterm": SLOW_DRAIN,
            "sigint": SLOW_DRAIN,
            "twice": SLOW_DRAIN,
            "hostile": [],
            "flood": ["--max-queued-tokens", str(FLOOD_QUEUE_TOKENS)],
            "nan": ["--model", str(nan_model_dir())],
        }
    )  # fmt: skip
    try:
        plain = servers["plain"]
        fuzz(report, plain, examples, budget_s=300 if args.quick else 1500)
        load(report, plain, load_s)
        overload(report, plain, servers["queue"], servers["slow"], rounds=2 if args.quick else 5)
        cancellation(report, servers["queue"])
        faults(report, plain, servers["faults"])
        shutdown(report, plain, servers)
        hostile_bodies(report, servers["hostile"])
        oversized_fields(report, servers["hostile"])
        flood(report, servers["flood"], seconds=10 if args.quick else 120)
        non_finite(report, servers["nan"])
        slowloris(report, plain, per_kind=5 if args.quick else 30)
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in servers.values():
            server.stop(timeout=15)
    write(report, args.output, args, started)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
