"""The OpenAPI document: built without warnings, one unique id per operation."""

from __future__ import annotations

import warnings
from collections import Counter

HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options"}


def test_openapi_builds_without_warnings_and_every_operation_id_is_unique(client):
    app = client.app
    app.openapi_schema = None  # built afresh here, whatever ran before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI's "Duplicate Operation ID" fails the test
        spec = app.openapi()
    operations = {
        (path, method): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }
    ids = Counter(operation["operationId"] for operation in operations.values())
    assert [name for name, count in ids.items() if count > 1] == []
    # GET keeps the id it always had (generated clients keep their method names); HEAD
    # is described beside it under its own id
    for name in ("health", "version"):
        assert operations[(f"/{name}", "get")]["operationId"] == f"{name}_{name}_get"
        assert operations[(f"/{name}", "head")]["operationId"] == f"{name}_{name}_head"


def test_head_on_health_and_version_answers_like_get_without_a_body(client):
    for path in ("/health", "/version"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
