"""A request body: read under bounds, parsed as strict JSON, checked and validated.

Everything here is about what an attacker's body may cost (memory, event-loop time) before
it is refused: see `read_json_body`. The route handlers (routes.py) call it once per request.
"""

from __future__ import annotations

import asyncio
import mmap
import re
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel

from rerankd.api.errors import HTTPError
from rerankd.errors import InvalidRequest

ModelT = TypeVar("ModelT", bound=BaseModel)
#: a whole body: joined chunks, or the memory map it arrived in
Body = bytes | mmap.mmap

#: documents are echoed back one level deeper than sent, and orjson writes at most 255
MAX_JSON_DEPTH = 250
#: bodies above this are parsed and validated in a worker thread, off the event loop
_PARSE_INLINE_BYTES = 256 * 1024
#: orjson reads integers beyond 64 bits as floats, which would echo a changed value
_BIG_INT = 2.0**64
#: ... told apart from a float literal (1e22 is a float, and echoes as one) by its digits:
#: 20 or more of them, not preceded by [0-9.eE+-] (after an optional minus sign), nor
#: followed by [.eE]. Digit runs are found in a mask of the body (digits b"0", other bytes
#: b"1"), made a window at a time, with bytes.find, at native speed: a regex over the body
#: takes ~3 s for 60 MB, holding the GIL, so stalling the event loop
_DIGIT_MASK = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x31 for byte in range(256))
_TWENTY_DIGITS = b"0" * 20
_NOT_BEFORE_AN_INT = frozenset(b"0123456789.eE+-")
_NOT_AFTER_AN_INT = frozenset(b".eE")
_LEADING_ZEROS = re.compile(rb"0*")


async def read_json_body(
    request: Request,
    schema: Callable[[dict[str, Any]], type[ModelT]],
    max_documents: int,
) -> tuple[ModelT, dict[str, Any]]:
    """The body parsed, checked and validated (as the schema `schema(data)` picks); and the
    raw object. Strict JSON: no NaN/Infinity, valid UTF-8, no lone surrogates.

    The JSON values (commas and brackets) are counted chunk by chunk as the body arrives: a
    body of millions of tiny values costs far more memory and CPU to parse than its size,
    and once it is over `max_json_values` the rest is read and dropped, never kept, copied or
    counted (the client still gets its 400 after sending, not a reset connection). Large
    bodies are parsed and validated off the event loop.
    """
    max_values = max_json_values(max_documents)
    body = _BodyBuffer(request.headers.get("content-length"))
    values = 0
    async for chunk in request.stream():
        if values > max_values:
            continue  # drained: the reply is decided
        values += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
        body.add(chunk)
    if values > max_values:
        body.close()
        raise HTTPError(
            400,
            f"the request body holds more than {max_values} JSON values (counting its commas "
            "and brackets); split the request",
        )

    def parse() -> tuple[ModelT, dict[str, Any]]:
        try:
            raw = body.whole()
            data, big = parse_json(raw)
            request_model = validate(schema(data), data, max_documents)
            # after validation, so a huge number where a field wants a small int names it
            if big is not None and _has_big_int_literal(raw):
                raise HTTPError(
                    400,
                    f"the request body holds an integer beyond 64 bits (~{big:.6g}), which "
                    "this server cannot echo back exactly; send it as a string",
                )
            return request_model, data
        finally:
            body.close()

    if body.size <= _PARSE_INLINE_BYTES:
        return parse()
    return await asyncio.to_thread(parse)


class _BodyBuffer:
    """A request body as it arrives, held once.

    With a Content-Length above `_PARSE_INLINE_BYTES` each chunk is copied straight into an
    anonymous memory map of that size: the kernel gives it pages only as bytes arrive (a
    declared size costs nothing up front; bytearray(n) would write all n zeros), and
    `close` returns them all at once. A chunk list joined afterwards would hold the body
    twice at its peak, and the freed chunks would stay in the process's heap; a 60 MB
    b"".join on the event loop would also block it for ~50 ms. Small or chunked bodies are
    kept as chunks and joined in `whole` (in the worker thread when large)."""

    def __init__(self, content_length: str | None) -> None:
        declared = int(content_length) if content_length and content_length.isdigit() else 0
        self._map = _anonymous_map(declared) if declared > _PARSE_INLINE_BYTES else None
        self._chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if self._map is not None and end <= len(self._map):
            self._map[self.size : end] = chunk
        else:  # (the server's parser never lets a body exceed its Content-Length)
            self._chunks.append(chunk)
        self.size = end

    def whole(self) -> Body:
        if self._map is None:
            return b"".join(self._chunks)
        if self._chunks or self.size < len(self._map):
            return self._map[: self.size] + b"".join(self._chunks)
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()


