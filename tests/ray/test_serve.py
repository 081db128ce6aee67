"""`rerankd serve --ray`: two Serve replicas on two (simulated) nodes answer as the
single-process server does, under concurrency; /metrics counts for both; and a replica killed
mid-run costs at most clean JSON 5xx errors, never a wrong answer nor a hung request."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_cluster import cluster_fixture
from serve_helpers import (
    QUIET,
    TOL,
    assert_same_answer,
    call,
    metric_samples,
    ray_server,
    rerank_body,
    wait_running,
)

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

#: the Ray server's --request-timeout: a request that hangs on a killed replica surfaces as
#: a JSON 504 after this (plus Serve's margin), well inside the clients' own timeout
REQUEST_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 100


def replica_names() -> list[str]:
    """The actors of the `rerankd` deployment's replicas (not the metrics hub's)."""
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::rerankd#rerankd#")
    ]


@pytest.fixture(scope="module")
def cluster(request):
    yield from cluster_fixture(request)


@pytest.fixture(scope="module")
def servers(cluster, start_server, qwen3_dir, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(`rerankd serve --ray --replicas 2` on the test cluster, one replica per node; the
    single-process server on the same model), started side by side."""
    log_path = tmp_path_factory.mktemp("serve-ray") / "serve.log"
    model = ("--model", str(qwen3_dir), "--dtype", "float32", *QUIET)
    replicas = ["--replicas", "2", "--num-cpus-per-replica", "2"]
    timeout = ["--request-timeout", str(REQUEST_TIMEOUT_S)]
    with (
        ray_server(cluster, log_path, *replicas, *timeout, *model) as on_ray,
        start_server(*model) as reference,
    ):
        url = on_ray.wait_healthy()
        wait_running({"rerankd": 2})
        yield url, reference


@pytest.fixture(scope="module")
def ray_url(servers) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def reference_url(servers) -> str:
    return servers[1]


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


def rerank_successes(metrics: str) -> dict[str, float]:
    """Replica → its count of 200 answers on /v1/rerank, from a merged /metrics."""
    return {
        labels["replica"]: value
        for labels, value in metric_samples(metrics, "rerankd_requests_total")
        if labels["route"] == "/v1/rerank" and labels["status"] == "200"
    }


def test_metrics_answer_for_every_replica_and_count_every_request(ray_url):
    from rerankd.ray.metrics import PUSH_INTERVAL_S

    with httpx.Client(base_url=ray_url, timeout=60) as client:
        time.sleep(2 * PUSH_INTERVAL_S)  # the earlier tests' requests are in every snapshot
        before = rerank_successes(client.get("/metrics").text)
        sent = 48

        def send(i: int) -> int:
            with httpx.Client(base_url=ray_url, timeout=60) as c:
                return c.post("/v1/rerank", json=rerank_body(300 + i)).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(send, range(sent))) == {200}
        deadline = time.monotonic() + 10 * PUSH_INTERVAL_S
        while True:
            response = client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            after = rerank_successes(response.text)
            if sum(after.values()) - sum(before.values()) == sent:
                break
            assert time.monotonic() < deadline, (before, after)
            time.sleep(0.5)
    replicas = {name.removeprefix("SERVE_REPLICA::rerankd#") for name in replica_names()}
    assert set(after) == replicas and len(replicas) == 2  # each replica, under its own label
    assert all(after[r] > before.get(r, 0) for r in replicas), (before, after)  # both served
    # every sample of every metric carries its replica
    samples = [line for line in response.text.splitlines() if line and line[0] != "#"]
    assert samples and all('replica="' in line for line in samples)


