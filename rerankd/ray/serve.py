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

The parts: rerankd.ray.options (sizes and names, a config's `args`), .replicas (what each
replica runs), .remote_scheduler (the ingress's stand-in for a model's scheduler), .drain
(SIGTERM on Ray), .proxy (Serve's own failures as rerankd JSON), .metrics (the hub). This
module puts them together: `build_app`, `app_builder` and `proxy_middlewares` (the import
paths Serve's config files name), and `run`.

Three ways in:

* `rerankd serve --ray --replicas N` (cli.py → `run`): starts a local Ray, or joins the
  cluster in RAY_ADDRESS, and serves on --host/--port until SIGINT/SIGTERM.
* `serve run deploy/serve_config.yaml` / `serve deploy …`: the config's import path
  `rerankd.ray.serve:app_builder` gets the config's `args` (`app_builder`).
* Python: `serve.run(build_app(settings, ReplicaOptions(replicas=2)), route_prefix="/")`.

Serve's proxy answers some failures itself (the replica died mid-request, its timeout, its
own queue full) in plain text. `proxy_middlewares` turns those into rerankd's JSON error
shape (rerankd.ray.proxy); it runs in the proxy, which loads it from
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`run` sets it for a cluster it starts;
deploy/*.yaml set it for KubeRay). `run` also sets the proxy's `request_timeout_s` from
--request-timeout, so that no request can wait on a lost replica longer than that
(`options.serve_http_options`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
import uuid
from typing import Any

from rerankd.ray import drain
from rerankd.ray.options import (
    APP_NAME,
    METRICS_DEPLOYMENT,
    ReplicaOptions,
    engine_deployment_name,
    serve_http_options,
    settings_and_options,
)
from rerankd.ray.replicas import EngineReplica, IngressReplica, RerankdReplica
from rerankd.settings import Settings

log = logging.getLogger(__name__)

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
#: after the drain, how long `run` waits for Serve to delete the application (replicas that
#: are still inside an aborted batch are then left to Serve, or to ray.shutdown)
DELETE_WAIT_S = 5.0


# --- the application -----------------------------------------------------------------------


def build_deployment(settings: Settings, options: ReplicaOptions | None = None):
    """The Serve deployment (not yet bound) of the one-model application."""
    from ray import serve

    options = options or ReplicaOptions()
    return serve.deployment(_ingress(RerankdReplica), **options.deployment_options(settings))


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
    ingress = serve.deployment(_ingress(IngressReplica), **options.ingress_options(settings))
    return ingress.bind(settings, engines, hub, drain_key)


def _ingress(replica_class: type) -> type:
    """`replica_class` as Serve's HTTP ingress: Serve takes its app from the replica's own
    `__serve_build_asgi_app__`, called right after the constructor."""
    from ray import serve

    if inspect.signature(serve.ingress).parameters["app"].default is inspect.Parameter.empty:
        raise RuntimeError(
            f"this Ray ({_ray_version()}) cannot build an ingress's app in its replica "
            "(`serve.ingress()` without an app, `__serve_build_asgi_app__`): upgrade ray[serve] "
            "(Ray 2.60 has it)"
        )
    return serve.ingress()(replica_class)


def _ray_version() -> str:
    import ray

    return getattr(ray, "__version__", "?")


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


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    from starlette.middleware import Middleware

    from rerankd.ray.proxy import ServeErrorsAsJSON

    return [Middleware(ServeErrorsAsJSON)]


# --- `rerankd serve --ray` -----------------------------------------------------------------


def run(settings: Settings, options: ReplicaOptions, stop: threading.Event | None = None) -> int:
    """Serve `settings` on Ray until SIGINT/SIGTERM (or `stop` is set); 0 on a clean exit.

    Joins the cluster in RAY_ADDRESS, or starts a local one (then stopped on exit). Serve's
    proxy listens on --host/--port (on the head node). On exit the replicas drain as the
    single process does (`drain`), then the application is deleted.
    """
    from rerankd.ray import require_ray

    require_ray()
    import ray

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
    stop = stop or threading.Event()
    force = threading.Event()
    handlers = _on_signals(stop, force)
    drain_key = f"rerankd-drain-{uuid.uuid4().hex}"
    try:
        return _serve_until_stopped(settings, options, drain_key, stop, force, address is None)
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        with contextlib.suppress(Exception):
            drain.forget(drain_key)
        ray.shutdown()


def _serve_until_stopped(
    settings: Settings,
    options: ReplicaOptions,
    drain_key: str,
    stop: threading.Event,
    force: threading.Event,
    started_here: bool,
) -> int:
    """Deploy, serve until `stop`, drain, delete: `run` on a connected cluster."""
    from ray import serve

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
    _log_serving(settings, options)
    while not stop.wait(1.0):  # wake up now and then: signal handlers run in between
        pass
    log.info("draining the replicas (up to %gs)", settings.drain_timeout)
    drain.request_drain(drain_key, settings.drain_timeout)
    drain.wait_drained(serve, drain_key, settings.drain_timeout, force)
    log.info("stopping: deleting the application")
    serve.delete(APP_NAME, _blocking=False)
    _wait_deleted(serve, force)
    # Serve started by this run goes with it (unless other applications use it now), so
    # that the next run's --host/--port/--request-timeout apply; a cluster started here
    # goes with ray.shutdown() in `run`, replicas and all
    if not started_here and not serve_was_running and not serve.status().applications:
        serve.shutdown()
    return 0


def _log_serving(settings: Settings, options: ReplicaOptions) -> None:
    auto = options.deployment_options(settings).get("autoscaling_config")
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
