"""What rerankd's connection limits cost: tiny-fixture latency on three HTTP stacks,
interleaved in one run (docs/benchmarks.md, "HTTP stack limits: cost").

Stacks, each a `rerankd serve`-equivalent process on the tiny Qwen3 test fixture:

* ``httptools``: uvicorn's httptools protocol as rerankd used it before (no limits);
* ``guarded``: rerankd.http_server's GuardedHttpToolsProtocol (what `rerankd serve` runs);
* ``h11``: uvicorn's h11 protocol with its own limits (`h11_max_incomplete_event_size`,
  `timeout_keep_alive`, `limit_concurrency`; it has no head or body deadline).

`--rounds` x `--per-round` turns; each turn sends one request (1 query x 16 short documents,
one keep-alive client per server) to each server in turn, so the machine's load falls on
all three alike. Prints p50/p99 per stack and the median of the per-turn ratios.

    python benchmarks/bench_http_stack.py --rounds 10 --per-round 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
STACKS = ("httptools", "guarded", "h11")


def serve(stack: str, model: str, port: int) -> None:
    """Child process: the tiny fixture behind `stack` on 127.0.0.1:`port`."""
    import uvicorn

    from rerankd.api import create_app
    from rerankd.http_server import ConnectionLimits, GuardedConfig
    from rerankd.runtime import build_service
    from rerankd.server import DrainingServer
    from rerankd.settings import parse_settings

    settings = parse_settings(
        ["--model", model, "--dtype", "float32", "--device", "cpu", "--no-access-log"]
    )
    service = build_service(settings)
    app = create_app(service, access_log=False)
    common = {"host": "127.0.0.1", "port": port, "log_level": "warning", "access_log": False}
    limits = ConnectionLimits.from_settings(settings)
    if stack == "guarded":
        config: uvicorn.Config = GuardedConfig(app, limits, **common)
    elif stack == "httptools":
        config = uvicorn.Config(app, http="httptools", **common)
    else:
        config = uvicorn.Config(
            app,
            http="h11",
            h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_keep_alive=limits.keep_alive_timeout,
            limit_concurrency=limits.max_connections,
            **common,
        )
    DrainingServer(config, service, 5.0).run()


def turns(clients: dict[str, httpx.Client], call, count: int) -> dict[str, list[float]]:
    """`count` turns; each calls every stack once, in an order that rotates, so that the
    machine's load at any moment falls on all of them alike."""
    times: dict[str, list[float]] = {s: [] for s in STACKS}
    for turn in range(count):
        for stack in STACKS[turn % 3 :] + STACKS[: turn % 3]:
            started = time.perf_counter()
            response = call(clients[stack])
            times[stack].append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return times


def report(times: dict[str, list[float]]) -> None:
    for stack in STACKS:
        ordered = sorted(times[stack])
        p50 = statistics.median(ordered) * 1e3
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
        ratio = statistics.median(
            a / b for a, b in zip(times[stack], times["httptools"], strict=True)
        )
        print(
            f"{stack:>11}: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({len(ordered)} requests); "
            f"median per-turn ratio to httptools {ratio:.3f}"
        )


def attack(url: str, megabytes: int) -> tuple[float, float]:
    """Send `megabytes` of one header (no end of head) while another client polls /health;
    (seconds until the server ended the connection or took it all, /health max seconds)."""
    import socket
    import threading

    host, port = url.removeprefix("http://").split(":")
    stop = threading.Event()
    health: list[float] = []

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/health")
                health.append(time.perf_counter() - started)
                time.sleep(0.01)

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(0.3)
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
            chunk = b"a" * (1 << 20)
            for _ in range(megabytes):
                sock.sendall(chunk)
            sock.sendall(b"\r\n\r\n")
            sock.recv(65536)
        except OSError:
            pass
    took = time.perf_counter() - started
    time.sleep(0.3)
    stop.set()
    thread.join()
    return took, max(health)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument(
        "--attack-mb", type=int, default=0, help="then send this many MB of headers to each"
    )
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.model, args.port)
        return

    sys.path.insert(0, str(REPO))
    from benchmarks.workload import short_request
    from tests.fixtures.paths import fixture_dir
    from tests.ports import free_port

    model = str(fixture_dir("qwen3"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, urls = {}, {}
    for stack in STACKS:
        port = free_port()
        cmd = [sys.executable, __file__, "--serve", stack, "--model", model, "--port", str(port)]
        procs[stack] = subprocess.Popen(cmd, cwd=REPO, env=env)
        urls[stack] = f"http://127.0.0.1:{port}"
    try:
        clients = {s: httpx.Client(base_url=urls[s], timeout=60) for s in STACKS}
        for stack, client in clients.items():
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert procs[stack].poll() is None and time.monotonic() < deadline, stack
                time.sleep(0.2)
        request = short_request()
        body = {"query": request.query, "documents": list(request.documents)}
        for client in clients.values():  # warm: first shapes, first connections
            for _ in range(20):
                assert client.post("/v1/rerank", json=body).status_code == 200
        for label, call in (
            ("1 x 16 rerank", lambda c: c.post("/v1/rerank", json=body)),
            ("GET /health", lambda c: c.get("/health")),  # the HTTP stack alone
        ):
            print(f"{label}:")
            report(turns(clients, call, args.rounds * args.per_round))
        if args.attack_mb:
            for stack in STACKS:
                refused, health_max = attack(urls[stack], args.attack_mb)
                print(
                    f"{stack:>9}: {args.attack_mb} MB of headers: connection ended after "
                    f"{refused:.2f} s, /health max {health_max * 1e3:.0f} ms meanwhile"
                )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