def test_a_replica_killed_mid_run_loses_no_request_silently(ray_url, reference_url):
    """Under 16 clients, one of two replicas is killed: every request gets the right answer
    or a JSON 5xx, none hangs (Serve's request timeout, from --request-timeout, bounds even a
    request lost with the replica), and Serve replaces the replica."""
    import ray

    bodies = [rerank_body(seed) for seed in range(200, 232)]
    with httpx.Client(base_url=reference_url, timeout=60) as single:
        expected = [single.post("/v1/rerank", json=b) for b in bodies]
    stop = threading.Event()
    outcomes: list[tuple[int, httpx.Response | Exception, float, float]] = []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=ray_url, timeout=CLIENT_TIMEOUT_S) as c:
            while not stop.is_set():
                i = rng.randrange(len(bodies))
                sent_at = time.monotonic()
                try:
                    got: httpx.Response | Exception = c.post("/v1/rerank", json=bodies[i])
                except httpx.TransportError as exc:  # a lost or hung request: fails below
                    got = exc
                with lock:
                    outcomes.append((i, got, sent_at, time.monotonic()))

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
        t.join(timeout=CLIENT_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a client is still waiting for an answer"

    errors = []
    for i, got, _, _ in outcomes:
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
    slowest = max(done - sent for _, _, sent, done in outcomes)
    print(f"{len(outcomes)} requests, errors: {errors}, slowest: {slowest:.1f}s")
    # at worst: one attempt cut by Serve's timeout, then the retry's (2 x (20 + 5) s)
    assert slowest < 2 * (REQUEST_TIMEOUT_S + 5) + 5
    after = [got for _, got, sent, _ in outcomes if sent > killed_at + 1.0]
    assert any(g.status_code == 200 for g in after), "the surviving replica stopped answering"
    assert set(errors) <= {500, 502, 503, 504}, errors
    # Serve replaces the killed replica
    wait_running({"rerankd": 2}, timeout=120)
    assert victim not in replica_names()


def test_a_replica_that_stops_answering_costs_json_504s_not_hung_requests(ray_url, reference_url):
    """A replica frozen mid-run (SIGSTOP: alive to Ray, answering nothing, as the replica
    of the one hang once seen in CI) holds its requests until Serve's request timeout: they
    get rerankd's 504 JSON after --request-timeout + 5 s, every other request its answer."""
    import os
    import signal

    import ray
    from ray._private.state import actors  # the test cluster has no dashboard for ray.util.state

    bodies = [rerank_body(seed) for seed in range(400, 416)]
    with httpx.Client(base_url=reference_url, timeout=60) as single:
        expected = [single.post("/v1/rerank", json=b) for b in bodies]
    victim = replica_names()[0]
    pid = next(a["Pid"] for a in actors().values() if a["Name"] == victim and a["State"] == "ALIVE")
    stop = threading.Event()
    outcomes: list[tuple[int, httpx.Response | Exception, float]] = []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        with httpx.Client(base_url=ray_url, timeout=CLIENT_TIMEOUT_S) as c:
            i = worker
            while not stop.is_set():
                sent_at = time.monotonic()
                try:
                    got: httpx.Response | Exception = c.post("/v1/rerank", json=bodies[i])
                except httpx.TransportError as exc:  # a hung request: fails below
                    got = exc
                with lock:
                    outcomes.append((i, got, time.monotonic() - sent_at))
                i = (i + 8) % len(bodies)

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 10)
    finally:
        stop.set()
        os.kill(pid, signal.SIGCONT)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    assert not any(t.is_alive() for t in threads), "a client is still waiting for an answer"

    timeouts = []
    for i, got, took in outcomes:
        assert not isinstance(got, Exception), f"request {i} got no HTTP answer: {got!r}"
        if got.status_code == 200:
            assert_same_answer(got, expected[i], tol=TOL)
            continue
        assert got.headers["content-type"] == "application/json", got.text
        error = got.json()["error"]
        assert (got.status_code, error["type"], error["code"]) == (504, "TimeoutError", 504)
        assert "--request-timeout" in error["message"]
        timeouts.append(took)
    print(f"{len(outcomes)} requests, {len(timeouts)} timed out after {timeouts}")
    assert timeouts, "no request was held by the frozen replica"
    # Serve's timeout, not the client's: --request-timeout + 5 s, plus scheduling slack
    assert all(REQUEST_TIMEOUT_S < took < REQUEST_TIMEOUT_S + 5 + 15 for took in timeouts)
    wait_running({"rerankd": 2}, timeout=120)


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

    from rerankd.ray.proxy import ServeErrorsAsJSON

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

    from rerankd.ray.proxy import ServeErrorsAsJSON

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


def test_proxy_middleware_turns_serves_timeout_into_rerankds_504():
    import json

    from rerankd.ray.proxy import ServeErrorsAsJSON

    async def timed_out(scope, receive, send):  # Serve's proxy past request_timeout_s
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"Request 1f2e timed out after 25.0s."})

    status, headers, payload = run_asgi(ServeErrorsAsJSON(timed_out))
    assert status == 504 and headers["content-type"] == "application/json"
    error = json.loads(payload)["error"]
    assert (error["type"], error["code"], error["param"]) == ("TimeoutError", 504, None)
    assert error["message"].startswith("Request 1f2e timed out after 25.0s.")
    assert "--request-timeout" in error["message"]


def test_proxy_middleware_gives_each_attempt_the_scope_as_the_client_sent_it():
    roots: list[str] = []

    async def prefixing_then_dying(scope, receive, send):  # Serve edits root_path, as here
        roots.append(scope.get("root_path", ""))
        scope["root_path"] = scope.get("root_path", "") + "/prefix"
        await receive()

    from rerankd.ray.proxy import ServeErrorsAsJSON

    assert run_asgi(ServeErrorsAsJSON(prefixing_then_dying))[0] == 503
    assert roots == ["", ""]


def test_serves_request_timeout_follows_rerankds():
    from rerankd.ray.options import PROXY_TIMEOUT_MARGIN_S, serve_http_options
    from rerankd.settings import parse_settings

    settings = parse_settings(["--request-timeout", "20", "--port", "9000"], env={})
    options = serve_http_options(settings)
    assert options["request_timeout_s"] == 20 + PROXY_TIMEOUT_MARGIN_S
    assert (options["host"], options["port"]) == ("0.0.0.0", 9000)


def test_the_serve_configs_in_deploy_are_valid_and_mean_what_they_say():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rerankd.ray.options import serve_http_options, settings_and_options
    from rerankd.ray.serve import app_builder

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
        timeout = serve_http_options(settings)["request_timeout_s"]
        assert config["http_options"]["request_timeout_s"] == timeout  # rerankd's + margin
        assert settings.model == "Qwen/Qwen3-Reranker-0.6B" and options.num_gpus == 1
        deployment = options.deployment_options(settings)
        assert deployment["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
        assert app_builder(app.args) is not None  # builds without a cluster
    assert configs[1]["applications"][0]["args"]["max_replicas"] == 4
    auto = settings_and_options(configs[1]["applications"][0]["args"], env={})[1]
    assert auto.deployment_options(settings)["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ValueError, match="unknown rerankd args"):
        settings_and_options({"modle": "x"}, env={})
    # several models, as the config's comment shows them
    models = {"models": ["qwen3=Qwen/Qwen3-Reranker-0.6B", "m3=BAAI/bge-reranker-v2-m3"],
              "ingress_replicas": 2, "ingress_num_cpus": 4}  # fmt: skip
    settings, options = settings_and_options(models, env={})
    assert [(s.model, s.served_model_name) for s in settings.per_model()] == [
        ("Qwen/Qwen3-Reranker-0.6B", ["qwen3"]),
        ("BAAI/bge-reranker-v2-m3", ["m3"]),
    ]
    assert options.ingress_options(settings)["num_replicas"] == 2
    assert app_builder(models) is not None
    assert app_builder({"models": "a=/m/a,b=/m/b"}) is not None  # a comma-separated string


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
