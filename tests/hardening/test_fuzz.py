"""Fuzzing: request models in-process (hypothesis), the live API from its OpenAPI document
(schemathesis), and a hand-written catalogue of hostile inputs.

What must hold for any input: the models raise nothing but pydantic.ValidationError; the
server answers no 5xx; every 4xx is `{"error": {message, type, param, code}}`; the server is
healthy afterwards. `run_schemathesis` and `BAD_INPUTS` are reused by scripts/reliability.py.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rerankd.api.documents import document_texts, echo
from rerankd.api.errors import validation_message
from rerankd.api.schemas import RerankRequest, ScoreRequest, TEIRerankRequest
from rerankd.errors import InvalidRequest

from .conftest import error_shape_problem, raw_http, raw_post

SERVERS = ("plain",)

# --- in-process: the request models ---------------------------------------------------------

_FIELDS = sorted(
    set(RerankRequest.model_fields)
    | set(ScoreRequest.model_fields)
    | set(TEIRerankRequest.model_fields)
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "text", "Right", "left", "0", "true", "null"])
)
_json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["text", "title"]), children, max_size=5
        )
    ),
    max_leaves=25,
)
#: documents as clients send them, valid or nearly: strings, {text: ...} objects, junk
_documents = st.lists(
    st.text(max_size=30)
    | st.fixed_dictionaries({"text": st.text(max_size=30)}, optional={"title": _json_values})
    | st.dictionaries(st.sampled_from(["text", "title", "body"]), _json_values, max_size=3)
    | _json_values,
    max_size=6,
)
_bodies = st.one_of(
    _json_values,
    st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), _json_values, max_size=10),
    st.fixed_dictionaries(
        {"query": st.text(max_size=20) | _scalars, "documents": _documents},
        optional={
            "top_n": _scalars,
            "top_k": _scalars,
            "rank_fields": st.lists(st.sampled_from(["text", "title", "body"]), max_size=3)
            | _scalars,
            "return_documents": _scalars,
            "use_activation": _scalars,
            "raw_scores": _scalars,
            "model": _scalars,
            "instruction": _scalars,
            "truncate": _scalars,
        },
    ),
    st.fixed_dictionaries(
        {"query": st.text(max_size=20) | _scalars, "texts": _documents},
        optional={
            "raw_scores": _scalars,
            "return_text": _scalars,
            "truncation_direction": _scalars,
        },
    ),
    st.fixed_dictionaries(
        {
            "queries": _documents | st.text(max_size=10),
            "documents": _documents | st.text(max_size=10),
        },
        optional={"text_1": _json_values, "text_2": _json_values, "use_activation": _scalars},
    ),
)
_PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _http_representable(value: Any) -> bool:
    """Could this value have come out of orjson.loads (the server's parser)?"""
    try:
        return orjson.loads(orjson.dumps(value)) == value
    except (orjson.JSONEncodeError, TypeError):
        return False


@pytest.mark.parametrize("model", [RerankRequest, ScoreRequest, TEIRerankRequest])
@_PROPERTY_SETTINGS
@given(body=_bodies)
def test_request_models_raise_only_validation_errors(model, body):
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)  # the 400 the server would send
        assert isinstance(message, str) and message
        assert param is None or isinstance(param, str)
        return
    if isinstance(request, RerankRequest):
        assert request.limit is None or request.limit >= 0
        try:
            texts = document_texts(request.documents, request.rank_fields)
        except InvalidRequest as exc:
            assert exc.param and exc.param.startswith("documents[")
            return
        assert len(texts) == len(request.documents)
        assert all(isinstance(t, str) for t in texts)
        if _http_representable(body):
            # what the server echoes must render as the JSON response
            orjson.dumps([echo(d) for d in request.documents])
    elif isinstance(request, ScoreRequest):
        # each side resolves under one of its dialect names (queries/text_1/data_1 and
        # documents/items/text_2/data_2); `left` and `right` raise StopIteration otherwise
        assert request.left is not None
        assert request.right is not None


