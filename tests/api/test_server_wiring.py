"""`rerankd serve` runs the app rerankd.api.build_app wires, the one the in-process tests use."""

from __future__ import annotations

import rerankd.server as server
from rerankd.api import build_app
from tests.in_process import serve_settings


def test_serve_hands_uvicorn_the_app_build_app_wires_from_its_settings(
    monkeypatch, client, qwen3_dir
):
    settings = serve_settings(
        qwen3_dir, ["--api-key", "k", "--cors-origin", "https://a.example", "--no-access-log"]
    )
    built, served = [], []

    def spy(*args, **kwargs):
        built.append((args, kwargs))
        return build_app(*args, **kwargs)

    monkeypatch.setattr(server, "build_service", lambda _: client.service)
    monkeypatch.setattr(server, "build_app", spy)
    monkeypatch.setattr(server.DrainingServer, "run", lambda self: served.append(self.config))
    assert server.serve(settings) == 0

    [(args, kwargs)] = built
    assert args == (settings, client.service)
    keys = kwargs["api_keys"]  # the store SIGHUP swaps is the one the app checks
    assert len(keys) == 1 and keys.match(b"k")
    [config] = served
    app = config.app
    assert app.state.api_keys is keys
    assert (config.host, config.port) == (settings.host, settings.port)
    origins = [
        m.kwargs["allow_origins"] for m in app.user_middleware if "allow_origins" in m.kwargs
    ]
    assert origins == [["https://a.example"]]
