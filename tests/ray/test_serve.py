"""`rerankd serve --ray`: two Serve replicas on two (simulated) nodes answer as the
single-process server does, under concurrency, and a replica killed mid-run costs at most
clean JSON 5xx errors, never a wrong answer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_cluster import cluster_fixture, free_port

from tests.words import WORDS as ALL_WORDS

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

QUIET = ("--no-access-log", "--log-level", "warning")
WORDS = ALL_WORDS[:12]  # the plain English words
START_TIMEOUT_S = 240
#: concurrent requests share engine batches differently on each server: last-bit noise only
TOL = 1e-6


def replica_names() -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::rerankd#")
    ]


def wait_running(replicas: int, timeout: float = START_TIMEOUT_S) -> None:
    """Until the application runs with `replicas` healthy replicas."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        status = serve.status().applications.get("rerankd")
        if status is not None and status.status == "RUNNING":
            counts = status.deployments["rerankd"].replica_states
            if counts.get("RUNNING", 0) == replicas and len(counts) == 1:
                return
        assert time.monotonic() < deadline, f"rerankd on Ray not running: {status}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(request):
    yield from cluster_fixture(request)


@pytest.fixture(scope="module")
def servers(cluster, start_server, qwen3_dir, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(`rerankd serve --ray --replicas 2` on the test cluster, one replica per node; the
    single-process server on the same model), started side by side."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-ray") / "serve.log"
    cmd = [
        sys.executable, "-m", "rerankd.cli", "serve", "--ray", "--replicas", "2",
        "--num-cpus-per-replica", "2", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(qwen3_dir), "--dtype", "float32", *QUIET,
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with start_server("--model", str(qwen3_dir), "--dtype", "float32", *QUIET) as reference:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert proc.poll() is None, Path(log_path).read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, Path(log_path).read_text()
                time.sleep(0.5)
            wait_running(2)
            yield url, reference
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, Path(log_path).read_text()  # SIGTERM: drained, deleted, exit 0


@pytest.fixture(scope="module")
def ray_url(servers) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def reference_url(servers) -> str:
    return servers[1]


def rerank_body(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    documents: list[Any] = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        for _ in range(rng.randint(1, 12))
    ]
    documents[0] = {"text": documents[0], "source": seed}
    body: dict[str, Any] = {
        "query": " ".join(rng.choice(WORDS) for _ in range(4)),
        "documents": documents,
    }
    if seed % 3 == 0:
        body["top_n"] = 3
    if seed % 4 == 1:
        body["instruction"] = "Find passages about rivers"
    return body


def without_ids(body: Any) -> Any:
    """The body less what differs on every answer: ids and creation times."""
    if isinstance(body, dict):
        return {k: without_ids(v) for k, v in body.items() if k not in ("id", "created")}
    if isinstance(body, list):
        return [without_ids(v) for v in body]
    return body


def assert_same_answer(got: httpx.Response, want: httpx.Response, tol: float = 0.0) -> None:
    assert got.status_code == want.status_code, got.text
    assert got.headers["content-type"] == want.headers["content-type"]
    a, b = without_ids(got.json()), without_ids(want.json())
    if tol and isinstance(b, dict) and "results" in b:
        scores = {r["index"]: r["relevance_score"] for r in a["results"]}
        assert sorted(scores) == sorted(r["index"] for r in b["results"])
        for r in b["results"]:
            assert scores[r["index"]] == pytest.approx(r["relevance_score"], abs=tol)
        a, b = dict(a, results=None), dict(b, results=None)
    assert a == b


REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/rerank", rerank_body(1)),
    ("POST", "/rerank", rerank_body(2)),
    ("POST", "/v2/rerank", rerank_body(3)),
    ("POST", "/v1/rerank", {"query": "q", "documents": []}),
    (
        "POST",
        "/rerank",
        {"query": "river city", "texts": ["a river", "a city"], "raw_scores": True},
    ),
    ("POST", "/v1/score", {"queries": ["the river", "a city"], "documents": ["water", "people"]}),
    ("POST", "/score", {"text_1": "the river", "text_2": ["water", "stone", "light"]}),
    ("GET", "/v1/models", None),
    ("GET", "/version", None),
    ("GET", "/health", None),
    # errors: the same status and the same JSON
    ("POST", "/v1/rerank", {"documents": ["no query"]}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["d"], "model": "no-such-model"}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["d"], "top_n": -1}),
    ("POST", "/v1/score", {"queries": ["a", "b"], "documents": ["x", "y", "z"]}),
    ("GET", "/no/such/route", None),
]