# --- the live API from its OpenAPI document ---------------------------------------------------


@dataclass
class FuzzStats:
    requests: int = 0
    seconds: float = 0.0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    by_operation: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def response_problem(status: int, headers: dict[str, Any], content: bytes) -> str | None:
    """A 5xx, or a 4xx whose body is not the error JSON."""
    if status >= 500:
        return f"{status}: {content[:300]!r}"
    if status >= 400:
        response = httpx.Response(
            status,
            headers={k: v[0] if isinstance(v, list) else v for k, v in headers.items()},
            content=content,
        )
        problem = error_shape_problem(response)
        if problem:
            return f"{status} without the error shape: {problem}"
    return None


def run_schemathesis(
    url: str,
    examples: int,
    time_budget_s: float,
    get_examples: int = 10,
    on_case: Callable[[], None] | None = None,
) -> FuzzStats:
    """Positive and negative cases for every operation in /openapi.json, sent to `url`.

    `examples` cases per POST operation and mode (so 10 × examples in all for the five
    scoring routes), `get_examples` per GET route; generation stops at `time_budget_s`.
    """
    import requests
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    stats = FuzzStats()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    session = requests.Session()
    started = time.monotonic()

    def sender(operation, mode, strategy, max_examples: int):
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def send(case) -> None:
            if time.monotonic() - started > time_budget_s:
                return
            response = case.call(base_url=url, session=session, timeout=60)
            stats.requests += 1
            stats.by_status[response.status_code] += 1
            stats.by_operation[f"{operation.label} ({mode.value})"] += 1
            problem = response_problem(
                response.status_code, dict(response.headers), response.content
            )
            if problem:
                stats.problems.append(f"{operation.label} {str(case.body)[:300]} → {problem}")
            if on_case:
                on_case()

        return send

    for result in schema.get_all_operations():
        operation = result.ok()
        is_get = operation.method.upper() == "GET"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)
            send = sender(operation, mode, strategy, get_examples if is_get else examples)
            try:
                send()
            except Unsatisfiable:  # e.g. no invalid input exists for GET /health
                stats.skipped.append(f"{operation.label} ({mode.value})")
    stats.seconds = time.monotonic() - started
    return stats


def test_schemathesis_sample_finds_no_5xx_and_only_error_shaped_4xx(plain_server):
    stats = run_schemathesis(plain_server.url, examples=20, time_budget_s=60)
    print(
        f"\nschemathesis: {stats.requests} requests in {stats.seconds:.1f}s, "
        f"statuses {dict(stats.by_status)}"
    )
    assert stats.requests >= 150, stats
    assert 200 in stats.by_status and 400 in stats.by_status, stats.by_status
    assert not stats.problems, "\n".join(stats.problems[:10])
    assert plain_server.healthy()


@pytest.mark.slow
def test_schemathesis_5000_requests(plain_server):
    stats = run_schemathesis(plain_server.url, examples=520, time_budget_s=1200, get_examples=50)
    print(
        f"\nschemathesis: {stats.requests} requests in {stats.seconds:.1f}s, "
        f"statuses {dict(stats.by_status)}"
    )
    assert stats.requests >= 5000, stats
    assert not stats.problems, "\n".join(stats.problems[:10])
    assert plain_server.healthy()


# --- hand-written hostile inputs --------------------------------------------------------------

_JSON = {"content-type": "application/json"}


def _nested(depth: int) -> bytes:
    """`[[[..."x"...]]]`, `depth` lists deep, as JSON bytes (too deep for json.dumps)."""
    return b"[" * depth + b'"x"' + b"]" * depth


@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(_JSON))
    expect: tuple[int, ...] = (400,)
    param: Any = ...


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


BAD_INPUTS: list[BadInput] = [
    BadInput("truncated JSON", "/v1/rerank", b'{"query": "q", "documents": ["a"'),
    BadInput("trailing garbage", "/v1/rerank", b'{"query": "q", "documents": ["a"]} x'),
    BadInput("single quotes", "/v1/rerank", b"{'query': 'q', 'documents': ['a']}"),
    BadInput("empty body", "/v1/rerank", b""),
    BadInput("whitespace body", "/v1/score", b"  \n\t "),
    BadInput("JSON array body", "/v1/rerank", b'["q", "a"]'),
    BadInput("JSON string body", "/rerank", b'"query"'),
    BadInput("JSON null body", "/v1/score", b"null"),
    BadInput(
        "form-encoded body",
        "/v1/rerank",
        b"query=q&documents=a",
        {"content-type": "application/x-www-form-urlencoded"},
    ),
    BadInput(
        "multipart body",
        "/v1/rerank",
        b'--b\r\nContent-Disposition: form-data; name="query"\r\n\r\nq\r\n--b--\r\n',
        {"content-type": "multipart/form-data; boundary=b"},
    ),
    BadInput("invalid UTF-8", "/v1/rerank", b'{"query": "\xff\xfe", "documents": ["a"]}'),
    BadInput("invalid UTF-8 in a key", "/v1/rerank", b'{"q\xc3": "q", "documents": ["a"]}'),
    BadInput("overlong UTF-8", "/v1/rerank", b'{"query": "\xc0\xaf", "documents": ["a"]}'),
    BadInput("lone surrogate", "/v1/rerank", b'{"query": "\\ud800", "documents": ["a"]}'),
    BadInput("lone low surrogate", "/v1/score", b'{"queries": "q", "documents": ["\\udc00"]}'),
    BadInput("NaN", "/v1/rerank", b'{"query": "q", "documents": ["a"], "top_n": NaN}'),
    BadInput("Infinity", "/v1/rerank", b'{"query": "q", "documents": ["a"], "top_n": Infinity}'),
    BadInput("-Infinity", "/v1/score", b'{"queries": "q", "documents": ["a"], "x": -Infinity}'),
    BadInput("1e400", "/v1/rerank", b'{"query": "q", "documents": ["a"], "top_n": 1e400}'),
    BadInput("negative top_n", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_n": -1}), param="top_n"),
    BadInput("huge top_n", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_n": 10**30}), param="top_n"),
    BadInput("u64 top_n", "/v2/rerank", _j({"query": "q", "documents": ["a"], "top_n": 2**64 - 1}), param="top_n"),
    BadInput("float top_n", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_n": 1.5}), param="top_n"),
    BadInput("string top_n", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_n": "2"}), param="top_n"),
    BadInput("bool top_k", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_k": True}), param="top_k"),
    BadInput("null query", "/v1/rerank", _j({"query": None, "documents": ["a"]}), param="query"),
    BadInput("null documents", "/v1/rerank", _j({"query": "q", "documents": None}), param="documents"),
    BadInput("null document", "/v1/rerank", _j({"query": "q", "documents": [None]}), param="documents[0]"),
    BadInput("null everything", "/v1/rerank", _j(dict.fromkeys(["model", "query", "documents", "top_n", "return_documents"]))),
    BadInput("null texts", "/rerank", _j({"query": "q", "texts": [None, None]}), param="texts[0]"),
    BadInput("null score sides", "/v1/score", _j({"queries": None, "documents": None})),
    BadInput("null pair", "/v1/score", _j({"queries": [None], "documents": [None]})),
    BadInput("number query", "/v1/rerank", _j({"query": 7, "documents": ["a"]}), param="query"),
    BadInput("object query", "/v1/rerank", _j({"query": {"text": "q"}, "documents": ["a"]}), param="query"),
    BadInput("documents is a string", "/v1/rerank", _j({"query": "q", "documents": "a"}), param="documents"),
    BadInput("document without text", "/v1/rerank", _j({"query": "q", "documents": [{"title": "t"}]})),
    BadInput("document text is a number", "/v1/rerank", _j({"query": "q", "documents": [{"text": 5}]})),
    BadInput("rank_fields names a missing key", "/v1/rerank", _j({"query": "q", "documents": [{"a": "x"}], "rank_fields": ["b"]})),
    BadInput("mismatched pairs", "/v1/score", _j({"queries": ["a", "b"], "documents": ["a", "b", "c"]}), param="queries"),
    BadInput("bad truncation_direction", "/rerank", _j({"query": "q", "texts": ["a"], "truncation_direction": "Middle"})),
    BadInput("100k documents", "/v1/rerank", _j({"query": "q", "documents": ["a"] * 100_000}), param="documents"),
    BadInput("100k score pairs", "/v1/score", _j({"queries": "q", "documents": ["a"] * 100_000})),
    BadInput("body nested 100k deep", "/v1/rerank", b"[" * 100_000 + b"]" * 100_000),
    BadInput("documents nested 5k deep", "/v1/rerank", b'{"query":"q","documents":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    BadInput("query nested 1k deep", "/v1/score", b'{"queries": ' + _nested(1000) + b', "documents": ["a"]}'),
    BadInput("1 MB query", "/v1/rerank", _j({"query": "word " * 200_000, "documents": ["a"]}), param="query"),
    BadInput("1 MB document, truncate false", "/v1/rerank", _j({"query": "q", "documents": ["word " * 200_000], "truncate": False})),
    BadInput("unknown model", "/v1/rerank", _j({"model": "nope", "query": "q", "documents": ["a"]}), expect=(404,), param="model"),
]  # fmt: skip
#: inputs that are strange but valid: they must be answered 200, never 5xx
ODD_BUT_VALID: list[BadInput] = [
    BadInput("empty strings", "/v1/rerank", _j({"model": "", "query": "", "documents": ["", {"text": ""}]}), expect=(200,)),
    BadInput("empty document list", "/v1/rerank", _j({"query": "q", "documents": []}), expect=(200,)),
    BadInput("top_n 0 and huge-but-safe", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_n": 0, "top_k": 2**53}), expect=(200,)),
    BadInput("null optionals", "/v1/rerank", _j({"query": "q", "documents": ["a"], "top_n": None, "model": None, "instruction": None, "truncate": None}), expect=(200,)),
    BadInput("text/plain JSON", "/v1/rerank", _j({"query": "q", "documents": ["a"]}), {"content-type": "text/plain"}, expect=(200,)),
    BadInput("no content type", "/v1/score", _j({"queries": "q", "documents": ["a"]}), {}, expect=(200,)),
    BadInput("1 MB document is truncated", "/v1/rerank", _j({"query": "q", "documents": ["word " * 200_000]}), expect=(200,)),
    BadInput("u64 value in an echoed document", "/v1/rerank", _j({"query": "q", "documents": [{"text": "a", "n": 2**64 - 1}]}), expect=(200,)),
    BadInput("unicode everywhere", "/v1/rerank", _j({"query": "北京 🍕 \u0000 \u202e", "documents": ["東京\u0000", {"text": "😀", "ключ": "значение"}]}), expect=(200,)),
    BadInput("extra fields everywhere", "/v1/score", _j({"queries": "q", "documents": ["a"], "junk": {"deep": [1, 2, {"x": None}]}}), expect=(200,)),
    BadInput("object nested 200 deep in a document", "/v1/rerank", b'{"query": "q", "documents": [{"text": "a", "meta": ' + _nested(200) + b"}]}", expect=(200,)),
]  # fmt: skip


def check_input(client: httpx.Client, bad: BadInput) -> str | None:
    """None if the server answered as `bad.expect` says (with the error shape for 4xx)."""
    try:
        response = client.post(bad.path, content=bad.body, headers=bad.headers)
    except httpx.HTTPError as exc:
        return f"{bad.name}: transport error {exc!r}"
    if response.status_code not in bad.expect:
        return f"{bad.name}: {response.status_code} (expected {bad.expect}): {response.text[:300]}"
    if response.status_code >= 400:
        problem = error_shape_problem(response)
        if problem:
            return f"{bad.name}: {problem}"
        if bad.param is not ... and response.json()["error"]["param"] != bad.param:
            return f"{bad.name}: param {response.json()['error']['param']!r} != {bad.param!r}"
    return None


@pytest.mark.parametrize("bad", BAD_INPUTS + ODD_BUT_VALID, ids=lambda b: b.name)
def test_hostile_input_is_answered_without_5xx_and_with_the_error_shape(plain, bad):
    problem = check_input(plain, bad)
    assert problem is None, problem


@pytest.mark.parametrize("depth", [300, 900], ids=lambda d: f"document object nested {d} deep")
def test_a_deeply_nested_document_object_is_not_a_500(plain_server, depth):
    """Objects are echoed as sent; nesting the JSON parser accepts (up to 1024 levels) but
    the response renderer refuses (orjson.dumps stops at 255) must be a 400, not a 500."""
    headers = {**_JSON, "connection": "close"}  # after a 500 uvicorn drops the connection
    body = b'{"query": "q", "documents": [{"text": "a", "meta": ' + _nested(depth) + b"}]}"
    response = httpx.post(f"{plain_server.url}/v1/rerank", content=body, headers=headers)
    ranked_body = (
        b'{"query": "q", "documents": [{"t": ' + _nested(depth) + b'}], "rank_fields": ["t"]}'
    )
    ranked = httpx.post(f"{plain_server.url}/v1/rerank", content=ranked_body, headers=headers)
    for answer in (response, ranked):
        assert answer.status_code < 500, answer.text[:300]
        if answer.status_code >= 400:
            assert error_shape_problem(answer) is None


@pytest.mark.parametrize(
    "header",
    [
        b"X-Bad\x01Key: v",
        b"X Bad: v",
        b": empty-name",
        b"X-\xffKey: v",
        b"X-Val: a\x00b",
        b"X-(Key): v",
        b"X-Key : v",
    ],
    ids=repr,
)
def test_header_names_and_values_with_bad_bytes_are_4xx(plain_server, header):
    """These never reach the app: the HTTP parser (uvicorn) answers 400 itself, in plain
    text, and closes the connection; the server goes on serving."""
    body = _j({"query": "q", "documents": ["a"]})
    reply = raw_http(plain_server.port, raw_post("/v1/rerank", body, header + b"\r\n"))
    assert reply.status is not None and 400 <= reply.status < 500, reply.raw[:300]
    assert plain_server.healthy()


def test_the_server_is_healthy_and_exact_after_the_hostile_inputs(plain):
    first = plain.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert first.status_code == 200
    assert plain.get("/health").status_code == 200
    again = plain.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert again.json()["results"] == first.json()["results"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["query", "document"])
def test_the_work_for_a_huge_string_is_bounded_by_the_model_not_by_its_size(plain, where):
    """A pair never holds more than the model's 2,048 tokens, so refusing (or cutting) a
    10 MB string should cost about what a 1 MB one costs. rerankd tokenizes the whole
    string first (the query even twice), so the time grows with the body size: with the
    default 64 MB body limit one request can pin a core for a minute or more, and neither
    --request-timeout nor a client disconnect can stop tokenization in its worker thread."""

    def refuse(megabytes: int) -> float:
        text = "word " * (200_000 * megabytes)
        payload = (
            {"query": text, "documents": ["a"]}
            if where == "query"
            else {"query": "q", "documents": [text], "truncate": False}
        )
        started = time.perf_counter()
        response = plain.post("/v1/rerank", json=payload, timeout=300)
        elapsed = time.perf_counter() - started
        assert response.status_code == 400 and error_shape_problem(response) is None
        return elapsed

    one, ten = refuse(1), refuse(10)
    print(f"\n1 MB {where}: {one:.1f}s, 10 MB {where}: {ten:.1f}s")
    assert ten < 3 * one + 1.0, f"1 MB {where}: {one:.1f}s, 10 MB: {ten:.1f}s"
