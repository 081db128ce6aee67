"""Real `rerankd serve` processes for the hardening suite, with their output captured.

tests/conftest.py's `start_server` yields only a URL; these tests also need the process
(signals, exit code, RSS) and the output while it runs (access log, secrets), so they start
servers here. `ServerPool` starts every server the collected tests need at once, before the
first test, so start-ups overlap with each other and never with a timing-sensitive test;
output goes to a file that tests read back.

The helpers are plain functions so that scripts/reliability.py can use them too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    REPO_ROOT,
    START_TIMEOUT_S,
    Server,
    offline_env,
    spawn_rerankd,
)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}

_log_root: Path | None = None


def _log_dir() -> Path:
    global _log_root
    if _log_root is None:
        _log_root = Path(tempfile.mkdtemp(prefix="rerankd-hardening-"))
        atexit.register(shutil.rmtree, _log_root, ignore_errors=True)
    return _log_root


def qwen3_model_dir() -> Path:
    """The tiny seeded Qwen3-Reranker checkpoint (built once per process or cache)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.fixtures.paths import fixture_dir

    return fixture_dir("qwen3")


def nan_model_dir() -> Path:
    """A copy of the tiny Qwen3 fixture with one weight set to NaN (the final norm's first
    element, so every pair's score is NaN): a broken checkpoint, as fp16 overflow makes one."""
    import torch
    from safetensors.torch import load_file, save_file

    target = _log_dir() / "qwen3-nan"
    if (target / "model.safetensors").is_file():
        return target
    source = qwen3_model_dir()
    staging = Path(tempfile.mkdtemp(prefix=".qwen3-nan-", dir=_log_dir()))
    for item in source.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy2(item, staging / item.name)
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].clone()
    weights["model.norm.weight"][0] = torch.nan
    save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
    staging.rename(target)
    return target


def qwen3_vl_model_dir() -> Path:
    """The tiny seeded Qwen3-VL-Reranker checkpoint (built once per process)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.fixtures.qwen3_vl import qwen3_vl_dir

    return qwen3_vl_dir()


def jina_m0_model_dir() -> Path:
    """The tiny seeded jina-reranker-m0 checkpoint (built once per process)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.fixtures.jina_m0 import jina_m0_dir

    return jina_m0_dir()


def base_args(*extra: str) -> list[str]:
    """Serve the tiny Qwen3 fixture in float32 on the CPU, plus `extra` flags."""
    return ["--model", str(qwen3_model_dir()), "--dtype", "float32", "--device", "cpu", *extra]


def launch_servers(
    specs: dict[str, Sequence[str]], env: dict[str, str] | None = None
) -> dict[str, Server]:
    """Start one server per {name: extra flags} at once; return them once all are healthy."""
    servers: dict[str, Server] = {}
    try:
        for name, extra in specs.items():
            servers[name] = spawn_rerankd(name, base_args(*extra), _log_dir(), env)
        for server in servers.values():
            server.wait_healthy(START_TIMEOUT_S)
    except BaseException:
        for server in servers.values():
            server.stop(timeout=5)
        raise
    return servers


# --- HTTP helpers ---------------------------------------------------------------------------


def error_shape_problem(response: httpx.Response) -> str | None:
    """None if the body is exactly `{"error": {message, type, param, code}}` for its status."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or set(body) != {"error", "detail"}:
        return f"not an error object: {str(body)[:200]}"
    error = body["error"]
    if body["detail"] != error.get("message"):  # Jina's clients read the message here
        return f"detail {body['detail']!r} is not the message"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"wrong error keys: {str(error)[:200]}"
    if not isinstance(error["message"], str) or not error["message"].strip():
        return "empty message"
    if not isinstance(error["type"], str) or not error["type"]:
        return "empty type"
    if error["param"] is not None and not isinstance(error["param"], str):
        return f"param is {type(error['param']).__name__}"
    if error["code"] != response.status_code:
        return f"code {error['code']!r} != status {response.status_code}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {response.headers.get('content-type')!r}"
    return None


def assert_error(
    response: httpx.Response,
    status: int,
    param: Any = ...,
    contains: Sequence[str] = (),
) -> dict[str, Any]:
    """`response` is the documented error JSON with `status` (and its documented type)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    problem = error_shape_problem(response)
    assert problem is None, problem
    error = response.json()["error"]
    if status in ERROR_TYPES:
        assert error["type"] == ERROR_TYPES[status], error
    assert "Traceback" not in error["message"], error
    if param is not ...:
        assert error["param"] == param, error
    for fragment in contains:
        assert fragment.lower() in error["message"].lower(), (fragment, error["message"])
    return error


