"""The connection layer under attack (issue 15, items 3, 5, 6, 12, 13): huge and many
headers, slowloris (idle, slow head, slow body, idle keep-alive), the connection cap,
SIGHUP key reload, and a drain that runs out of time.

The `timeouts` server runs with second-scale limits so each slowloris case takes seconds;
the huge-header cases run against the `plain` server, i.e. the default limits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from rerankd.settings import Settings
from tests.harness import metric_sum

from .conftest import (
    SERVER_SPECS,
    Server,
    percentile,
    raw_http,
)

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 1.0
#: how late a deadline may fire on a busy 2-core CI machine
SLACK_S = 1.5
MAX_CONNECTIONS = 4
DRAIN_TIMEOUT_S = 2.0
#: a batch sleeps this long: far past the drain timeout
DRAIN_DELAY_S = 30.0

_key_dir = Path(tempfile.mkdtemp(prefix="rerankd-transport-keys-"))
KEY_FILE = _key_dir / "keys.txt"
OLD_KEY, NEW_KEY = "OLDKEY-1111", "NEWKEY-2222"

# this module's servers, started by the hardening suite's pool with everyone else's
SERVER_SPECS.setdefault(
    "timeouts",
    lambda: [
        "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
        "--keep-alive-timeout", str(KEEP_ALIVE_S), "--max-header-bytes", "4096",
    ],
)  # fmt: skip
SERVER_SPECS.setdefault(
    "keyed",
    lambda: (
        KEY_FILE.write_text(f"# keys\n{OLD_KEY}\n"),
        ["--api-key-file", str(KEY_FILE), "--max-connections", str(MAX_CONNECTIONS)],
    )[1],
)
SERVER_SPECS.setdefault(
    "drain",
    lambda: [
        "--fault-injection", f"delay:{DRAIN_DELAY_S}", "--drain-timeout", str(DRAIN_TIMEOUT_S),
    ],
)  # fmt: skip

SERVERS = ("plain", "timeouts", "keyed", "drain")


def _connect(server: Server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or `limit_s`), and when it closed."""
    sock.settimeout(limit_s)
    data, started = b"", time.monotonic()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - started


def _status_and_json(data: bytes) -> tuple[int, httpx.Response]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return status, httpx.Response(status, headers=headers, content=body)