def _anonymous_map(size: int) -> mmap.mmap | None:
    """A zero-filled private map of `size` bytes, or None where the kernel refuses one (strict
    overcommit accounting counts its whole size at once): the body is then kept as chunks."""
    try:
        return mmap.mmap(-1, size)
    except OSError:
        return None


def max_json_values(max_documents: int) -> int:
    """At most ~20 JSON values per allowed document, and never fewer than 200,000: a Cohere
    document object with a dozen fields fits, while the worst body under the bound (one
    object of that many keys) holds the GIL for ~130 ms in orjson, not the ~650 ms a
    million keys took."""
    return max(200_000, 20 * max_documents)


def parse_json(body: Body) -> tuple[dict[str, Any], float | None]:
    """Parse and check a request body (see `read_json_body`); raises HTTPError(400). Returns
    the object and the first float that may be an integer beyond 64 bits (orjson reads those
    as floats), for the caller to check once the request is validated."""
    if _is_blank(body):
        raise HTTPError(400, "the request body is empty; send a JSON object")
    try:
        with memoryview(body) as view:
            data = orjson.loads(view)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HTTPError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    depth, big = _inspect(data)
    if depth > MAX_JSON_DEPTH:
        raise HTTPError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return data, big


#: bytes translated per call in `_has_big_int_literal`: bytes.translate holds the GIL, ~75 ms
#: for 60 MB in one call, which would stall the event loop while a worker thread works; 1 MiB
#: windows take ~1 ms each
_WINDOW = 1 << 20


def _is_blank(body: Body) -> bool:
    """Empty or only whitespace, judged a window at a time (a memory map has no isspace, and
    strip() would copy the body)."""
    return all(body[at : at + _WINDOW].isspace() for at in range(0, len(body), _WINDOW))


def _has_big_int_literal(body: Body) -> bool:
    """Whether the body spells an integer outside [-2**63, 2**64) (orjson's exact range).

    Digit runs are found in a digit mask of one 1 MiB window at a time (see `_WINDOW`), so
    the event loop gets the GIL in between and the mask never costs the body's size again;
    int() sees at most ~20 digits (it refuses over 4,300)."""
    at = _twenty_digits(body, 0)
    while at != -1:
        end = _end_of_digits(body, at)
        start = at - 1 if at and body[at - 1] == ord("-") else at
        is_int = (start == 0 or body[start - 1] not in _NOT_BEFORE_AN_INT) and (
            end == len(body) or body[end] not in _NOT_AFTER_AN_INT
        )
        if is_int:
            first = _LEADING_ZEROS.match(body, at, end).end()
            if end - first > 20:  # (no copy of a long run: it may be the whole body)
                return True
            value = int(body[first:end] or b"0")
            if value > 2**63 if start != at else value >= 2**64:
                return True
        at = _twenty_digits(body, end)
    return False


def _twenty_digits(body: Body, pos: int) -> int:
    """Where the first run of 20 or more digits starting at or after `pos` starts, or -1.
    Each window reaches 19 bytes into the next, so a run starting in it is seen whole."""
    while pos < len(body):
        found = body[pos : pos + _WINDOW + 19].translate(_DIGIT_MASK).find(_TWENTY_DIGITS)
        if found != -1:
            return pos + found
        pos += _WINDOW
    return -1


def _end_of_digits(body: Body, pos: int) -> int:
    """Where the digit run at `pos` ends (the first non-digit after it, or the body's end)."""
    while pos < len(body):
        found = body[pos : pos + _WINDOW].translate(_DIGIT_MASK).find(b"1")
        if found != -1:
            return pos + found
        pos += _WINDOW
    return len(body)


def _inspect(value: Any) -> tuple[int, float | None]:
    """Nesting depth of a parsed JSON value, and the first integer that orjson had to read
    as a float (>= 2**64), if any. Iterative (no recursion limit to hit), and only containers
    go on the stack, so a list of millions of scalars costs no extra memory."""
    deepest, big = 0, None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif type(child) is float and big is None and abs(child) >= _BIG_INT:
                big = child if child.is_integer() else None
    return deepest, big


def validate(model: type[ModelT], data: dict[str, Any], max_documents: int) -> ModelT:
    """Pydantic validation, after the cheap check that the request is not too many documents
    (validating a million-item list first would be the expensive part)."""
    for key in ("documents", "texts", "passages", "items", "text_2", "data_2"):
        items = data.get(key)
        if isinstance(items, list) and len(items) > max_documents:
            raise InvalidRequest(
                f"{len(items)} documents in one request; this server accepts at most "
                f"{max_documents} (--max-documents): split the request",
                param=key,
            )
    return model.model_validate(data)