def scores_of(body: Any) -> list[float]:
    """Scores in input order from a rerank, score or TEI response body."""
    if isinstance(body, list):  # TEI
        return [item["score"] for item in sorted(body, key=lambda item: item["index"])]
    if "results" in body:
        return [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]
    return [d["score"] for d in sorted(body["data"], key=lambda d: d["index"])]


def assert_scores_close(actual: Sequence[float], expected: Sequence[float], tol: float = 1e-6):
    assert len(actual) == len(expected), (len(actual), len(expected))
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert abs(a - e) <= tol, f"pair {i}: {a!r} != {e!r}"


@dataclass
class RawResponse:
    status: int | None
    headers: dict[str, str]
    body: bytes
    raw: bytes


def raw_http(port: int, request: bytes, timeout: float = 30.0) -> RawResponse:
    """Send bytes as they are on a fresh connection; read one response (or until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if match and len(body) >= int(match.group(1)):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0]) if lines else None
    if match:
        status = int(match.group(1))
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return RawResponse(status, headers, body, data)


def raw_post(path: str, body: bytes, extra_headers: bytes = b"", host: bytes = b"127.0.0.1"):
    """A complete HTTP/1.1 POST as bytes, with Content-Length and `Connection: close`."""
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra_headers + b"\r\n" + body
    )


def send_raw_request(server: Server, request: bytes, timeout: float = 120) -> tuple[int, bytes]:
    """Send a complete raw HTTP request on a fresh socket; the status and the raw response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(2**20):
            data += chunk
    return int(data[9:12]), data


#: polls /health from its own process (so that the client's GIL never shows up as server
#: latency) and prints `[[monotonic time, seconds], ...]` as JSON when stdin closes
_HEALTH_POLLER = """
import json, sys, threading, time, httpx
url, pause = sys.argv[1], float(sys.argv[2])
done, samples = threading.Event(), []
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
with httpx.Client(base_url=url, timeout=60) as client:
    print("ready", flush=True)
    while not done.is_set():
        started = time.perf_counter()
        client.get("/health")
        samples.append((time.monotonic(), time.perf_counter() - started))
        time.sleep(pause)
print(json.dumps(samples), flush=True)
"""


class HealthPoller:
    """`/health` latency measured from another process while something else happens:

    with HealthPoller(server.url) as poller:
        ...
    poller.latencies(since, until)  # seconds
    """

    def __init__(self, url: str, pause_s: float = 0.01) -> None:
        self.url = url
        self.pause_s = pause_s
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> HealthPoller:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _HEALTH_POLLER, self.url, str(self.pause_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=offline_env(),
        )
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # a few polls before whatever is measured
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("", timeout=120)
        # a sample is (end time, latency): a poll started at end - latency
        self.samples = [(end - took, took) for end, took in json.loads(out)]

    def latencies(self, since: float = 0.0, until: float = math.inf) -> list[float]:
        """Latencies of the polls that were in flight at any point between since and until
        (monotonic seconds, this machine's clock: the poller shares it)."""
        return [took for start, took in self.samples if start + took >= since and start <= until]


class RssSampler:
    """Peak resident memory of a process, sampled from /proc every `interval_s`."""

    def __init__(self, server: Server, interval_s: float = 0.01) -> None:
        self.server = server
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, self.server.rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = self.server.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# --- the servers of the suite ---------------------------------------------------------------

#: API keys of the `secure` server: one by flag, the rest from its --api-key-file
FLAG_KEY = "SECRET123"
FILE_KEY = "FILEKEY456"
KEY_FILE_TEXT = f"# keys for the hardening suite\n{FILE_KEY}\n\n# COMMENTED789\n   # INDENTED000\n"
CORS_ORIGIN = "https://app.example"
SLOW_DRAIN = ["--fault-injection", "delay:0.25", "--max-batch-tokens", "1"]


