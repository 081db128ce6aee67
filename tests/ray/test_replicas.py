"""The HTTP replicas hand Serve their own app: Serve asks each replica for it right after
the constructor (`__serve_build_asgi_app__`), so the app is built over that replica's
service whatever order replicas are built and asked in. Without a cluster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rerankd.metrics import Metrics
from rerankd.settings import parse_settings

pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def _replica(monkeypatch, document_format: str):
    """A `RerankdReplica` over a stand-in service (no model load), its settings distinct."""
    import rerankd.runtime
    from rerankd.ray.replicas import RerankdReplica

    service = SimpleNamespace(metrics=Metrics(), models=[], draining=False)
    monkeypatch.setattr(rerankd.runtime, "build_service", lambda settings: service)
    argv = ["--model", "m", "--no-access-log", "--rerank-document-format", document_format]
    replica = RerankdReplica(parse_settings(argv, env={}))
    assert replica.service is service
    return replica


def test_each_replica_builds_its_app_over_its_own_service_in_any_order(monkeypatch):
    first = _replica(monkeypatch, "object")
    second = _replica(monkeypatch, "string")
    # asked in the reverse order of construction, and twice: no hand-off between them
    for replica, document_format in [(second, "string"), (first, "object"), (second, "string")]:
        app = replica.__serve_build_asgi_app__()
        assert app.state.service is replica.service
        assert app.state.document_format == document_format


def test_the_http_deployments_take_their_app_from_the_replica():
    from ray.serve.deployment import Deployment

    from rerankd.ray.serve import build_app, build_deployment

    settings = parse_settings(["--model", "m"], env={})
    deployment = build_deployment(settings)
    assert isinstance(deployment, Deployment)
    assert hasattr(deployment.func_or_class, "__serve_build_asgi_app__")
    several = parse_settings(["--models", "a=/m/a", "--models", "b=/m/b"], env={})
    assert build_app(several) is not None  # the ingress of several models builds too
