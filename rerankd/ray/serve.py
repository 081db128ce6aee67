"""rerankd on Ray Serve: each replica runs the very app `rerankd serve` runs.

A replica builds its service with `runtime.build_service(settings)` (model load, warm-up)
and wraps it in `api.create_app(...)`, the same FastAPI app as the single-process server:
routes, request and response shapes, auth, errors and /metrics are those of rerankd. Serve
runs the app's lifespan inside each replica, so the scheduler starts there and drains when
the replica stops. Serve's proxy does the routing and load balancing across replicas.

Three ways in:

* `rerankd serve --ray --replicas N` (cli.py → `run`): starts a local Ray, or joins the
  cluster in RAY_ADDRESS, and serves on --host/--port until SIGINT/SIGTERM.
* `serve run deploy/serve_config.yaml` / `serve deploy …`: the config's import path
  `rerankd.ray.serve:app_builder` gets the config's `args` (`app_builder`).
* Python: `serve.run(build_app(settings, ReplicaOptions(replicas=2)), route_prefix="/")`.

Serve's proxy answers some failures itself (the replica died mid-request, a timeout, its own
queue full) in plain text. `proxy_middlewares` turns those into rerankd's JSON error shape;
it runs in the proxy, which loads it from RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`run`
sets it for a cluster it starts; deploy/*.yaml set it for KubeRay).

One model per application: like `rerankd serve`, a deployment serves one `--model`. Serving
several models means one application per model, each under its own route prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rerankd.settings import Settings, parse_settings

log = logging.getLogger(__name__)

APP_NAME = "rerankd"
DEPLOYMENT_NAME = "rerankd"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "rerankd.ray.serve:proxy_middlewares"


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

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment` for these options."""
        self.validate()
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
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
        if "max_constructor_retry_count" in _deployment_parameters():
            # a model that cannot load fails the same way every time: report it soon
            options["max_constructor_retry_count"] = 3
        return options


def _deployment_parameters() -> set[str]:
    import inspect

    from ray import serve

    return set(inspect.signature(serve.deployment).parameters)


# --- the replica ---------------------------------------------------------------------------

#: Hands the app built by RerankdReplica.__init__ to `_replica_app`, which Serve calls right
#: after the constructor in the same replica process (`serve.ingress` with a builder).
_built_apps: list[Any] = []


class RerankdReplica:
    """One replica: the model, its scheduler and the rerankd FastAPI app around them."""

    def __init__(self, settings: Settings) -> None:
        from rerankd.api import create_app
        from rerankd.runtime import build_service

        _configure_replica_logging(settings)
        self.settings = settings
        self.service = build_service(settings)
        self.http_app = create_app(
            self.service,
            api_keys=settings.all_api_keys(),
            cors_origins=settings.cors_origin,
            max_request_bytes=settings.max_request_bytes,
            access_log=settings.access_log,
        )
        _built_apps.append(self.http_app)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose scheduler loop died is replaced."""
        for model in self.service.models:
            task = getattr(model.scheduler, "_task", None)
            if task is not None and task.done() and not self.service.draining:
                raise RuntimeError(f"the scheduler of {model.name!r} stopped unexpectedly")


def _replica_app():
    return _built_apps.pop()


def _configure_replica_logging(settings: Settings) -> None:
    logging.getLogger("rerankd").setLevel(settings.log_level.upper())
    if settings.access_log:
        from rerankd.server import _configure_access_log

        _configure_access_log()


def build_deployment(settings: Settings, options: ReplicaOptions | None = None):
    """The Serve deployment (not yet bound) serving `settings` with `options`."""
    from ray import serve

    options = options or ReplicaOptions()
    ingress = serve.ingress(_replica_app)(RerankdReplica)
    return serve.deployment(ingress, **options.deployment_options(settings))


def build_app(settings: Settings, options: ReplicaOptions | None = None):
    """A Serve application (`serve.run(...)` it) serving `settings` with `options`."""
    return build_deployment(settings, options).bind(settings)


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

    `args` holds `rerankd serve` settings (`model`, `dtype`, `max_batch_tokens`, …; any not
    given come from RERANKD_* variables, then the defaults) and replica options (`replicas`,
    `num_cpus`, `num_gpus`, `min_replicas`, `max_replicas`, `target_ongoing_requests`,
    `max_ongoing_requests`). The config's `deployments:` section may still override them.
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


def _error_body(status: int, message: str) -> bytes:
    error = {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": None}
    return json.dumps({"error": {**error, "code": status}}).encode()


class ServeErrorsAsJSON:
    """ASGI middleware for Serve's HTTP proxy.

    rerankd's app answers every error in JSON; what is not JSON with a 4xx/5xx status was
    written by Serve itself (no replica reachable, its queue full, its timeout): the text
    becomes the message of a JSON error with the same status.

    A request whose replica died before answering gets no response at all from Serve. Every
    rerankd route is free of side effects, so it is sent again, once (`RETRIES`), with the
    same body, to whichever replica Serve picks then; if that fails too, the client gets a
    503 JSON error with Retry-After, never a half-answer. Only once: a request that itself
    kills replicas (say, one too large for the host's memory) must not take down them all.

    Also keeps one X-Request-Id header (the app's and the proxy's are equal unless the
    client sent an id the app would not echo).
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

            if await self._attempt(scope, attempt_receive, send):
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
            await _send_json(send, rewrite["status"], f"HTTP {rewrite['status']}")
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
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    env_vars = {PROXY_CALLBACK_ENV: os.environ[PROXY_CALLBACK_ENV]}
    ray.init(
        address=address,
        runtime_env={"env_vars": env_vars},
        logging_level=settings.log_level.upper(),
    )
    started_here = address is None
    stop = stop or threading.Event()
    handlers = _on_signals(stop)
    try:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": settings.host, "port": settings.port},
        )
        try:
            serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/")
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
        log.info(
            "serving %s on Ray Serve at http://%s:%d with %s",
            settings.model,
            settings.host,
            settings.port,
            scale,
        )
        while not stop.wait(1.0):  # wake up now and then: signal handlers run in between
            pass
        log.info("stopping: draining the replicas (up to %.0fs)", settings.drain_timeout)
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
        return 0
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        ray.shutdown()


def _deploy_failure(serve) -> str | None:
    """The replicas' own error (e.g. a ModelLoadError's message) from Serve's status."""
    try:
        deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    except Exception:
        return None
    lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if "ModelLoadError: " in line:
            return line.split("ModelLoadError: ", 1)[1]
    return lines[-1] if lines else None


def _on_signals(stop: threading.Event) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous
