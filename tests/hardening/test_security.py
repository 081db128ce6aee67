"""API keys, CORS, request ids and the access log.

`secure` is started with `--api-key SECRET123 --api-key-file FILE --cors-origin
https://app.example`; `plain` has every default (no keys, CORS off).
"""

from __future__ import annotations

import hmac
import json
import re
import uuid

import pytest

from rerankd.api.auth import APIKeyMiddleware

from .conftest import (
    CORS_ORIGIN,
    FILE_KEY,
    FLAG_KEY,
    Server,
    assert_error,
    raw_http,
    raw_post,
)

SERVERS = ("plain", "secure")
WRONG_KEY = "WRONGKEY-789"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def secure(servers) -> Server:
    return servers["secure"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- constant-time key check (unit) -----------------------------------------------------------


@pytest.fixture
def middleware() -> APIKeyMiddleware:
    return APIKeyMiddleware(app=None, keys=["SECRET123", "another-key", ""])


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"Bearer SECRET123", True),
        (b"bearer SECRET123", True),  # the scheme is case-insensitive (RFC 7235)
        (b"BEARER another-key", True),
        (b"Bearer  SECRET123 ", True),  # surrounding blanks are not part of the token
        (b"Bearer WRONG", False),
        (b"Bearer SECRET12", False),  # a prefix of a key
        (b"Bearer SECRET1234", False),  # a key plus more
        (b"Bearer S", False),
        (b"Bearer secret123", False),  # keys are case-sensitive
        (b"Bearer ", False),
        (b"Bearer", False),
        (b"", False),
        (None, False),
        (b"SECRET123", False),  # no scheme
        (b"Basic SECRET123", False),
        (b"Token SECRET123", False),
        (b"BearerSECRET123", False),
        (b"Basic U0VDUkVUMTIzOg==", False),
        (b"Bearer SECRET123\x00", False),
        (b"Bearer \xff\xfe", False),
    ],
)
def test_authorized_accepts_exactly_the_configured_bearer_keys(middleware, header, ok):
    assert middleware._authorized(header) is ok


def test_an_empty_configured_key_never_matches(middleware):
    assert middleware._authorized(b"Bearer ") is False
    assert middleware._authorized(b"Bearer  ") is False
    assert len(APIKeyMiddleware(app=None, keys=[""]).keys) == 0
    assert not APIKeyMiddleware(app=None, keys=[""]).keys.enabled


@pytest.mark.parametrize(
    "header", [b"Bearer SECRET123", b"Bearer another-key", b"Bearer WRONG", b"Bearer SECRET12"]
)
def test_every_key_is_compared_with_compare_digest_whatever_the_token(
    middleware, monkeypatch, header
):
    """Constant time: hmac.compare_digest against every key, no early exit on a match or on
    a length mismatch, and no `==` shortcut before it."""
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr("rerankd.api.auth.hmac.compare_digest", spy)
    middleware._authorized(header)
    assert sorted(key for _, key in calls) == sorted([b"SECRET123", b"another-key"])
    assert all(token == header.partition(b" ")[2].strip() for token, _ in calls)


# --- keys over HTTP ---------------------------------------------------------------------------


def test_health_and_version_are_open_everything_else_needs_a_key(secure):
    with secure.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get("/version").status_code == 200
        assert client.get("/health/").status_code == 200  # the same open route, no redirect
        assert client.head("/health").status_code == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
            ("GET", "/no/such/route"),
            ("GET", "/v1/models/"),  # a trailing slash is the same route: still closed
            ("POST", "/v1/rerank/"),
            ("POST", "/v1/ranking"),
            ("POST", "/v1/rerank"),
            ("POST", "/rerank"),
            ("POST", "/v2/rerank"),
            ("POST", "/v1/score"),
            ("POST", "/score"),
        ]:
            body = {"query": "q", "documents": ["d"]} if method == "POST" else None
            missing = client.request(method, path, json=body)
            assert_error(missing, 401, contains=["missing API key"])
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, json=body, headers=bearer(WRONG_KEY))
            assert_error(wrong, 401, contains=["invalid API key"])