def _error_problem(response: httpx.Response) -> str | None:
    """None if `response` carries rerankd's error JSON for its status (`{"error": {message,
    type, param, code}}`; other top-level keys, such as a `detail` copy, are allowed)."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {response.headers.get('content-type')!r}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"no error object: {response.text[:200]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"wrong error keys: {str(error)[:200]}"
    if error["code"] != response.status_code or not str(error["message"]).strip():
        return f"wrong code or empty message: {error}"
    return None


def _assert_json_error(data: bytes, status: int) -> httpx.Response:
    assert data, "the server closed without an answer"
    got, response = _status_and_json(data)
    assert got == status, data[:300]
    problem = _error_problem(response)
    assert problem is None, problem
    assert response.headers.get("x-request-id"), data[:300]
    assert response.headers.get("connection") == "close"
    return response


def _health_latencies(server: Server, stop: threading.Event) -> list[float]:
    """GET /health over and over from a separate client until `stop`; seconds each."""
    times: list[float] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            times.append(time.perf_counter() - started)
            time.sleep(0.01)
    return times


def _while_health_probed(server: Server, attack: Callable[[], None]) -> list[float]:
    stop = threading.Event()
    result: list[list[float]] = []
    probe = threading.Thread(target=lambda: result.append(_health_latencies(server, stop)))
    probe.start()
    try:
        time.sleep(0.2)
        attack()
        time.sleep(0.2)
    finally:
        stop.set()
        probe.join(timeout=30)
    assert result, "the /health probe failed"
    return result[0]


def _send_huge_head(server: Server, head: bytes, filler: bytes, total: int) -> tuple[bytes, float]:
    """Stream `head`, then `filler` over and over up to `total` bytes (never an end of
    head); return what the server answered and how long until it stopped the stream."""
    sock = _connect(server)
    started = time.monotonic()
    answer = b""
    try:
        sock.sendall(head)
        sent = len(head)
        while sent < total:
            sock.sendall(filler)
            sent += len(filler)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused mid-stream: what we want
    finally:
        with contextlib.suppress(OSError):
            answer, _ = _read_until_closed(sock, 5)
        sock.close()
    return answer, time.monotonic() - started


HUGE = 100 * 1024 * 1024


def test_defaults_are_the_documented_limits():
    settings = Settings()
    assert settings.max_header_bytes == 16_384 <= 64 * 1024
    assert (settings.header_timeout, settings.body_timeout) == (10.0, 30.0)
    assert (settings.keep_alive_timeout, settings.max_connections) == (5.0, 1024)


@pytest.mark.parametrize(
    "filler",
    [b"a" * (1 << 20), (b"X-Many: " + b"a" * 100 + b"\r\n") * 10_000],
    ids=["one-huge-header", "many-headers"],
)
def test_100_mb_of_headers_are_refused_fast_and_health_stays_fast(servers, filler):
    server = servers["plain"]  # the default limits
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    if filler.startswith(b"a"):
        head += b"X-Huge: "
    outcome: dict[str, object] = {}

    def attack() -> None:
        outcome["answer"], outcome["took"] = _send_huge_head(server, head, filler, HUGE)

    latencies = _while_health_probed(server, attack)
    answer = outcome["answer"]
    assert isinstance(answer, bytes)
    if answer:  # 431 JSON, or the connection closed with nothing
        _assert_json_error(answer, 431)
    assert outcome["took"] < 5, f"the server read {HUGE >> 20} MB for {outcome['took']:.1f}s"
    assert len(latencies) >= 3, latencies
    assert max(latencies) < 0.5, f"/health max {max(latencies) * 1e3:.0f} ms during the attack"
    assert percentile(latencies, 99) < 0.5
    assert server.proc.poll() is None


def test_a_head_under_the_limit_and_a_large_body_are_served(servers):
    """The head limit counts the head only: a 12 KiB head and a 1 MB body pass."""
    server = servers["plain"]
    headers = {f"X-Pad-{i}": "p" * 100 for i in range(100)}  # ~12 KiB of headers
    documents = ["a river runs " * 20] * 3000  # ~780 KB of JSON
    response = httpx.post(
        f"{server.url}/v1/rerank",
        json={"query": "river", "documents": documents, "top_n": 1},
        headers=headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text[:300]


def test_an_idle_connection_is_closed_after_the_header_timeout(servers):
    server = servers["timeouts"]
    sock = _connect(server)
    data, took = _read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S + 5)
    sock.close()
    assert data == b""  # nothing was asked, nothing is answered
    assert HEADER_TIMEOUT_S - 0.2 < took < HEADER_TIMEOUT_S + SLACK_S, took


def test_a_head_trickled_a_byte_at_a_time_gets_408_after_the_header_timeout(servers):
    server = servers["timeouts"]
    sock = _connect(server)
    started = time.monotonic()
    closed_at = None
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - started > HEADER_TIMEOUT_S + SLACK_S + 2:
                break
    except (BrokenPipeError, ConnectionResetError):
        closed_at = time.monotonic() - started
    data, _ = _read_until_closed(sock, 5)
    sock.close()
    closed_at = closed_at or time.monotonic() - started
    _assert_json_error(data, 408)
    assert closed_at < HEADER_TIMEOUT_S + SLACK_S + 0.5, closed_at


def test_a_body_trickled_a_byte_at_a_time_gets_408_after_the_body_timeout(servers):
    server = servers["timeouts"]
    body = b'{"query": "q", "documents": ["' + b"d" * 200 + b'"]}'
    head = (
        b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    sock = _connect(server)
    sock.sendall(head)
    started = time.monotonic()
    try:
        for byte in body:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - started > BODY_TIMEOUT_S + SLACK_S + 2:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    data, _ = _read_until_closed(sock, 5)
    sock.close()
    _assert_json_error(data, 408)
    error = _status_and_json(data)[1].json()["error"]
    assert "body" in error["message"], error


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(servers):
    server = servers["timeouts"]
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(10)
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    data, took = _read_until_closed(sock, KEEP_ALIVE_S + SLACK_S + 5)
    sock.close()
    assert data == b""
    assert took < KEEP_ALIVE_S + SLACK_S, took


def test_a_head_in_pieces_within_the_timeout_is_served(servers):
    """The deadline is for the whole head, not per read: a slow-ish client still works."""
    server = servers["timeouts"]
    sock = _connect(server)
    for part in (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Connection: close\r\n\r\n"):
        sock.sendall(part)
        time.sleep(HEADER_TIMEOUT_S / 5)
    data, _ = _read_until_closed(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_a_head_over_a_configured_limit_gets_431(servers):
    server = servers["timeouts"]  # --max-header-bytes 4096
    ok = raw_http(
        server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 3000 + b"\r\n\r\n"
    )
    assert ok.status == 200
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 5000 + b"\r\n\r\n"
    refused = raw_http(server.port, big)
    _assert_json_error(refused.raw, 431)


def test_connections_beyond_the_cap_get_503_and_are_closed(servers):
    server = servers["keyed"]
    held = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # accepted by the server
        extra = _connect(server)
        data, took = _read_until_closed(extra, 10)
        extra.close()
        response = _assert_json_error(data, 503)
        assert response.headers["retry-after"].isdigit()
        assert took < 3, took
        # the held connections are still served
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = _read_until_closed(held[0], 10)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    finally:
        for sock in held:
            sock.close()
    # a slot is free again once connections close
    deadline = time.monotonic() + 5
    while True:
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "no connection accepted after the others closed"
        time.sleep(0.1)


# --- SIGHUP -------------------------------------------------------------------------------


def _status_with(server: Server, key: str) -> int:
    response = httpx.get(
        f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    return response.status_code


def _hup_and_wait_for(server: Server, line: str, before: int) -> None:
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while server.output().count(line) <= before:
        assert server.proc.poll() is None, server.output()[-2000:]
        assert time.monotonic() < deadline, f"no {line!r} in the log"
        time.sleep(0.05)


def test_sighup_reloads_the_key_file_and_keeps_the_old_keys_if_it_is_empty(servers):
    server = servers["keyed"]
    assert _status_with(server, OLD_KEY) == 200
    assert _status_with(server, NEW_KEY) == 401

    reloaded = "SIGHUP: reloaded"
    KEY_FILE.write_text(f"{NEW_KEY}\n")
    _hup_and_wait_for(server, reloaded, server.output().count(reloaded))
    assert _status_with(server, NEW_KEY) == 200
    assert _status_with(server, OLD_KEY) == 401
    assert "1 API keys" in server.output()

    kept = "SIGHUP: keeping the"
    for broken in ("# only a comment\n\n", None):  # an empty file, then no file at all
        if broken is None:
            KEY_FILE.unlink()
        else:
            KEY_FILE.write_text(broken)
        _hup_and_wait_for(server, kept, server.output().count(kept))
        assert _status_with(server, NEW_KEY) == 200
        assert _status_with(server, OLD_KEY) == 401
    assert server.proc.poll() is None
    assert NEW_KEY not in server.output() and OLD_KEY not in server.output()
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401  # still on


def test_sighup_without_a_key_file_is_ignored(servers):
    server = servers["timeouts"]
    _hup_and_wait_for(server, "SIGHUP ignored", server.output().count("SIGHUP ignored"))
    assert server.healthy()


# --- drain timeout ------------------------------------------------------------------------


def test_requests_still_running_when_the_drain_times_out_get_503_json(servers):
    server = servers["drain"]
    result: dict[str, object] = {}

    def in_flight() -> None:
        try:
            result["response"] = httpx.post(
                f"{server.url}/v1/rerank",
                json={"query": "drain", "documents": ["one", "two"]},
                headers={"X-Request-Id": "drain-expiry-1"},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            result["error"] = exc

    thread = threading.Thread(target=in_flight, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while metric_sum(server.metrics_text(), "rerankd_tokenize_seconds_count") < 1:
        assert time.monotonic() < deadline, "the request did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # inside its (30 s) batch

    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    thread.join(timeout=DRAIN_TIMEOUT_S + 10)
    answered = time.monotonic() - signalled
    try:
        code = server.wait(timeout=DRAIN_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        pytest.fail(f"still running {DRAIN_TIMEOUT_S + 10:g}s after SIGTERM")
    exited = time.monotonic() - signalled

    response = result.get("response")
    assert isinstance(response, httpx.Response), result
    assert response.status_code == 503, response.text
    assert _error_problem(response) is None, response.text
    assert response.headers["x-request-id"] == "drain-expiry-1"
    assert DRAIN_TIMEOUT_S - 0.2 < answered < DRAIN_TIMEOUT_S + 1.5, answered
    assert code == 0, server.output()[-3000:]
    assert exited < DRAIN_TIMEOUT_S + 2, f"exited {exited:.1f}s after SIGTERM"
    output = server.output()
    assert "drain timeout" in output
    assert "Traceback" not in output, output[-3000:]


def test_serve_refuses_a_header_limit_above_64_kib(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKD_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rerankd.cli",
            "serve",
            "--model",
            str(tmp_path),
            "--max-header-bytes",
            "100000",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--max-header-bytes" in proc.stderr
    assert "Traceback" not in proc.stderr
