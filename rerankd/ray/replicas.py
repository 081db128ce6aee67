"""The classes Serve runs as replicas; rerankd.ray.serve makes deployments of them.

* `RerankdReplica`: one model. The model, its scheduler and the rerankd FastAPI app.
* `IngressReplica`: several models. The same app, tokenizing, over `RemoteScheduler`s that
  send token ids to each model's engine deployment.
* `EngineReplica`: several models. One model's engine and Scheduler, fed by the ingress.

The HTTP replicas hand their app to Serve through `__serve_build_asgi_app__`, which Serve
calls on the replica itself right after its constructor (`serve.ingress()` without an app):
each app is built from its own replica's service, whatever order replicas start in.

Nothing here decides replica counts or names (rerankd.ray.options) nor speaks to Serve's API.
"""

from __future__ import annotations

import logging
from typing import Any

from rerankd.ray.drain import DrainWatcher
from rerankd.ray.remote_scheduler import RemoteScheduler
from rerankd.settings import Settings
from rerankd.types import EncodedPair


class _HTTPReplica:
    """What both HTTP replicas share: a service, its metrics pusher and drain watcher, and
    the rerankd app over them, built when Serve asks for it."""

    def _init_http(
        self, settings: Settings, service: Any, metrics_hub: Any, drain_key: str | None
    ) -> None:
        self.settings = settings
        self.service = service
        self.pusher = _pusher(metrics_hub, service.metrics)
        self.drain = DrainWatcher.start(drain_key, service)

    def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app Serve runs in this replica (its lifespan starts the service)."""
        from rerankd.api import build_app

        export = self.pusher.export if self.pusher is not None else None
        return build_app(self.settings, self.service, metrics_export=export)


class RerankdReplica(_HTTPReplica):
    """One model, one replica: the model, its scheduler and the rerankd FastAPI app."""

    def __init__(
        self, settings: Settings, metrics_hub: Any = None, drain_key: str | None = None
    ) -> None:
        from rerankd.runtime import build_service

        _configure_logging(settings)
        self._init_http(settings, build_service(settings), metrics_hub, drain_key)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose scheduler loop died is replaced."""
        for model in self.service.models:
            if model.scheduler.loop_ended and not self.service.draining:
                raise RuntimeError(f"the scheduler of {model.name!r} stopped unexpectedly")


class IngressReplica(_HTTPReplica):
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

        _configure_logging(settings)
        models = []
        for one, engine in zip(settings.per_model(), engines, strict=True):
            _, _, recipe = load_recipe(one)
            names = aliases_for(one.model, one.served_model_name)
            scheduler = RemoteScheduler(engine, names[0])
            models.append(ServedModel(names[0], recipe, scheduler, names[1:], source=one.model))
        service = RerankService(models, Metrics(), limits_of(settings))
        self._init_http(settings, service, metrics_hub, drain_key)


class EngineReplica:
    """Several models: one model's engine and scheduler, in its model's own deployment.

    The ingress sends it token ids (`submit`); requests that arrive together share engine
    batches as in the single process. Its queue limit answers with `Overloaded`, which the
    ingress re-raises: the client gets the single process's 429.
    """

    def __init__(self, settings: Settings, metrics_hub: Any = None) -> None:
        from rerankd.metrics import Metrics
        from rerankd.runtime import load_model

        _configure_logging(settings)
        self.metrics = Metrics()
        self.scheduler = load_model(settings, self.metrics).scheduler
        self.scheduler.start()  # Serve runs constructors on the replica's event loop
        self.stopping = False
        self.pusher = _pusher(metrics_hub, self.metrics)

    async def submit(self, pairs: list[EncodedPair]) -> list[float]:
        """Raw scores of `pairs`, in order (the `Scheduler.submit` of this model)."""
        return await self.scheduler.submit(pairs)

    def check_health(self) -> None:
        if self.scheduler.loop_ended and not self.stopping:
            raise RuntimeError("the engine's scheduler stopped unexpectedly")

    async def __del__(self) -> None:
        """Serve's shutdown, once in-flight requests are done: finish the queue, stop."""
        self.stopping = True
        if self.pusher is not None:
            await self.pusher.stop()
        await self.scheduler.stop()


def _pusher(metrics_hub: Any, metrics: Any) -> Any:
    """This replica's `MetricsPusher` (None without a hub: a deployment built by hand)."""
    if metrics_hub is None:
        return None
    from rerankd.ray.metrics import MetricsPusher, replica_label

    return MetricsPusher(metrics_hub, metrics.registry, replica_label())


def _configure_logging(settings: Settings) -> None:
    logging.getLogger("rerankd").setLevel(settings.log_level.upper())
    if settings.access_log:
        from rerankd.server import configure_access_log

        configure_access_log()
