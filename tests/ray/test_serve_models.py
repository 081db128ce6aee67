"""`rerankd serve --ray --models A --models B`: an ingress deployment in front of one engine
deployment per model answers as a single-process server of the same models does: `model`
routing, /v1/models, 404 for an unknown model, the default model, engine errors; /metrics
holds every ingress and engine replica. Without a cluster: `RemoteScheduler` passes the
engine replica's rerankd errors on as the single process raises them."""

from __future__ import annotations

import asyncio
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

MARKED = "text with FAULT_MARKER inside"  # the engines raise on it (--fault-injection)
ENGINES = {"rerankd-engine-0-qwen": 1, "rerankd-engine-1-xlmr": 1}


@pytest.fixture(scope="module")
def cluster(request):
    yield from cluster_fixture(request)


@pytest.fixture(scope="module")
def model_dirs(qwen3_dir, xlmr_dir) -> dict[str, Path]:
    return {"qwen": qwen3_dir, "xlmr": xlmr_dir}


@pytest.fixture(scope="module")
def servers(cluster, start_server, model_dirs, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(`rerankd serve --ray` of two models: 2 ingress replicas, 1 engine replica per model;
    the single-process server of the same two models), started side by side."""
    log_path = tmp_path_factory.mktemp("serve-ray-models") / "serve.log"
    models = [arg for name, path in model_dirs.items() for arg in ("--models", f"{name}={path}")]
    common = [*models, "--dtype", "float32", "--fault-injection", "raise-on:FAULT_MARKER", *QUIET]
    scale = ["--replicas", "1", "--num-cpus-per-replica", "1"]
    ingress = ["--ingress-replicas", "2", "--num-cpus-per-ingress", "0.5"]
    with (
        ray_server(cluster, log_path, *scale, *ingress, *common) as on_ray,
        start_server(*common) as reference,
    ):
        url = on_ray.wait_healthy()
        wait_running({"rerankd": 2, **ENGINES})
        yield url, reference


def requests_for(model_dirs: dict[str, Path]) -> list[tuple[str, str, Any]]:
    xlmr = str(model_dirs["xlmr"])
    pairs = {"queries": ["the river", "a city"], "documents": ["water", "people"]}
    return [
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        # no model: the first one
        ("POST", "/v1/rerank", rerank_body(1)),
        ("POST", "/v1/rerank", {**rerank_body(2), "model": "qwen"}),
        ("POST", "/v1/rerank", {**rerank_body(2), "model": "xlmr"}),
        ("POST", "/v2/rerank", {**rerank_body(3), "model": xlmr}),  # an alias: the path
        ("POST", "/v1/rerank", {**rerank_body(4), "model": Path(xlmr).name}),  # its last part
        ("POST", "/rerank", {"query": "river", "texts": ["a river", "a city"], "model": "xlmr"}),
        ("POST", "/v1/score", {**pairs, "model": "xlmr", "use_activation": False}),
        ("POST", "/score", {"text_1": "the river", "text_2": ["water", "stone"], "model": "qwen"}),
        # errors: the same status and the same JSON
        ("POST", "/v1/rerank", {"query": "q", "documents": ["d"], "model": "no-such-model"}),
        ("POST", "/v1/score", {"queries": "q", "documents": ["d"], "model": "no-such-model"}),
        ("POST", "/v1/rerank", {"query": "q", "documents": ["d"], "model": "xlmr", "top_n": -1}),
        ("POST", "/v1/rerank", {"query": "q", "documents": ["fine", MARKED], "model": "qwen"}),
        ("POST", "/v1/rerank", {"query": "q", "documents": ["fine", MARKED], "model": "xlmr"}),
    ]


#: how a model runs, which only its engine replica knows: the Ray ingress lists them as null
ENGINE_FACTS = ("device", "dtype", "quantization", "compiled", "cuda_graphs")


def _without_engine_facts(response: httpx.Response, ray: bool = True) -> httpx.Response:
    """/v1/models less the engine facts (null on the Ray ingress; the single process names
    device and dtype), so the rest of the listing can be compared exactly."""
    body = response.json()
    for model in body["data"]:
        facts = {key: model.pop(key) for key in ENGINE_FACTS}
        if ray:
            assert set(facts.values()) == {None}, facts
        else:
            assert facts["device"] and facts["dtype"], facts
    return httpx.Response(response.status_code, headers=response.headers, json=body)


def test_every_model_answers_as_the_single_process_server(servers, model_dirs):
    ray_url, reference_url = servers
    with (
        httpx.Client(base_url=ray_url, timeout=60) as on_ray,
        httpx.Client(base_url=reference_url, timeout=60) as single,
    ):
        for method, path, body in requests_for(model_dirs):
            for _ in range(2):  # both ingress replicas, most likely
                got, want = call(on_ray, method, path, body), call(single, method, path, body)
                if path == "/v1/models":
                    got, want = _without_engine_facts(got), _without_engine_facts(want, ray=False)
                # float32 sums in another order with another thread count (the engine
                # replica has one CPU, the single process two): equal within TOL
                assert_same_answer(got, want, tol=TOL)
        listed = on_ray.get("/v1/models").json()["data"]
        assert [(m["id"], m["root"]) for m in listed] == [
            (name, str(path)) for name, path in model_dirs.items()
        ]
        assert {m["recipe"] for m in listed} == {"qwen3-reranker", "cross-encoder"}
        unknown = on_ray.post("/v1/rerank", json={"query": "q", "documents": ["d"], "model": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
        for name in model_dirs:  # raised in the engine replica, answered by the ingress
            body = {"query": "q", "documents": [MARKED], "model": name}
            failed = on_ray.post("/v1/rerank", json=body)
            assert failed.status_code == 500, failed.text
            message = failed.json()["error"]["message"]
            assert message.startswith("inference failed for this request")
        # each model scores with its own weights
        body = {"query": "the river", "documents": ["water", "a stone bridge"]}
        scores = {
            name: on_ray.post("/v1/rerank", json={**body, "model": name}).json()["results"]
            for name in model_dirs
        }
        assert scores["qwen"] != scores["xlmr"]


def test_concurrent_clients_of_both_models_get_the_single_process_scores(servers):
    ray_url, reference_url = servers
    bodies = [{**rerank_body(seed), "model": ("qwen", "xlmr")[seed % 2]} for seed in range(40)]
    with httpx.Client(base_url=reference_url, timeout=60) as single:
        expected = [single.post("/v1/rerank", json=b) for b in bodies]

    def client_run(worker: int) -> list[tuple[int, httpx.Response]]:
        with httpx.Client(base_url=ray_url, timeout=120) as c:
            return [(i, c.post("/v1/rerank", json=bodies[i])) for i in range(worker, 40, 8)]

    with ThreadPoolExecutor(8) as pool:
        answers = [pair for batch in pool.map(client_run, range(8)) for pair in batch]
    assert len(answers) == len(bodies)
    for i, got in answers:
        assert got.json()["model"] == bodies[i]["model"]
        assert_same_answer(got, expected[i], tol=TOL)


def test_metrics_hold_the_ingress_and_every_engine_replica(servers):
    from rerankd.ray.metrics import PUSH_INTERVAL_S

    def deployments(text: str, metric: str) -> set[str]:
        return {labels["replica"].split("#")[0] for labels, _ in metric_samples(text, metric)}

    with httpx.Client(base_url=servers[0], timeout=60) as client:
        for name in ("qwen", "xlmr"):
            body = {"query": "q", "documents": ["a", "b"], "model": name}
            assert client.post("/v1/rerank", json=body).status_code == 200
        deadline = time.monotonic() + 10 * PUSH_INTERVAL_S
        while True:
            text = client.get("/metrics").text
            engines = deployments(text, "rerankd_batch_pairs_count")  # counted by the engines
            ingress = deployments(text, "rerankd_requests_total")  # counted by the HTTP app
            if engines == set(ENGINES) and ingress == {"rerankd"}:
                break
            assert time.monotonic() < deadline, (engines, ingress)
            time.sleep(0.5)
    documents = metric_samples(text, "rerankd_documents_total")
    assert {labels["model"] for labels, _ in documents} >= {"qwen", "xlmr"}


# --- RemoteScheduler alone (no cluster) ----------------------------------------------------


class FakeResponse:
    """A Serve DeploymentResponse stand-in: awaits to `outcome` (raised if an exception)."""

    def __init__(self, outcome: Any, delay: float = 0.0) -> None:
        self.outcome, self.delay, self.cancelled = outcome, delay, False

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> Any:
        await asyncio.sleep(self.delay)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """A handle to an engine deployment whose calls answer `outcomes` in turn."""

    def __init__(self, *outcomes: Any, delay: float = 0.0) -> None:
        self.outcomes, self.delay, self.responses = list(outcomes), delay, []
        self.submit = self

    def remote(self, pairs) -> FakeResponse:
        outcome = self.outcomes.pop(0)
        response = FakeResponse(outcome(pairs) if callable(outcome) else outcome, self.delay)
        self.responses.append(response)
        return response


class RaisingScheduler:
    """The single process's Scheduler when it raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def submit(self, pairs):
        raise self.error


def in_engine_replica(error: Exception) -> Exception:
    """`error` as awaiting a Serve handle raises it when the replica's method raised it."""
    from ray.exceptions import RayTaskError

    return RayTaskError("submit", "Traceback: ...", error).as_instanceof_cause()


@pytest.fixture(scope="module")
def qwen3_recipe(qwen3_dir):
    from rerankd.runtime import load_recipe
    from rerankd.settings import Settings

    return load_recipe(Settings(model=str(qwen3_dir)))[2]


def answer(recipe, scheduler, body: dict | None = None, timeout: float = 300.0) -> httpx.Response:
    """POST /v1/rerank to the rerankd app of one model served by `scheduler`."""
    from fastapi.testclient import TestClient

    from rerankd.api import create_app
    from rerankd.metrics import Metrics
    from rerankd.service import Limits, RerankService, ServedModel

    model = ServedModel("m", recipe, scheduler)
    service = RerankService([model], Metrics(), Limits(request_timeout=timeout))
    with TestClient(create_app(service, access_log=False)) as client:
        response = client.post("/v1/rerank", json=body or {"query": "q", "documents": ["a", "b"]})
        response.read()
        return response


def test_engine_errors_reach_the_client_as_the_single_process_answers_them(qwen3_recipe):
    from rerankd.errors import InferenceFailed, InvalidRequest, Overloaded, ShuttingDown
    from rerankd.ray.remote_scheduler import RemoteScheduler

    for error, status in [
        (Overloaded("the server is busy (9 tokens queued, limit 8); retry shortly"), 429),
        (ShuttingDown("the server is shutting down and takes no new requests"), 503),
        (InferenceFailed("inference failed for this request: RuntimeError: boom"), 500),
        (InvalidRequest("document 1 is odd", param="documents[1]"), 400),
    ]:
        engine = FakeEngine(in_engine_replica(error))
        got = answer(qwen3_recipe, RemoteScheduler(engine, "m"))
        want = answer(qwen3_recipe, RaisingScheduler(error))
        assert got.status_code == want.status_code == status
        assert got.json() == want.json()
        assert got.headers.get("retry-after") == want.headers.get("retry-after")
        assert len(engine.responses) == 1  # an answer of the engine: never sent again


def test_a_lost_engine_replica_is_asked_again_once_then_it_is_a_503(qwen3_recipe):
    from ray.exceptions import ActorDiedError

    from rerankd.ray.remote_scheduler import RemoteScheduler

    def scores(pairs):
        return [0.0] * len(pairs)

    engine = FakeEngine(ActorDiedError(), scores)
    assert answer(qwen3_recipe, RemoteScheduler(engine, "m")).status_code == 200
    assert len(engine.responses) == 2

    engine = FakeEngine(ActorDiedError(), ActorDiedError(), scores)
    got = answer(qwen3_recipe, RemoteScheduler(engine, "m"))
    assert got.status_code == 503 and got.headers["retry-after"]
    assert "engine replicas of 'm' stopped before answering" in got.json()["error"]["message"]
    assert len(engine.responses) == 2

    # an engine failure that is no rerankd error is a 500 that says so, not a bug report
    engine = FakeEngine(in_engine_replica(ValueError("odd")))
    got = answer(qwen3_recipe, RemoteScheduler(engine, "m"))
    assert got.status_code == 500 and "ValueError: odd" in got.json()["error"]["message"]


def test_a_request_timed_out_at_the_ingress_is_cancelled_in_the_engine(qwen3_recipe):
    from rerankd.ray.remote_scheduler import RemoteScheduler

    engine = FakeEngine([0.0, 0.0], delay=5.0)
    got = answer(qwen3_recipe, RemoteScheduler(engine, "m"), timeout=0.2)
    assert got.status_code == 504
    assert [r.cancelled for r in engine.responses] == [True]