def _key_file() -> str:
    path = _log_dir() / "api-keys.txt"
    path.write_text(KEY_FILE_TEXT, encoding="utf-8")
    return str(path)


#: every server a test module may ask for (its module-level SERVERS tuple), by name
SERVER_SPECS: dict[str, Any] = {
    "plain": lambda: [],  # the session's shared server (ServerPool)
    # test_limits (tests/api/test_limits.py has the limits an in-process app checks)
    "queue": lambda: [
        "--fault-injection", "delay:0.3", "--max-batch-tokens", "1", "--max-queued-tokens", "2000",
        "--max-request-bytes", "4096",
    ],
    # (engine faults through the app: tests/api/test_engine_faults.py, in-process)
    # test_security
    "secure": lambda: [
        "--api-key", FLAG_KEY, "--api-key-file", _key_file(), "--cors-origin", CORS_ORIGIN,
    ],
    # test_hostile_inputs: default limits (RSS and /health latency measured there alone)
    # and the flood of item 9 of issue 15 (a NaN checkpoint: tests/api/test_limits.py)
    "hostile": lambda: [],
    "flood": lambda: ["--max-queued-tokens", "50000"],
    # test_hostile_images: the tiny Qwen3-VL-Reranker, every default (images as data: URIs
    # only, the default byte and pixel caps)
    "images": lambda: ["--model", str(qwen3_vl_model_dir())],
    "m0": lambda: ["--model", str(jina_m0_model_dir())],  # the same, jina-reranker-m0
    # test_shutdown (each is used up by its test)
    "sigterm": lambda: SLOW_DRAIN,
    "sigint": lambda: SLOW_DRAIN,
    "twice": lambda: SLOW_DRAIN,
}  # fmt: skip


class ServerPool:
    """Starts the servers the collected tests need all at once, before the first test runs,
    so that start-ups (mostly importing torch) overlap with each other and never with a
    timing-sensitive test. `plain` is the session's shared float32 server (tests/conftest.py:
    `qwen3_float32`, the same flags as `base_args()`), owned by that fixture, not the pool."""

    def __init__(self, shared_plain: Callable[[], Server]) -> None:
        self.servers: dict[str, Server] = {}
        self._shared_plain = shared_plain

    def start(self, names: Sequence[str]) -> None:
        new = {n: SERVER_SPECS[n]() for n in names if n not in self.servers and n != "plain"}
        spawned = {n: spawn_rerankd(n, base_args(*extra), _log_dir()) for n, extra in new.items()}
        self.servers.update(spawned)
        try:
            if "plain" in names and "plain" not in self.servers:  # starts while they start
                self.servers["plain"] = self._shared_plain()
            for server in spawned.values():
                server.wait_healthy(START_TIMEOUT_S)
        except BaseException:
            for name, server in spawned.items():
                server.stop(timeout=5)
                del self.servers[name]
            raise

    def get(self, name: str) -> Server:
        self.start([name])
        return self.servers[name]

    def stop_all(self) -> None:
        own = [server for name, server in self.servers.items() if name != "plain"]
        for server in own:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in own:
            server.stop()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_pool(request: pytest.FixtureRequest) -> Iterator[ServerPool]:
    wanted: dict[str, None] = {}
    for item in request.session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rpartition(".")[0].endswith("hardening"):
            wanted.update(dict.fromkeys(getattr(module, "SERVERS", ())))
    pool = ServerPool(lambda: request.getfixturevalue("qwen3_float32"))
    try:
        pool.start(list(wanted))
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, server_pool: ServerPool) -> dict[str, Server]:
    """The servers named in the requesting module's SERVERS tuple."""
    return {name: server_pool.get(name) for name in getattr(request.module, "SERVERS", ())}


@pytest.fixture(scope="session")
def plain_server(server_pool: ServerPool) -> Server:
    """A server with every default (no keys, no CORS, no faults), shared by the session
    (tests/e2e and the client tests use it too: tests/conftest.py, `qwen3_float32`)."""
    return server_pool.get("plain")


@pytest.fixture(scope="session")
def plain(plain_server: Server) -> Iterator[httpx.Client]:
    with plain_server.client() as client:
        yield client
