"""How rerankd's Serve application is sized and named: `ReplicaOptions` (replica counts,
resources, autoscaling), a Serve config's `args` split into Settings and options, and the
proxy's `http_options`.

Plain values only: nothing here starts Ray or builds a deployment (rerankd.ray.serve does).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rerankd.settings import Settings, parse_settings

#: the Serve application `run` deploys
APP_NAME = "rerankd"
#: the deployment that answers HTTP: the model's (one model) or the ingress (several)
DEPLOYMENT_NAME = "rerankd"
METRICS_DEPLOYMENT = "rerankd-metrics"
#: Serve's proxy gives up this long after rerankd's own --request-timeout would have
PROXY_TIMEOUT_MARGIN_S = 5.0


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
            options["autoscaling_config"] = self._autoscaling_config()
        else:
            options["num_replicas"] = self.replicas
        return _with_retry_count(options)

    def _autoscaling_config(self) -> dict[str, Any]:
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": min(max(low, 1), high),
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 300.0,
        }

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
    from ray import serve

    if "max_constructor_retry_count" in inspect.signature(serve.deployment).parameters:
        # a model that cannot load fails the same way every time: report it soon
        options["max_constructor_retry_count"] = 3
    return options


def engine_deployment_name(index: int, name: str) -> str:
    """`rerankd-engine-<i>-<served name>`: unique (the index) and readable in `serve status`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:48]
    return f"{DEPLOYMENT_NAME}-engine-{index}-{slug}"


def serve_http_options(settings: Settings) -> dict[str, Any]:
    """Serve's `http_options` for `settings`: where the proxy listens, and its timeout.

    The proxy's `request_timeout_s` is --request-timeout plus a margin, so rerankd's own 504
    (with its message) answers a slow request first; the proxy's timeout catches what the
    replica cannot answer for at all (a request stuck on a replica that died, in Serve's
    queue, ...): without it such a request waits as long as the client does. Its 408 reaches
    the client as rerankd's 504 JSON error (rerankd.ray.proxy).
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "request_timeout_s": float(settings.request_timeout) + PROXY_TIMEOUT_MARGIN_S,
    }


# --- a Serve config's `args` ---------------------------------------------------------------

_OPTION_KEYS = frozenset(f.name for f in dataclasses.fields(ReplicaOptions))
_SETTING_KEYS = frozenset(f.name for f in dataclasses.fields(Settings))


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