def call(client: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    return (
        client.request(method, path, json=body)
        if body is not None
        else client.request(method, path)
    )


def test_the_same_requests_get_the_same_answers(ray_url, reference_url):
    with (
        httpx.Client(base_url=ray_url, timeout=60) as on_ray,
        httpx.Client(base_url=reference_url, timeout=60) as single,
    ):
        for method, path, body in REQUESTS:
            for _ in range(2):  # both replicas, most likely
                assert_same_answer(
                    call(on_ray, method, path, body), call(single, method, path, body)
                )
        bad = on_ray.post(
            "/v1/rerank", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
        metrics = on_ray.get("/metrics")
        assert metrics.status_code == 200 and "rerankd_requests_total" in metrics.text


def test_sixteen_concurrent_clients_get_the_single_process_scores(ray_url, reference_url):
    bodies = [rerank_body(seed) for seed in range(100, 164)]
    with httpx.Client(base_url=reference_url, timeout=60) as single:
        expected = [single.post("/v1/rerank", json=b) for b in bodies]

    def client_run(worker: int) -> list[tuple[int, httpx.Response]]:
        with httpx.Client(base_url=ray_url, timeout=120) as c:
            return [
                (i, c.post("/v1/rerank", json=bodies[i])) for i in range(worker, len(bodies), 16)
            ]

    with ThreadPoolExecutor(16) as pool:
        answers = [pair for batch in pool.map(client_run, range(16)) for pair in batch]
    assert len(answers) == len(bodies)
    for i, got in answers:
        assert_same_answer(got, expected[i], tol=TOL)


@pytest.mark.slow  # flaky in CI: once, a request in flight on the killed replica hung until the
# client's 120 s timeout (seen 2026-11-23, unresolved) — run it with `-m slow` when working on it
def test_a_replica_killed_mid_run_loses_no_request_silently(ray_url, reference_url):
    import ray

    bodies = [rerank_body(seed) for seed in range(200, 232)]
    with httpx.Client(base_url=reference_url, timeout=60) as single:
        expected = [single.post("/v1/rerank", json=b) for b in bodies]
    stop = threading.Event()
    outcomes: list[tuple[int, httpx.Response | Exception, float]] = []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=ray_url, timeout=120) as c:
            while not stop.is_set():
                i = rng.randrange(len(bodies))
                try:
                    got: httpx.Response | Exception = c.post("/v1/rerank", json=bodies[i])
                except httpx.TransportError as exc:  # would be a lost request: fail below
                    got = exc
                with lock:
                    outcomes.append((i, got, time.monotonic()))

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    victim = replica_names()[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(timeout=120)

    errors = []
    for i, got, _ in outcomes:
        assert not isinstance(got, Exception), f"request {i} got no HTTP answer: {got!r}"
        if got.status_code == 200:
            assert_same_answer(got, expected[i], tol=TOL)  # never a wrong answer
        else:
            assert got.status_code >= 500, got.text
            assert got.headers["content-type"] == "application/json", got.text
            error = got.json()["error"]
            assert error["code"] == got.status_code and error["message"]
            if got.status_code == 503:
                assert got.headers["retry-after"]
            errors.append(got.status_code)
    print(f"{len(outcomes)} requests, errors: {errors}")
    after = [got for _, got, at in outcomes if at > killed_at + 1.0]
    assert any(g.status_code == 200 for g in after), "the surviving replica stopped answering"
    assert set(errors) <= {500, 502, 503, 504}, errors
    # Serve replaces the killed replica
    wait_running(2, timeout=120)
    assert victim not in replica_names()


# --- the proxy middleware alone (no cluster) ----------------------------------------------


def run_asgi(app, body: bytes = b'{"query": "q"}') -> tuple[int, dict[str, str], bytes]:
    """One POST through an ASGI app; (status, headers, body) as the client sees them."""
    import asyncio

    sent: list[dict] = []

    async def receive():
        if not sent_body:
            sent_body.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client waits for its answer

    async def send(message):
        sent.append(message)

    sent_body: list[bool] = []
    scope = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": []}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, payload


def test_proxy_middleware_retries_once_with_the_same_body_then_answers_503_json():
    import json

    from rerankd.ray.serve import ServeErrorsAsJSON

    bodies: list[bytes] = []

    async def dying_replica(scope, receive, send):  # Serve's proxy when the replica died
        bodies.append((await receive())["body"])

    status, headers, payload = run_asgi(ServeErrorsAsJSON(dying_replica))
    assert bodies == [b'{"query": "q"}'] * 2  # sent again, once, with the same body
    assert status == 503 and headers["content-type"] == "application/json"
    assert headers["retry-after"] == "1"
    error = json.loads(payload)["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503

    calls: list[int] = []

    async def recovers(scope, receive, send):
        message = await receive()
        calls.append(1)
        if len(calls) == 1:
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"x-request-id", b"a"),
            (b"X-Request-ID", b"a")]})  # fmt: skip
        await send({"type": "http.response.body", "body": message["body"]})

    status, headers, payload = run_asgi(ServeErrorsAsJSON(recovers))
    assert (status, payload, headers["x-request-id"]) == (200, b'{"query": "q"}', "a")


