"""rerankd/api/body.py: the body held once, refused by its value count as it arrives, and the
big-integer search (windowed, so it never costs the body's size again) exact at every
window boundary. The cost under attack is measured against a real server in
tests/hardening/test_hostile_inputs.py."""

from __future__ import annotations

import json
import mmap
import random
import re

import orjson
import pytest

from rerankd.api import body as body_module
from rerankd.api.body import (
    _BodyBuffer,
    _has_big_int_literal,
    _is_blank,
    max_json_values,
    parse_json,
)
from rerankd.api.errors import HTTPError
from tests.e2e.helpers import assert_error

#: the definition the windowed search must agree with: a run of 20+ digits (after an optional
#: minus), not preceded by [0-9.eE+-], not followed by [.eE0-9], outside [-2**63, 2**64)
_INT_LITERAL = re.compile(rb"(?<![0-9.eE+\-])(-?)([0-9]{20,})(?![0-9.eE])")


def _reference_has_big_int(body: bytes) -> bool:
    for match in _INT_LITERAL.finditer(body):
        value = int(match.group(2))
        if value > 2**63 if match.group(1) else value >= 2**64:
            return True
    return False


def _random_body(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.4:  # a digit run around the 20-digit threshold
            parts.append(bytes(rng.choice(b"0123456789") for _ in range(rng.randint(15, 45))))
        elif kind < 0.5:  # 10**18 .. 10**22: both sides of 2**64
            parts.append(b"1" + b"0" * rng.randint(18, 22))
        elif kind < 0.55:  # 2**64 behind leading zeros
            parts.append(b"0" * rng.randint(1, 30) + b"18446744073709551616")
        else:
            parts.append(bytes(rng.choice(b'0123456789.eE+-, "x[]{}:') for _ in range(5)))
    return b"".join(parts)


@pytest.mark.parametrize("window", [3, 7, 20, 33, 1 << 20])
def test_the_windowed_big_integer_search_agrees_with_the_regex_definition(monkeypatch, window):
    """Runs that start, end or span window boundaries are all seen (a run starting in a
    window is read 19 bytes into the next), in bytes and in a memory map alike."""
    monkeypatch.setattr(body_module, "_WINDOW", window)
    rng = random.Random(window)
    found = 0
    for _ in range(1500):
        body = _random_body(rng)
        expected = _reference_has_big_int(body)
        assert _has_big_int_literal(body) is expected, body
        with mmap.mmap(-1, len(body)) as mapped:
            mapped[:] = body
            assert _has_big_int_literal(mapped) is expected, body
        found += expected
    assert 100 < found < 1400  # both answers were exercised


def test_a_run_of_millions_of_digits_is_one_big_integer_without_a_copy_of_it():
    assert _has_big_int_literal(b'{"n": ' + b"7" * 5_000_000 + b"}")
    assert not _has_big_int_literal(b'{"n": 1.' + b"7" * 5_000_000 + b"}")


@pytest.mark.parametrize("size", [0, 1, 300_000])
def test_a_blank_body_is_empty_at_any_size(size):
    assert _is_blank(b" \n\t" * size)
    assert not _is_blank(b" " * size + b"{}")


def test_a_large_declared_body_is_filled_into_one_map_and_parsed_from_it():
    payload = orjson.dumps({"query": "q", "documents": ["word " * 10] * 10_000})
    buffer = _BodyBuffer(str(len(payload)))
    for start in range(0, len(payload), 65_536):
        buffer.add(payload[start : start + 65_536])
    whole = buffer.whole()
    assert isinstance(whole, mmap.mmap) and whole[:] == payload
    data, big = parse_json(whole)
    assert data["documents"][0] == "word " * 10 and big is None
    buffer.close()
    assert whole.closed


@pytest.mark.parametrize("content_length", [None, "12", "not a number"])
def test_a_small_or_undeclared_body_is_joined_from_its_chunks(content_length):
    buffer = _BodyBuffer(content_length)
    for chunk in (b'{"a":', b" [1, 2]", b"}"):
        buffer.add(chunk)
    assert buffer.whole() == b'{"a": [1, 2]}'
    buffer.close()


def test_a_body_shorter_than_declared_is_still_whole():
    buffer = _BodyBuffer(str(1 << 20))
    buffer.add(b'{"a": 1}')
    assert buffer.whole() == b'{"a": 1}'


def test_a_blank_large_body_is_called_empty():
    with pytest.raises(HTTPError, match="empty"):
        parse_json(b" " * 400_000)


def test_the_value_bound_scales_with_max_documents_and_has_a_floor():
    assert max_json_values(10) == 200_000
    assert max_json_values(100_000) == 2_000_000


def test_a_body_over_the_value_bound_is_refused_after_it_is_drained(make_client):
    """In-process, through the app: the whole body is read (no reset connection), the 400
    names the bound, and the next request on the same server is served."""
    flood = b'{"query": "q", "documents": [' + b'"",' * 300_000 + b'""]}'
    with make_client() as client:
        response = client.post(
            "/v1/rerank", content=flood, headers={"content-type": "application/json"}
        )
        assert_error(response, 400, contains=["200000 JSON values"])
        ok = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert ok.status_code == 200, ok.text


def test_a_large_body_with_a_big_integer_names_it(make_client):
    """Over the inline size, so read into a memory map and parsed in a worker thread."""
    documents = [{"text": "doc " * 20, "id": i} for i in range(3_000)]
    documents[-1]["id"] = 2**70
    raw = json.dumps({"query": "q", "documents": documents}).encode()
    assert len(raw) > body_module._PARSE_INLINE_BYTES
    with make_client() as client:
        response = client.post(
            "/v1/rerank", content=raw, headers={"content-type": "application/json"}
        )
        assert_error(response, 400, contains=["64 bits"])
        documents[-1]["id"] = 2**63
        ok = client.post("/v1/rerank", json={"query": "q", "documents": documents, "top_n": 1})
        assert ok.status_code == 200, ok.text
