"""API keys (from `--api-key` flags or RERANKD_API_KEY) and `--served-model-name`, in-process.

The app is the one `rerankd serve FLAGS` builds (tests/api/conftest.py); a real server with
keys from a flag and a key file stays in tests/hardening/test_security.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.helpers import assert_close, assert_error, model_info, post_raw, scores_by_index

ALL_POST_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank", "/v1/score", "/score")
GOOD_RERANK = {"query": "what is water?", "documents": ["water is wet", "stone is hard"]}
GOOD_SCORE = {"queries": "what is water?", "documents": ["water is wet", "stone is hard"]}
QUERY = "What is the capital of France?"
DOCS = [
    "The capital of Brazil is Brasilia.",
    "The capital of France is Paris.",
    "Horses and cows are both animals",
    "Paris is known for the Eiffel Tower and the Louvre museum.",
]

#: how each configuration gives its keys: (flags, environment, the keys)
KEY_SOURCES = {
    "flags": (("--api-key", "k1", "--api-key", "k2"), {"RERANKD_API_KEY": ""}, ["k1", "k2"]),
    "env": ((), {"RERANKD_API_KEY": "a,b"}, ["a", "b"]),
}


def good_body(route: str) -> dict[str, Any]:
    return GOOD_SCORE if "score" in route else GOOD_RERANK


@pytest.fixture(params=list(KEY_SOURCES))
def keyed(request, serve_flags):
    flags, env, keys = KEY_SOURCES[request.param]
    with serve_flags(*flags, env=env) as client:
        yield client, keys


def test_missing_or_wrong_api_key_is_401(keyed):
    c, keys = keyed
    for route in ALL_POST_ROUTES:
        response = c.post(route, json=good_body(route))
        error = assert_error(response, 401)
        assert response.headers.get("www-authenticate", "").lower().startswith("bearer"), route
        assert "key" in error["message"].lower()
    wrong = [
        "Bearer wrong",
        f"Bearer {keys[0]}x",
        f"Bearer {keys[1]}{keys[0]}",
        f"Bearer {keys[0].upper()}",
        f"Bearer {keys[0]},{keys[1]}",
        f"Basic {keys[0]}",
        keys[0],
        "Bearer",
        "",
    ]
    for header in wrong:
        response = c.post("/v1/rerank", json=GOOD_RERANK, headers={"Authorization": header})
        assert_error(response, 401)


def test_every_configured_key_is_accepted(keyed):
    c, keys = keyed
    for key in keys:
        headers = {"Authorization": f"Bearer {key}"}
        for route in ALL_POST_ROUTES:
            response = c.post(route, json=good_body(route), headers=headers)
            assert response.status_code == 200, (key, route, response.text)
        assert c.get("/v1/models", headers=headers).status_code == 200
        assert c.get("/metrics", headers=headers).status_code == 200


def test_health_and_version_are_open_but_models_metrics_and_docs_need_a_key(keyed):
    c, keys = keyed
    assert c.get("/health").status_code == 200
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/version").status_code == 200
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs"):
        assert_error(c.get(path), 401)
        assert c.get(path, headers={"Authorization": f"Bearer {keys[1]}"}).status_code == 200


def test_auth_is_checked_before_the_body_is_parsed(keyed):
    c, keys = keyed
    assert_error(post_raw(c, "/v1/rerank", b"{not json"), 401)
    response = c.post(
        "/v1/rerank", content=b"{not json", headers={"Authorization": f"Bearer {keys[0]}"}
    )
    assert_error(response, 400)


# --- --served-model-name (the real engine) ---------------------------------------------------


def rerank(client, body: dict[str, Any]) -> dict:
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_served_model_name_is_reported_and_accepted(serve_real, qwen3_dir):
    with serve_real() as unnamed:
        theirs = scores_by_index(rerank(unnamed, {"query": QUERY, "documents": DOCS}))
    with serve_real("--served-model-name", "foo") as foo:
        info = model_info(foo)
        assert info["id"] == "foo"
        assert qwen3_dir.name in info["aliases"]
        for name in (None, "foo", qwen3_dir.name):
            request: dict[str, Any] = {"query": QUERY, "documents": DOCS}
            if name:
                request["model"] = name
            assert rerank(foo, request)["model"] == "foo"
        score = foo.post("/v1/score", json={"model": "foo", "queries": QUERY, "documents": DOCS})
        assert score.status_code == 200, score.text
        assert score.json()["model"] == "foo"
        # the same weights behind another name: the same scores as the unnamed server
        ours = scores_by_index(rerank(foo, {"query": QUERY, "documents": DOCS}))
        assert sorted(ours) == sorted(theirs)
        for index, value in ours.items():
            assert_close(value, theirs[index], 1e-6)
        assert_error(
            foo.post("/v1/rerank", json={"model": "bar", "query": QUERY, "documents": DOCS}),
            404,
            param="model",
        )