def test_proxy_middleware_turns_serves_plain_text_errors_into_json():
    import json

    from rerankd.ray.serve import ServeErrorsAsJSON

    async def busy(scope, receive, send):  # Serve's own backpressure answer
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"5")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    status, headers, payload = run_asgi(ServeErrorsAsJSON(busy))
    assert status == 503 and headers["retry-after"] == "5"
    assert json.loads(payload)["error"]["message"] == "Request dropped due to backpressure"

    async def app_error(scope, receive, send):  # rerankd's own JSON errors pass unchanged
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b'{"error": {}}'})

    assert run_asgi(ServeErrorsAsJSON(app_error))[::2] == (400, b'{"error": {}}')


def test_the_serve_configs_in_deploy_are_valid_and_mean_what_they_say():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rerankd.ray.serve import app_builder, settings_and_options

    root = Path(__file__).resolve().parents[2] / "deploy"
    service = yaml.safe_load((root / "rayservice.yaml").read_text())
    configs = [
        yaml.safe_load((root / "serve_config.yaml").read_text()),
        yaml.safe_load(service["spec"]["serveConfigV2"]),
    ]
    for config in configs:
        app = ServeDeploySchema.model_validate(config).applications[0]
        assert app.import_path == "rerankd.ray.serve:app_builder"
        settings, options = settings_and_options(app.args, env={})
        assert settings.model == "Qwen/Qwen3-Reranker-0.6B" and options.num_gpus == 1
        deployment = options.deployment_options(settings)
        assert deployment["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
        assert app_builder(app.args) is not None  # builds without a cluster
    assert configs[1]["applications"][0]["args"]["max_replicas"] == 4
    auto = settings_and_options(configs[1]["applications"][0]["args"], env={})[1]
    assert auto.deployment_options(settings)["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ValueError, match="unknown rerankd args"):
        settings_and_options({"modle": "x"}, env={})


def test_cli_ray_flags_become_replica_options(monkeypatch):
    import rerankd.ray.serve as ray_serve
    from rerankd.cli import main

    seen = {}

    def fake_run(settings, options):
        seen["settings"], seen["options"] = settings, options
        return 0

    monkeypatch.setattr(ray_serve, "run", fake_run)
    argv = ["serve", "--ray", "--model", "m", "--num-gpus-per-replica", "0.5"]
    assert main([*argv, "--min-replicas", "1", "--max-replicas", "3"]) == 0
    options = seen["options"].deployment_options(seen["settings"])
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert options["autoscaling_config"]["min_replicas"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in options
    assert main([*argv, "--replicas", "3"]) == 0
    assert seen["options"].deployment_options(seen["settings"])["num_replicas"] == 3
    assert main([*argv, "--replicas", "0"]) == 2  # invalid: a clear error, no Ray started