def test_the_flag_key_and_the_key_file_key_are_both_accepted(secure):
    with secure.client() as client:
        for key in (FLAG_KEY, FILE_KEY):
            response = client.post(
                "/v1/rerank", json={"query": "q", "documents": ["d"]}, headers=bearer(key)
            )
            assert response.status_code == 200, response.text
            assert client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_comment_lines_in_the_key_file_are_not_keys(secure):
    with secure.client() as client:
        for token in ("# COMMENTED789", "COMMENTED789", "# keys for the hardening suite"):
            response = client.get("/v1/models", headers=bearer(token))
            assert_error(response, 401)


def test_an_indented_comment_in_the_key_file_is_not_a_key(secure):
    """`   # INDENTED000` is a comment as much as `# COMMENTED789` is; a key file whose
    commented-out key still opens the server is a security hole."""
    with secure.client() as client:
        response = client.get("/v1/models", headers=bearer("# INDENTED000"))
        assert_error(response, 401)


def test_keys_never_appear_in_the_server_output(secure):
    marker = uuid.uuid4().hex
    with secure.client() as client:
        for key in (FLAG_KEY, FILE_KEY, WRONG_KEY):
            client.post(
                "/v1/rerank",
                json={"query": marker, "documents": ["d"]},
                headers={**bearer(key), "X-Request-Id": f"keys-{marker}"},
            )
            client.get("/v1/models", headers=bearer(key))
            client.get("/nope", headers=bearer(key))
        client.post("/v1/rerank", content=b"{not json", headers=bearer(FLAG_KEY))
    secure.access_record(f"keys-{marker}")  # the log was written
    output = secure.output()
    for secret in (FLAG_KEY, FILE_KEY, WRONG_KEY, "INDENTED000", "COMMENTED789"):
        assert secret not in output, f"{secret} appears in the server output"
    assert "Authorization" not in output and "authorization" not in output


# --- CORS ---------------------------------------------------------------------------------------


