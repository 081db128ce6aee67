"""rerankd on Ray Serve: the very app `rerankd serve` runs, on as many replicas as needed.

One model (`--model`): one deployment, `RerankdReplica`. Each replica builds its service with
`runtime.build_service(settings)` (model load, warm-up) and wraps it in `api.create_app(...)`,
the FastAPI app of the single-process server: routes, request and response shapes, auth,
errors are rerankd's. Serve runs the app's lifespan inside each replica, so the scheduler
starts there and drains when the replica stops. Serve's proxy balances across replicas.

Several models (`--models A --models B`): an ingress deployment (`IngressReplica`, same
name as the one-model deployment) runs that same app over a `RerankService` whose models
hold their real recipe (tokenizer and config, no weights) and a `RemoteScheduler` that sends
token ids to the model's own engine deployment (`EngineReplica`: engine + Scheduler), one
per model. The `model` field picks the model exactly as in the single process (it is the
same service code), /v1/models lists them all, an unknown one is a 404, and rerankd errors
raised in an engine replica reach the client with the single process's status and JSON.
Tokenization scales with the ingress replicas, compute with each model's engine replicas.

Why not put the one-model case on that split too: it would add a hop and a serialization of
every request's token ids for no gain, since one deployment already scales tokenization and
compute together (the replica tokenizes on its own CPUs next to its engine); the split only
pays when several models share one endpoint, which needs a router anyway.

Both shapes add a `MetricsHub` deployment: every replica pushes its metrics there, and
GET /metrics answers for all live replicas (rerankd.ray.metrics).

Three ways in:

* `rerankd serve --ray --replicas N` (cli.py → `run`): starts a local Ray, or joins the
  cluster in RAY_ADDRESS, and serves on --host/--port until SIGINT/SIGTERM.
* `serve run deploy/serve_config.yaml` / `serve deploy …`: the config's import path
  `rerankd.ray.serve:app_builder` gets the config's `args` (`app_builder`).
* Python: `serve.run(build_app(settings, ReplicaOptions(replicas=2)), route_prefix="/")`.

Serve's proxy answers some failures itself (the replica died mid-request, its timeout, its
own queue full) in plain text. `proxy_middlewares` turns those into rerankd's JSON error
shape; it runs in the proxy, which loads it from RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
(`run` sets it for a cluster it starts; deploy/*.yaml set it for KubeRay). `run` also sets
the proxy's `request_timeout_s` from --request-timeout, so that no request can wait on a
lost replica longer than that (`serve_http_options`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rerankd.errors import InferenceFailed, Overloaded, RerankdError, ShuttingDown
from rerankd.settings import Settings, parse_settings
from rerankd.types import EncodedPair

log = logging.getLogger(__name__)

APP_NAME = "rerankd"
DEPLOYMENT_NAME = "rerankd"
METRICS_DEPLOYMENT = "rerankd-metrics"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "rerankd.ray.serve:proxy_middlewares"
#: what `run` sets for Serve unless the environment says otherwise: rerankd's proxy
#: middleware, and balancing over every replica, where Serve's default prefers the replicas
#: on the proxy's own node (with one proxy on the head node, the others would only get
#: requests once those are full)
SERVE_ENV = {
    PROXY_CALLBACK_ENV: PROXY_CALLBACK,
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
}


@dataclass
class ReplicaOptions:
    """How many replicas, what each holds, and how Serve scales them."""

    #: fixed replica count (ignored when min_replicas/max_replicas ask for autoscaling)
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: autoscaling between these bounds when either is set
    min_replicas: int | None = None
    max_replicas: int | None = None
    #: autoscaling aims at this many requests in flight per replica (see docs/scaling.md)
    target_ongoing_requests: float = 8.0
    #: requests Serve sends to one replica at once; concurrent requests share engine batches
    max_ongoing_requests: int = 32
    #: several models only: replicas and CPUs of the HTTP ingress (tokenization, routing);
    #: the options above then size each model's engine deployment
    ingress_replicas: int = 1
    ingress_num_cpus: float = 1.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("--num-cpus-per-replica and --num-gpus-per-replica must be >= 0")
        if self.autoscaling:
            low, high = self.min_replicas or 0, self.max_replicas or max(1, self.replicas)
            if low < 0 or high < 1 or low > high:
                raise ValueError(
                    "need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1"
                )
        if self.max_ongoing_requests < 1 or self.target_ongoing_requests <= 0:
            raise ValueError("--max-ongoing-requests and --target-ongoing-requests must be > 0")
        if self.ingress_replicas < 1 or self.ingress_num_cpus < 0:
            raise ValueError("--ingress-replicas must be >= 1 and --num-cpus-per-ingress >= 0")

    def deployment_options(self, settings: Settings, name: str = DEPLOYMENT_NAME) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment` for the replicas that hold a model (the
        one deployment of one model, or each model's engine deployment)."""
        self.validate()
        options: dict[str, Any] = {
            "name": name,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            # a stopping replica first lets its in-flight requests finish (the drain)
            "graceful_shutdown_timeout_s": max(1.0, float(settings.drain_timeout)),
            "health_check_period_s": 10.0,
        }
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": min(max(low, 1), high),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 10.0,
                "downscale_delay_s": 300.0,
            }
        else:
            options["num_replicas"] = self.replicas
        return _with_retry_count(options)

    def ingress_options(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment` for the ingress of several models.

        It takes up to --max-concurrent-requests at once, as the single process does: a
        request there mostly waits for its engine, and requests held here reach the engines
        together, where they share batches.
        """
        self.validate()
        return _with_retry_count(
            {
                "name": DEPLOYMENT_NAME,
                "num_replicas": self.ingress_replicas,
                "ray_actor_options": {"num_cpus": self.ingress_num_cpus, "num_gpus": 0},
                "max_ongoing_requests": max(1, settings.max_concurrent_requests),
                "graceful_shutdown_timeout_s": max(1.0, float(settings.drain_timeout)),
                "health_check_period_s": 10.0,
            }
        )


def _with_retry_count(options: dict[str, Any]) -> dict[str, Any]:
    if "max_constructor_retry_count" in _deployment_parameters():
        # a model that cannot load fails the same way every time: report it soon
        options["max_constructor_retry_count"] = 3
    return options


def _deployment_parameters() -> set[str]:
    import inspect

    from ray import serve

    return set(inspect.signature(serve.deployment).parameters)


# --- the replicas ---------------------------------------------------------------------------

#: Hands the app built by an HTTP replica's constructor to `_replica_app`, which Serve calls
#: right after the constructor in the same replica process (`serve.ingress` with a builder).
_built_apps: list[Any] = []


class RerankdReplica:
    """One model, one replica: the model, its scheduler and the rerankd FastAPI app."""

    def __init__(
        self, settings: Settings, metrics_hub: Any = None, drain_key: str | None = None
    ) -> None:
        from rerankd.runtime import build_service

        _configure_replica_logging(settings)
        self.settings = settings
        self.service = build_service(settings)
        self.pusher = _pusher(metrics_hub, self.service.metrics)
        self.drain = DrainWatcher.start(drain_key, self.service)
        _built_apps.append(_http_app(settings, self.service, self.pusher))

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose scheduler loop died is replaced."""
        for model in self.service.models:
            task = getattr(model.scheduler, "_task", None)
            if task is not None and task.done() and not self.service.draining:
                raise RuntimeError(f"the scheduler of {model.name!r} stopped unexpectedly")


class IngressReplica:
    """Several models: the rerankd FastAPI app, tokenizing, in front of one engine
    deployment per model.

    Its service is the single process's `RerankService` over `ServedModel`s that hold the
    real recipe (tokenizer and config: no weights) and a `RemoteScheduler` in place of the
    scheduler, so routing by `model`, /v1/models, limits, timeouts and errors are the
    single process's own.
    """

    def __init__(
        self,
        settings: Settings,
        engines: list[Any],
        metrics_hub: Any = None,
        drain_key: str | None = None,
    ) -> None:
        from rerankd.metrics import Metrics
        from rerankd.runtime import limits_of, load_recipe
        from rerankd.service import RerankService, ServedModel, aliases_for

        _configure_replica_logging(settings)
        models = []
        for one, engine in zip(settings.per_model(), engines, strict=True):
            _, _, recipe = load_recipe(one)
            names = aliases_for(one.model, one.served_model_name)
            scheduler = RemoteScheduler(engine, names[0])
            models.append(ServedModel(names[0], recipe, scheduler, names[1:], source=one.model))
        self.service = RerankService(models, Metrics(), limits_of(settings))
        self.pusher = _pusher(metrics_hub, self.service.metrics)
        self.drain = DrainWatcher.start(drain_key, self.service)
        _built_apps.append(_http_app(settings, self.service, self.pusher))


class EngineReplica:
    """Several models: one model's engine and scheduler, in its model's own deployment.

    The ingress sends it token ids (`submit`); requests that arrive together share engine
    batches as in the single process. Its queue limit answers with `Overloaded`, which the
    ingress re-raises: the client gets the single process's 429.
    """

    def __init__(self, settings: Settings, metrics_hub: Any = None) -> None:
        from rerankd.metrics import Metrics
        from rerankd.runtime import load_model

        _configure_replica_logging(settings)
        self.metrics = Metrics()
        self.scheduler = load_model(settings, self.metrics).scheduler
        self.scheduler.start()  # Serve runs constructors on the replica's event loop
        self.stopping = False
        self.pusher = _pusher(metrics_hub, self.metrics)

    async def submit(self, pairs: list[EncodedPair]) -> list[float]:
        """Raw scores of `pairs`, in order (the `Scheduler.submit` of this model)."""
        return await self.scheduler.submit(pairs)

    def check_health(self) -> None:
        task = self.scheduler._task
        if task is not None and task.done() and not self.stopping:
            raise RuntimeError("the engine's scheduler stopped unexpectedly")

    async def __del__(self) -> None:
        """Serve's shutdown, once in-flight requests are done: finish the queue, stop."""
        self.stopping = True
        if self.pusher is not None:
            await self.pusher.stop()
        await self.scheduler.stop()


class ReplicaUnavailable(ShuttingDown):
    """An engine replica stopped (died, replaced, scaled down) before answering; the same
    503 JSON with Retry-After as a draining server's, since a retry will find another."""


class RemoteScheduler:
    """What `RerankService` needs of a Scheduler (`start`, `submit`, `stop`), served by a
    model's engine deployment: token ids go there, raw scores come back.

    A rerankd error raised in the engine replica (`Overloaded`, `ShuttingDown`,
    `InferenceFailed`, ...) is raised here as itself, so the client gets the single process's
    status and JSON. A replica lost before answering is asked again once, on the replica
    Serve picks then (scoring has no side effects), then it is a 503. A cancelled request
    (client gone, --request-timeout) is cancelled in the engine too: its pairs leave the queue.
    """

    RETRIES = 1

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        #: one per submit waiting for its engine: `abort` fails them
        self._gates: set[asyncio.Future] = set()

    def start(self) -> None:
        """Nothing to start: the engine deployment runs its own scheduler."""

    async def stop(self) -> None:
        """Nothing to stop: Serve drains the engine deployment itself."""

    def abort(self, exc: Exception) -> int:
        """Fail every submit still waiting for its engine with `exc` (the drain ran out of
        time; `RerankService.abort_in_flight`); their engine calls are cancelled."""
        aborted = 0
        for gate in list(self._gates):
            if not gate.done():
                gate.set_exception(exc)
                aborted += 1
        return aborted

    async def submit(self, pairs: list[EncodedPair]) -> list[float]:
        if not pairs:
            return []
        gate = asyncio.get_running_loop().create_future()
        call = asyncio.ensure_future(self._submit(pairs))
        self._gates.add(gate)
        try:
            await asyncio.wait({gate, call}, return_when=asyncio.FIRST_COMPLETED)
            if gate.done():
                call.cancel()
                return gate.result()  # raises what `abort` set
            return call.result()
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            self._gates.discard(gate)
            if not gate.done():
                gate.cancel()

    async def _submit(self, pairs: list[EncodedPair]) -> list[float]:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        attempt = 0
        while True:
            response = self.engine.submit.remote(pairs)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, RerankdError):
                    raise cause from None
                raise InferenceFailed(
                    f"the engine of {self.model_name!r} failed on this request: "
                    f"{type(cause or exc).__name__}: {cause or exc}"
                ) from exc
            except BackPressureError as exc:
                raise Overloaded(
                    f"the engines of {self.model_name!r} are busy ({exc.message}); retry shortly"
                ) from exc
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                if attempt >= self.RETRIES:
                    raise ReplicaUnavailable(
                        f"the engine replicas of {self.model_name!r} stopped before answering "
                        f"({type(exc).__name__}); the request was not completed: retry it"
                    ) from exc
                attempt += 1
                log.warning("an engine replica of %r was lost; asking again", self.model_name)
                await asyncio.sleep(0.2)


# --- draining on Ray: `run` tells every HTTP replica through Ray's key-value store -----

#: namespace of the drain keys in Ray's internal key-value store (held by the GCS)
DRAIN_NAMESPACE = "rerankd"
#: how often a replica looks for its drain key
DRAIN_POLL_S = 0.5
#: after the drain timeout aborts what is still in flight, how long its 503s get
ABORT_GRACE_S = 1.0


def _kv() -> Any:
    # private but stable since Ray 1.x; Serve keeps its own checkpoints there
    from ray.experimental import internal_kv

    return internal_kv


class DrainWatcher:
    """The single process's drain, in each HTTP replica of a `rerankd serve --ray` run.

    `run` writes the drain timeout under `drain_key` on the first SIGTERM/SIGINT. Each
    replica polls for it (every `DRAIN_POLL_S`); once there, the replica drains as one
    process does: /health and new requests get 503, in-flight requests go on until the
    drain timeout, then the rest are answered with 503 JSON (`abort_in_flight`). It then
    writes `<drain_key>/idle/<replica>`, so `run` knows when every replica is done and
    deletes the application without waiting longer.

    Serve's own shutdown (`serve.delete`) cannot do this: it removes the route at once, so
    new requests get 404, and a replica past its graceful timeout is killed with its
    requests unanswered.
    """

    def __init__(self, drain_key: str, service: Any) -> None:
        self.drain_key = drain_key
        self.service = service
        self.task: asyncio.Task | None = None

    @classmethod
    def start(cls, drain_key: str | None, service: Any) -> DrainWatcher | None:
        """Watch `drain_key` on the replica's event loop (None: Serve's config files and
        hand-built deployments, where Serve's own shutdown applies)."""
        if not drain_key:
            return None
        watcher = cls(drain_key, service)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover (Serve runs constructors on the loop)
            log.warning("no event loop in the replica's constructor: drain on SIGTERM is off")
            return None
        watcher.task = loop.create_task(watcher._run(), name="rerankd-drain-watcher")
        return watcher

    async def _run(self) -> None:
        kv = _kv()
        while True:
            value = await asyncio.to_thread(
                kv._internal_kv_get, self.drain_key, namespace=DRAIN_NAMESPACE
            )
            if value is not None:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        await self.drain(float(value))
        await asyncio.to_thread(
            kv._internal_kv_put,
            f"{self.drain_key}/idle/{_replica_id()}",
            b"1",
            namespace=DRAIN_NAMESPACE,
        )

    async def drain(self, timeout: float) -> int:
        """Drain for up to `timeout` seconds; returns how many requests were aborted."""
        service = self.service
        log.info("draining (%d requests in flight, up to %gs)", service.in_flight, timeout)
        service.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while service.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if not service.in_flight:
            return 0
        aborted = service.abort_in_flight()
        log.warning(
            "drain timeout (%gs): answering %d requests still in flight with 503", timeout, aborted
        )
        grace = loop.time() + ABORT_GRACE_S
        while service.in_flight and loop.time() < grace:
            await asyncio.sleep(0.05)
        return aborted


def _replica_id() -> str:
    try:
        from ray import serve

        context = serve.get_replica_context()
        unique = getattr(getattr(context, "replica_id", None), "unique_id", None)
        return str(unique or context.replica_tag)
    except Exception:
        return f"pid-{os.getpid()}"


def _replica_app():
    return _built_apps.pop()


def _http_app(settings: Settings, service: Any, pusher: Any) -> Any:
    from rerankd.api import create_app

    return create_app(
        service,
        api_keys=settings.all_api_keys(),
        cors_origins=settings.cors_origin,
        max_request_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
        document_format=settings.rerank_document_format,
        metrics_export=pusher.export if pusher is not None else None,
    )


def _pusher(metrics_hub: Any, metrics: Any) -> Any:
    """This replica's `MetricsPusher` (None without a hub: a deployment built by hand)."""
    if metrics_hub is None:
        return None
    from rerankd.ray.metrics import MetricsPusher, replica_label

    return MetricsPusher(metrics_hub, metrics.registry, replica_label())


def _configure_replica_logging(settings: Settings) -> None:
    logging.getLogger("rerankd").setLevel(settings.log_level.upper())
    if settings.access_log:
        from rerankd.server import _configure_access_log

        _configure_access_log()


def engine_deployment_name(index: int, name: str) -> str:
    """`rerankd-engine-<i>-<served name>`: unique (the index) and readable in `serve status`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:48]
    return f"{DEPLOYMENT_NAME}-engine-{index}-{slug}"


def build_deployment(settings: Settings, options: ReplicaOptions | None = None):
    """The Serve deployment (not yet bound) of the one-model application."""
    from ray import serve

    options = options or ReplicaOptions()
    ingress = serve.ingress(_replica_app)(RerankdReplica)
    return serve.deployment(ingress, **options.deployment_options(settings))


def build_app(
    settings: Settings, options: ReplicaOptions | None = None, drain_key: str | None = None
):
    """A Serve application (`serve.run(...)` it) serving `settings` with `options`.

    One model: one deployment of `RerankdReplica`s. Several (`--models`): an ingress
    deployment (`IngressReplica`, named like the one-model deployment) and one deployment of
    `EngineReplica`s per model, each scaled by `options`. Either way a `MetricsHub`
    deployment gathers every replica's metrics for /metrics. `drain_key`: see `DrainWatcher`
    (`run` sets it; without it, Serve's own shutdown applies).
    """
    from ray import serve

    from rerankd.ray.metrics import MetricsHub
    from rerankd.service import aliases_for

    options = options or ReplicaOptions()
    options.validate()
    per_model = settings.per_model()
    hub = serve.deployment(
        MetricsHub,
        name=METRICS_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    ).bind()
    if len(per_model) == 1:
        return build_deployment(settings, options).bind(settings, hub, drain_key)
    engines = []
    for index, one in enumerate(per_model):
        name = engine_deployment_name(index, aliases_for(one.model, one.served_model_name)[0])
        deployment = serve.deployment(EngineReplica, **options.deployment_options(one, name))
        engines.append(deployment.bind(one, hub))
    ingress = serve.ingress(_replica_app)(IngressReplica)
    return serve.deployment(ingress, **options.ingress_options(settings)).bind(
        settings, engines, hub, drain_key
    )


# --- `serve run` / `serve deploy` ----------------------------------------------------------

_OPTION_KEYS = {f.name for f in dataclasses.fields(ReplicaOptions)}
_SETTING_KEYS = {f.name for f in dataclasses.fields(Settings)}


def settings_and_options(
    args: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> tuple[Settings, ReplicaOptions]:
    """Split a config's `args` into Settings (RERANKD_* variables, then `args`) and
    ReplicaOptions. Keys may use dashes or underscores; unknown keys are an error."""
    args = {str(k).replace("-", "_"): v for k, v in dict(args or {}).items()}
    unknown = sorted(set(args) - _OPTION_KEYS - _SETTING_KEYS)
    if unknown:
        raise ValueError(
            f"unknown rerankd args {unknown}; use Settings fields (as `rerankd serve` flags, "
            f"with underscores) or {sorted(_OPTION_KEYS)}"
        )
    settings = parse_settings([], env=os.environ if env is None else env)
    for key in _SETTING_KEYS & set(args):
        value = args[key]
        if isinstance(getattr(settings, key), list) and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        setattr(settings, key, value)
    options = ReplicaOptions(**{k: args[k] for k in _OPTION_KEYS & set(args)})
    options.validate()
    return settings, options


def app_builder(args: dict[str, Any]):
    """Import path for Serve config files: `import_path: rerankd.ray.serve:app_builder`.

    `args` holds `rerankd serve` settings (`model`, or `models: [NAME=SOURCE, ...]` for
    several; `dtype`, `max_batch_tokens`, …; any not given come from RERANKD_* variables,
    then the defaults) and replica options (`replicas`, `num_cpus`, `num_gpus`,
    `min_replicas`, `max_replicas`, `target_ongoing_requests`, `max_ongoing_requests`: per
    model; `ingress_replicas`, `ingress_num_cpus`: the ingress of several models). The
    config's `deployments:` section may still override them.
    """
    settings, options = settings_and_options(args)
    return build_app(settings, options)


# --- the proxy: Serve's own failures as rerankd JSON errors -------------------------------

_ERROR_TYPES = {
    404: "NotFoundError",
    408: "TimeoutError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}
REPLICA_LOST = (
    "the replicas serving this request stopped before answering (they failed, were replaced "
    "or were scaled down); the request was not completed: retry it"
)


SERVE_TIMEOUT = (
    "No answer within Serve's request timeout (http_options.request_timeout_s); the request "
    "was cancelled: send fewer or shorter documents, or raise --request-timeout"
)


def _error_body(status: int, message: str) -> bytes:
    error = {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": None}
    return json.dumps({"error": {**error, "code": status}}).encode()


class ServeErrorsAsJSON:
    """ASGI middleware for Serve's HTTP proxy.

    rerankd's app answers every error in JSON; what is not JSON with a 4xx/5xx status was
    written by Serve itself (no replica reachable, its queue full, its timeout): the text
    becomes the message of a JSON error with the same status.

    Serve's own timeout (`http_options.request_timeout_s`, see `serve_http_options`) answers 408
    in plain text; it becomes rerankd's timeout error, 504 JSON, as a slow request gets from
    the single-process server.

    A request whose replica died before answering gets no response at all from Serve. Every
    rerankd route is free of side effects, so it is sent again, once (`RETRIES`), with the
    same body, to whichever replica Serve picks then; if that fails too, the client gets a
    503 JSON error with Retry-After, never a half-answer. Only once: a request that itself
    kills replicas (say, one too large for the host's memory) must not take down them all.

    Also keeps one X-Request-Id header (the app's and the proxy's are equal unless the
    client sent an id the app would not echo).

    Checked when a request on a killed replica once hung in CI: nothing here waits on its
    own. An attempt ends when Serve's proxy call ends, and a retry replays the recorded body,
    then reads the client's receive as the first attempt did. The wait was Serve's: with no
    `request_timeout_s`, its proxy waits on a lost replica's response as long as the client
    does; `run` now always sets one. The flaw found on the way: the attempts shared one scope,
    which Serve edits (root_path under a route prefix); each attempt now gets a copy.
    """

    RETRIES = 1

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received: list[dict] = []  # the request's messages so far, for a second attempt
        disconnected = False

        async def recording_receive():
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.request":
                received.append(message)
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        for attempt in range(self.RETRIES + 1):
            replay = list(received)

            async def attempt_receive(replay=replay):
                return replay.pop(0) if replay else await recording_receive()

            # a fresh scope each time: Serve's proxy writes into it (root_path for a route
            # prefix), and a second attempt must not see the first one's edits
            if await self._attempt(dict(scope), attempt_receive, send):
                return
            if disconnected:
                return  # nobody is waiting for an answer
            if attempt < self.RETRIES:
                log.warning("a replica failed before answering %s; sending it again", scope["path"])
                await asyncio.sleep(0.2)
        await _send_json(send, 503, REPLICA_LOST)

    async def _attempt(self, scope, receive, send) -> bool:
        """Run the proxy once; True when the client got a response (or part of one)."""
        started = False
        rewrite: dict[str, Any] | None = None

        async def wrapped_send(message) -> None:
            nonlocal started, rewrite
            kind = message["type"]
            if kind == "http.response.start":
                headers = _one_request_id(message.get("headers") or [])
                status = int(message["status"])
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if status >= 400 and not ctype.startswith(b"application/json"):
                    rewrite = {"status": status, "headers": headers, "body": b""}
                    return
                started = True
                await send({**message, "headers": headers})
            elif kind == "http.response.body" and rewrite is not None:
                rewrite["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    text = rewrite["body"].decode("utf-8", "replace").strip()
                    status, headers = rewrite["status"], rewrite["headers"]
                    rewrite = None
                    started = True
                    if status == 408:  # Serve's request_timeout_s: rerankd's timeout answer
                        status, text = 504, f"{text} {SERVE_TIMEOUT}".strip()
                    await _send_json(send, status, text or f"HTTP {status}", headers)
            else:
                await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        except Exception:
            if started:
                raise
            log.warning("Serve's proxy failed on a request", exc_info=True)
            return False
        if not started and rewrite is not None:  # a start without its final body
            status = 504 if rewrite["status"] == 408 else rewrite["status"]
            await _send_json(send, status, SERVE_TIMEOUT if status == 504 else f"HTTP {status}")
            return True
        return started


async def _send_json(send, status: int, message: str, headers: list | None = None) -> None:
    body = _error_body(status, message)
    extra = [(k, v) for k, v in headers or [] if k.lower() == b"retry-after"]
    if status == 503 and not extra:
        extra = [(b"retry-after", b"1")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _one_request_id(headers) -> list:
    seen = False
    kept = []
    for key, value in headers:
        if bytes(key).lower() == b"x-request-id":
            if seen:
                continue
            seen = True
        kept.append((key, value))
    return kept


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    from starlette.middleware import Middleware

    return [Middleware(ServeErrorsAsJSON)]


# --- `rerankd serve --ray` -----------------------------------------------------------------


def run(settings: Settings, options: ReplicaOptions, stop: threading.Event | None = None) -> int:
    """Serve `settings` on Ray until SIGINT/SIGTERM (or `stop` is set); 0 on a clean exit.

    Joins the cluster in RAY_ADDRESS, or starts a local one (then stopped on exit). Serve's
    proxy listens on --host/--port (on the head node). On exit the application is deleted:
    Serve drains each replica (in-flight requests finish, up to --drain-timeout).
    """
    from rerankd.ray import require_ray

    require_ray()
    import ray
    from ray import serve

    options.validate()
    address = os.environ.get("RAY_ADDRESS") or None
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    # every RAY_SERVE_* variable reaches Serve's controller, proxies and replicas
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    ray.init(
        address=address,
        runtime_env={"env_vars": env_vars},
        logging_level=settings.log_level.upper(),
    )
    started_here = address is None
    stop = stop or threading.Event()
    force = threading.Event()
    handlers = _on_signals(stop, force)
    drain_key = f"rerankd-drain-{uuid.uuid4().hex}"
    try:
        serve_was_running = _serve_running()
        if serve_was_running:
            log.warning(
                "Serve already runs on this cluster: its proxies keep their own settings "
                "(host, port, request_timeout_s); --host/--port apply only where this run "
                "starts Serve"
            )
        serve.start(proxy_location="HeadOnly", http_options=serve_http_options(settings))
        try:
            serve.run(build_app(settings, options, drain_key), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            reason = _deploy_failure(serve) or str(exc)
            print(f"rerankd: cannot start on Ray: {reason}", file=sys.stderr, flush=True)
            serve.delete(APP_NAME)
            return 1
        deployment = options.deployment_options(settings)
        auto = deployment.get("autoscaling_config")
        scale = (
            f"{auto['min_replicas']}..{auto['max_replicas']} replicas (autoscaling)"
            if auto
            else f"{options.replicas} replicas"
        )
        models = [one.model for one in settings.per_model()]
        log.info(
            "serving %s on Ray Serve at http://%s:%d with %s%s",
            ", ".join(models),
            settings.host,
            settings.port,
            scale,
            f" per model, {options.ingress_replicas} ingress replicas" if len(models) > 1 else "",
        )
        while not stop.wait(1.0):  # wake up now and then: signal handlers run in between
            pass
        _drain(serve, settings, drain_key, force)
        log.info("stopping: deleting the application")
        serve.delete(APP_NAME, _blocking=False)
        _wait_deleted(serve, force)
        # Serve started by this run goes with it (unless other applications use it now), so
        # that the next run's --host/--port/--request-timeout apply; a cluster started here
        # goes with ray.shutdown() below, replicas and all
        if not started_here and not serve_was_running and not serve.status().applications:
            serve.shutdown()
        return 0
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        with contextlib.suppress(Exception):
            _kv()._internal_kv_del(drain_key, del_by_prefix=True, namespace=DRAIN_NAMESPACE)
        ray.shutdown()


#: after the drain, how long `run` waits for Serve to delete the application (replicas that
#: are still inside an aborted batch are then left to Serve, or to ray.shutdown)
DELETE_WAIT_S = 5.0


def _drain(serve: Any, settings: Settings, drain_key: str, force: threading.Event) -> None:
    """Tell every HTTP replica to drain (`DrainWatcher`), then wait until each says it is
    done, at most the drain timeout plus the replicas' poll and abort grace."""
    import time

    kv = _kv()
    log.info("draining the replicas (up to %gs)", settings.drain_timeout)
    kv._internal_kv_put(drain_key, str(settings.drain_timeout).encode(), namespace=DRAIN_NAMESPACE)
    deadline = time.monotonic() + settings.drain_timeout + DRAIN_POLL_S + ABORT_GRACE_S + 1.0
    while time.monotonic() < deadline and not force.is_set():
        idle = kv._internal_kv_list(f"{drain_key}/idle/", namespace=DRAIN_NAMESPACE)
        running = _running_http_replicas(serve)
        if running is not None and len(idle) >= running:
            return
        force.wait(0.25)
    if not force.is_set():
        log.warning("not every replica reported its drain done in time; deleting anyway")


def _running_http_replicas(serve: Any) -> int | None:
    """RUNNING replicas of the HTTP deployment (the model's, or the ingress of several)."""
    try:
        states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states
    except Exception:
        return None
    return sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")


def _wait_deleted(serve: Any, force: threading.Event) -> None:
    import time

    deadline = time.monotonic() + DELETE_WAIT_S
    while time.monotonic() < deadline and not force.is_set():
        try:
            if APP_NAME not in serve.status().applications:
                return
        except Exception:
            return
        force.wait(0.25)


#: Serve's proxy gives up this long after rerankd's own --request-timeout would have
PROXY_TIMEOUT_MARGIN_S = 5.0


def serve_http_options(settings: Settings) -> dict[str, Any]:
    """Serve's `http_options` for `settings`: where the proxy listens, and its timeout.

    The proxy's `request_timeout_s` is --request-timeout plus a margin, so rerankd's own 504
    (with its message) answers a slow request first; the proxy's timeout catches what the
    replica cannot answer for at all (a request stuck on a replica that died, in Serve's
    queue, ...): without it such a request waits as long as the client does. Its 408 reaches
    the client as rerankd's 504 JSON error (`ServeErrorsAsJSON`).
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "request_timeout_s": float(settings.request_timeout) + PROXY_TIMEOUT_MARGIN_S,
    }


def _serve_running() -> bool:
    """Whether Serve's controller already runs on the connected cluster."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    except ImportError:  # private names; these are their values since Ray 2.0
        SERVE_CONTROLLER_NAME, SERVE_NAMESPACE = "SERVE_CONTROLLER_ACTOR", "serve"
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _deploy_failure(serve) -> str | None:
    """The replicas' own error (e.g. a ModelLoadError's message) from Serve's status:
    the first deployment that failed says why."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:
        return None
    last = None
    for deployment in deployments.values():
        text = deployment.message or ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in reversed(lines):
            if "ModelLoadError: " in line:
                return line.split("ModelLoadError: ", 1)[1]
        last = last or (lines[-1] if lines else None)
    return last


def _on_signals(stop: threading.Event, force: threading.Event) -> dict:
    """SIGINT/SIGTERM: the first drains (`stop`), a second exits without waiting (`force`).
    SIGHUP is ignored with a log line: the replicas read their keys when they start, so a
    new key file takes a redeploy here."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_exit(sig: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            force.set()
        else:
            log.info("%s: draining", signal.Signals(sig).name)
            stop.set()

    def on_hup(_sig: int, _frame: Any) -> None:
        log.info("SIGHUP ignored: with --ray, API keys are read when replicas start")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_exit)
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    return previous