def test_cors_is_off_by_default(plain):
    origin = {"Origin": CORS_ORIGIN}
    preflight = plain.options(
        "/v1/rerank",
        headers={**origin, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    actual = plain.post("/v1/rerank", json={"query": "q", "documents": ["d"]}, headers=origin)
    assert actual.status_code == 200
    assert "access-control-allow-origin" not in actual.headers
    assert "access-control-allow-origin" not in plain.get("/health", headers=origin).headers


def test_cors_origin_allows_preflight_and_actual_requests_from_that_origin_only(secure):
    with secure.client() as client:
        preflight = client.options(
            "/v1/rerank",
            headers={
                "Origin": CORS_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text  # answered before auth
        assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

        actual = client.post(
            "/v1/rerank",
            json={"query": "q", "documents": ["d"]},
            headers={"Origin": CORS_ORIGIN, **bearer(FLAG_KEY)},
        )
        assert actual.status_code == 200
        assert actual.headers["access-control-allow-origin"] == CORS_ORIGIN
        assert "x-request-id" in actual.headers["access-control-expose-headers"].lower()
        # a refused request still tells the browser's page why
        refused = client.post("/v1/rerank", json={}, headers={"Origin": CORS_ORIGIN})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == CORS_ORIGIN

        evil = "https://evil.example"
        bad_preflight = client.options(
            "/v1/rerank", headers={"Origin": evil, "Access-Control-Request-Method": "POST"}
        )
        assert bad_preflight.headers.get("access-control-allow-origin") != evil
        bad = client.get("/health", headers={"Origin": evil})
        assert "access-control-allow-origin" not in bad.headers


# --- request ids ------------------------------------------------------------------------------


def test_a_safe_request_id_is_honoured_echoed_and_logged(plain_server, plain):
    request_id = f"client-{uuid.uuid4().hex[:12]}.v1:abc/def+g=h"
    response = plain.post(
        "/v1/rerank",
        json={"query": "q", "documents": ["d"]},
        headers={"X-Request-Id": request_id},
    )
    assert response.headers["x-request-id"] == request_id
    assert plain_server.access_record(request_id)["status"] == 200
    error = plain.post("/v1/rerank", content=b"{", headers={"X-Request-Id": request_id + "-e"})
    assert error.status_code == 400 and error.headers["x-request-id"] == request_id + "-e"


def test_a_request_id_is_generated_when_absent_and_unique(plain_server, plain):
    ids = [plain.get("/health").headers["x-request-id"] for _ in range(5)]
    assert all(GENERATED_ID.match(i) for i in ids), ids
    assert len(set(ids)) == 5
    for request_id in ids:
        assert plain_server.access_record(request_id)["path"] == "/health"


@pytest.mark.parametrize(
    "unsafe",
    [
        b"a" * 500,
        b"a" * 129,
        b"has space",
        b"tab\there",
        b'quote"s',
        b"caf\xc3\xa9",  # UTF-8 bytes
        b"latin\xe9",
        b"semi;colon",
        b"<script>",
    ],
)
def test_an_unsafe_request_id_is_replaced_by_a_generated_one(plain_server, unsafe):
    body = json.dumps({"query": "q", "documents": ["d"]}).encode()
    reply = raw_http(
        plain_server.port, raw_post("/v1/rerank", body, b"X-Request-Id: " + unsafe + b"\r\n")
    )
    assert reply.status == 200, reply.raw[:300]
    echoed = reply.headers["x-request-id"]
    assert GENERATED_ID.match(echoed), echoed
    assert plain_server.access_record(echoed)["status"] == 200


def test_control_bytes_in_a_request_id_cannot_inject_headers_or_log_lines(plain_server):
    """Bare CR, bare LF, NUL and DEL inside the header value: the HTTP parser refuses the
    request (400) or the id is replaced; nothing reaches a response header or the log."""
    body = json.dumps({"query": "q", "documents": ["d"]}).encode()
    for injected in (b"abc\nX-Injected: 1", b"abc\rX-Injected: 1", b"a\x00b", b"a\x7fb"):
        reply = raw_http(
            plain_server.port, raw_post("/v1/rerank", body, b"X-Request-Id: " + injected + b"\r\n")
        )
        assert reply.status in (200, 400), reply.raw[:300]
        assert "x-injected" not in reply.headers
        if reply.status == 200:
            assert GENERATED_ID.match(reply.headers["x-request-id"]), reply.headers
    for line in plain_server.output().splitlines():
        if '"request_id"' in line:
            assert isinstance(json.loads(line), dict), line
        assert "X-Injected" not in line
    assert plain_server.healthy()


# --- access log -------------------------------------------------------------------------------


def test_access_log_lines_are_json_with_id_status_latency_and_no_document_text(plain_server, plain):
    secret_query = f"QUERYTEXT-{uuid.uuid4().hex}"
    secret_doc = f"DOCUMENTTEXT-{uuid.uuid4().hex}"
    sent = {
        "ok": plain.post("/v1/rerank", json={"query": secret_query, "documents": [secret_doc]}),
        "score": plain.post("/v1/score", json={"queries": secret_query, "documents": [secret_doc]}),
        "tei": plain.post("/rerank", json={"query": secret_query, "texts": [secret_doc]}),
        "bad": plain.post("/v1/rerank", json={"query": secret_query, "documents": [secret_doc, 7]}),
        "badjson": plain.post(
            "/v1/rerank", content=f'{{"query": "{secret_query}", "documents": [{secret_doc}'
        ),
        "model": plain.post(
            "/v1/rerank", json={"model": secret_doc, "query": secret_query, "documents": ["d"]}
        ),
    }
    statuses = {name: r.status_code for name, r in sent.items()}
    assert statuses == {
        "ok": 200,
        "score": 200,
        "tei": 200,
        "bad": 400,
        "badjson": 400,
        "model": 404,
    }
    for name, response in sent.items():
        record = plain_server.access_record(response.headers["x-request-id"])
        assert record["status"] == response.status_code, (name, record)
        assert isinstance(record["latency_ms"], (int, float)) and record["latency_ms"] >= 0
        assert record["method"] == "POST"
        assert set(record) >= {"ts", "request_id", "method", "path", "status", "latency_ms"}
    output = plain_server.output()
    assert secret_query not in output and secret_doc not in output
    for line in output.splitlines():
        if line.startswith("{"):
            assert isinstance(json.loads(line), dict), line


def test_access_log_counts_unmatched_paths_under_one_label(plain_server, plain):
    for _ in range(3):
        plain.get(f"/random/{uuid.uuid4().hex}")
    metrics = plain_server.metrics_text()
    assert "/random/" not in metrics
    assert 'route="unmatched"' in metrics


def test_401_is_logged_with_its_status_and_without_the_key(secure):
    request_id = f"unauth-{uuid.uuid4().hex[:8]}"
    with secure.client() as client:
        client.get("/v1/models", headers={**bearer(WRONG_KEY), "X-Request-Id": request_id})
    record = secure.access_record(request_id)
    assert record["status"] == 401
    assert WRONG_KEY not in json.dumps(record)
