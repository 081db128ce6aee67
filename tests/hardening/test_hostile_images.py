"""Hostile images against a real `rerankd serve` process (issue 19, "Fuzz").

tests/api/test_multimodal.py checks the same rules in process over the fake engine; here
the bodies go over real HTTP to a server on the tiny Qwen3-VL-Reranker fixture (the model's
real tokenizer, image processor and vision tower), with every default: images as data:
URIs only (no --allow-remote-media), --max-image-bytes 20 MB, --max-image-pixels 40 M,
--max-request-bytes 64 MB.

Each hostile body is refused with the documented error JSON (400, or 413 for a body over
--max-request-bytes) whose `param` names the document (or the query), fast by the server's
own clock (the access log); meanwhile /health is polled from another process and RSS is
sampled from /proc, and a valid image request scores the same afterwards.

Every image is built here from a few bytes: a "30000x30000" PNG is one deflate block of an
all-black row range repeated (`one_colour_png`), never 900 MB in the client.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.fixtures.qwen3_vl import png_data_uri

from .conftest import (
    HealthPoller,
    RssSampler,
    Server,
    assert_error,
    percentile,
    scores_of,
)

SERVERS = ("images",)
MIB = 2**20
#: a refusal by the server's clock: header and shape checks are microseconds, the slowest is
#: base64-decoding the 0.9 MB bomb (~10 ms); 1 s leaves a loaded 2-core CI machine room
REFUSAL_S = 1.0
#: /health p99 while the hostile requests are handled, beyond the same poller's p99 with
#: nothing going on (as test_hostile_inputs.py bounds it)
HEALTH_P99_S = 0.100
#: one hostile request at a time, this far apart (the machine has 2 cores)
PAUSE_S = 0.05
#: peak RSS growth over every small hostile request: none of them gets to decode pixels, so
#: what is left is the bodies (the largest 1.2 MB), their parsed copies and allocator slack
HOSTILE_RSS_GROWTH = 64 * MIB


# --- images built from a few bytes ---------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    """A PNG (8-bit greyscale) whose IHDR says `width` x `height`, with `idat` as its data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def one_colour_png(width: int, height: int) -> bytes:
    """A complete, valid all-black PNG of width x height pixels, compressed without ever
    holding it: one ~1 MB block of rows is deflated once (a full flush resets the history,
    so its output is the same every time) and repeated; the zlib checksum of n zero bytes
    is (n mod 65521) << 16 | 1."""
    row = b"\x00" * (width + 1)  # filter byte 0, then black pixels
    per_block = max(1, MIB // len(row))
    blocks, rest = divmod(height, per_block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(row * per_block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(row * rest) + deflate.flush()
    size = height * (width + 1)
    checksum = ((size % 65521) << 16 | 1).to_bytes(4, "big")
    return png_bytes(width, height, b"\x78\xda" + block * blocks + tail + checksum)


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _pil_bytes(format: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format=format)
    return buffer.getvalue()


PNG = png_data_uri(40, 30, seed=1)
VALID = base64.b64decode(PNG.split(",", 1)[1])
BOMB = data_uri(one_colour_png(30_000, 30_000))  # 900 M pixels in 0.9 MB
TINY_IDAT = zlib.compress(b"\x00" * 64)
STRIP = data_uri(one_colour_png(1, 39_000_000))  # 39 M pixels in 77 KB
WIDE_STRIP = data_uri(one_colour_png(39_000_000, 1))


def rerank(*documents: Any, query: Any = "q") -> tuple[str, dict[str, Any]]:
    return "/v1/rerank", {"query": query, "documents": list(documents)}


# --- the hostile requests ------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    path: str
    body: dict[str, Any] | bytes
    status: int
    param: str | None
    says: str


TEXT = {"type": "text", "text": "a caption"}

HOSTILE: dict[str, Hostile] = {
    # decompression bombs: refused from the header, before any pixel is decoded
    "30000x30000 bomb (Jina form)": Hostile(
        *rerank("fine", {"image": BOMB}), 400, "documents[1]", "too many pixels"
    ),
    "30000x30000 bomb (vLLM content part)": Hostile(
        *rerank("a", "b", {"content": [TEXT, image_part(BOMB)]}), 400, "documents[2]", "pixels"
    ),
    "30000x30000 bomb (vLLM documents object)": Hostile(
        "/v1/rerank",
        {"query": "q", "documents": {"content": [TEXT, image_part(BOMB)]}},
        400,
        "documents[1]",
        "pixels",
    ),
    "30000x30000 bomb as the query": Hostile(
        *rerank("d", query={"image": BOMB}), 400, "query", "pixels"
    ),
    "30000x30000 bomb on /v1/score": Hostile(
        "/v1/score",
        {"queries": "q", "documents": ["d", {"image": BOMB}]},
        400,
        "documents[1]",
        "pixels",
    ),  # fmt: skip
    # headers that lie
    "IHDR 2^31-1 x 2^31-1": Hostile(
        *rerank({"image": data_uri(png_bytes(2**31 - 1, 2**31 - 1, TINY_IDAT))}),
        400,
        "documents[0]",
        "pixels",
    ),  # fmt: skip
    "IHDR 2^32-1 x 1 (beyond the PNG spec)": Hostile(
        *rerank({"image": data_uri(png_bytes(2**32 - 1, 1, TINY_IDAT))}),
        400,
        "documents[0]",
        "pixels",
    ),  # fmt: skip
    "IHDR 0 x 0": Hostile(
        *rerank({"image": data_uri(png_bytes(0, 0, TINY_IDAT))}),
        400,
        "documents[0]",
        "could not be decoded",
    ),  # fmt: skip
    "IHDR 7000x7000 (over --max-image-pixels, under PIL's own bomb limit)": Hostile(
        *rerank("x", {"image": data_uri(png_bytes(7000, 7000, TINY_IDAT))}),
        400,
        "documents[1]",
        "--max-image-pixels",
    ),  # fmt: skip
    # within --max-image-pixels, but an aspect ratio the processors refuse (above 200):
    # refused from the header (decoding a complete strip took 0.6-3.3 s)
    "a complete 1 x 39,000,000 PNG strip": Hostile(
        *rerank("x", {"image": STRIP}), 400, "documents[1]", "aspect ratio 39000000"
    ),
    "a complete 39,000,000 x 1 PNG strip as a content part": Hostile(
        *rerank({"content": [TEXT, image_part(WIDE_STRIP)]}), 400, "documents[0]", "aspect ratio"
    ),
    "truncated PNG": Hostile(
        *rerank("x", {"image": data_uri(VALID[: len(VALID) // 2])}),
        400,
        "documents[1]",
        "could not be decoded",
    ),  # fmt: skip
    "PNG signature only": Hostile(
        *rerank({"image": data_uri(VALID[:8])}), 400, "documents[0]", "could not be decoded"
    ),
    # types
    "a PDF sent as data:image/png": Hostile(
        *rerank({"image": data_uri(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj")}),
        400,
        "documents[0]",
        "could not be decoded",
    ),  # fmt: skip
    "data:text/plain": Hostile(
        *rerank({"image": data_uri(b"hello", "text/plain")}), 400, "documents[0]", "not an image"
    ),
    "TIFF (not an allowed format)": Hostile(
        *rerank({"image": data_uri(_pil_bytes("TIFF"), "image/tiff")}),
        400,
        "documents[0]",
        "formats: PNG, JPEG, WEBP, GIF, BMP",
    ),  # fmt: skip
    "SVG": Hostile(
        *rerank({"image": data_uri(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")}),
        400,
        "documents[0]",
        "could not be decoded",
    ),  # fmt: skip
    "ICO (not an allowed format)": Hostile(
        *rerank({"image": data_uri(_pil_bytes("ICO"), "image/x-icon")}),
        400,
        "documents[0]",
        "could not be decoded",
    ),  # fmt: skip
    # encodings and URLs
    "invalid base64": Hostile(
        *rerank({"image": "data:image/png;base64,!!!!"}), 400, "documents[0]", "base64"
    ),
    "base64 with bad padding": Hostile(
        *rerank({"image": "data:image/png;base64,abc"}), 400, "documents[0]", "base64"
    ),
    "a data: URI not base64-encoded": Hostile(
        *rerank({"image": "data:image/png,abc"}), 400, "documents[0]", "base64-encoded"
    ),
    "http URL without --allow-remote-media": Hostile(
        *rerank("x", {"image": "http://169.254.169.254/latest/meta-data/"}),
        400,
        "documents[1]",
        "--allow-remote-media",
    ),  # fmt: skip
    "https URL as the query": Hostile(
        *rerank("x", query={"content": [image_part("https://10.0.0.1/a.png")]}),
        400,
        "query",
        "--allow-remote-media",
    ),  # fmt: skip
    "file:// URL": Hostile(*rerank({"image": "file:///etc/passwd"}), 400, "documents[0]", "scheme"),
    # oversized content lists
    "3000 content parts in one document": Hostile(
        *rerank("x", {"content": [TEXT] * 3000}), 400, "documents[1]", "at most 64"
    ),
    "17 images in one document": Hostile(
        *rerank({"content": [image_part(PNG)] * 17}), 400, "documents[0]", "at most 16"
    ),
    "5000 Jina images in one document": Hostile(
        *rerank({"image": [PNG] * 5000}), 400, "documents[0]", "at most 64"
    ),
    "3000 parts in an image query": Hostile(
        *rerank("x", query={"content": [image_part(PNG)] * 3000}), 400, "query", "at most 64"
    ),
    "a 20000-part vLLM documents object": Hostile(
        "/v1/rerank",
        {"query": "q", "documents": {"content": [TEXT] * 20_000}},
        400,
        "documents",
        "--max-documents",
    ),
    # odd and nested shapes
    "an image_url nested in an object": Hostile(
        *rerank({"content": [{"type": "image_url", "image_url": {"url": {"url": PNG}}}]}),
        400,
        "documents[0].content[0]",
        "without a url",
    ),  # fmt: skip
    "a content part nested in a list": Hostile(
        *rerank("x", {"content": [[TEXT]]}), 400, "documents[1].content[0]", "content part"
    ),
    "a text part whose text is a number": Hostile(
        *rerank({"content": [{"type": "text", "text": 5}]}),
        400,
        "documents[0].content[0]",
        "content part",
    ),  # fmt: skip
    "an image_url part without its url": Hostile(
        *rerank({"content": [{"type": "image_url"}]}), 400, "documents[0].content[0]", "url"
    ),
    "a video part": Hostile(
        *rerank({"content": [{"type": "video_url", "video_url": {"url": PNG}}]}),
        400,
        "documents[0].content[0]",
        "content part",
    ),  # fmt: skip
    "a Jina image that is an object": Hostile(
        *rerank({"image": {"url": PNG}}), 400, "documents[0].image", "string"
    ),
    "a Jina image that is null": Hostile(
        *rerank("x", "y", {"image": None}), 400, "documents[2].image", "string"
    ),
    "a Jina image list that is empty": Hostile(
        *rerank({"image": []}), 400, "documents[0].image", "string"
    ),
    "a Jina text that is a list": Hostile(
        *rerank({"image": PNG, "text": ["a"]}), 400, "documents[0].text", "string"
    ),
    "a documents object whose content is a string": Hostile(
        "/v1/rerank", {"query": "q", "documents": {"content": "x"}}, 400, "documents", "list"
    ),
    "a documents object without content": Hostile(
        "/v1/rerank", {"query": "q", "documents": {"image": PNG}}, 400, "documents", "content"
    ),
    "a mixed list whose fourth item is truncated": Hostile(
        *rerank("a", {"text": "b"}, {"content": [TEXT]}, {"image": data_uri(VALID[:60])}),
        400,
        "documents[3]",
        "decoded",
    ),  # fmt: skip
    "a query list whose second item is a bad part (/v1/score)": Hostile(
        "/v1/score",
        {"queries": [{"image": PNG}, {"content": [5]}], "documents": ["a", "b"]},
        400,
        "queries[1].content[0]",
        "content part",
    ),  # fmt: skip
    "content nested 100,000 deep (past the JSON parser's depth limit)": Hostile(
        "/v1/rerank",
        b'{"query": "q", "documents": [{"content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        400,
        None,
        "depth limit",
    ),
    "an image url nested 400 deep (past the server's 250-level limit)": Hostile(
        "/v1/rerank",
        b'{"query": "q", "documents": [{"image": ' + b"[" * 400 + b"]" * 400 + b"}]}",
        400,
        None,
        "nested more than",
    ),
    "an image url nested 200 deep (within the depth limit)": Hostile(
        "/v1/rerank",
        b'{"query": "q", "documents": ["x", {"image": ' + b"[" * 200 + b"]" * 200 + b"}]}",
        400,
        "documents[1].image",
        "string",
    ),
}

#: big bodies: refused by their size before anything is decoded (not in the /health round,
#: whose point is many small requests; test_hostile_inputs.py covers big bodies)
BIG: dict[str, Hostile] = {
    "a 21 MB image (over --max-image-bytes)": Hostile(
        "/v1/rerank",
        b'{"query": "q", "documents": ["x", {"image": "data:image/png;base64,'
        + b"A" * (28 * MIB)
        + b'"}]}',
        400,
        "documents[1]",
        "--max-image-bytes",
    ),
    "a 65 MB body (over --max-request-bytes)": Hostile(
        "/v1/rerank",
        b'{"query": "q", "documents": [{"image": "data:image/png;base64,'
        + b"A" * (65 * MIB)
        + b'"}]}',
        413,
        ...,
        "",
    ),
}


def send(server: Server, case: Hostile, client: httpx.Client) -> tuple[httpx.Response, str]:
    request_id = f"hostile-image-{uuid.uuid4().hex}"
    headers = {"X-Request-Id": request_id}
    if isinstance(case.body, bytes):
        headers["content-type"] = "application/json"
        response = client.post(case.path, content=case.body, headers=headers)
    else:
        response = client.post(case.path, json=case.body, headers=headers)
    return response, request_id


def post(client: httpx.Client, request: tuple[str, dict[str, Any]]) -> httpx.Response:
    path, body = request
    return client.post(path, json=body)


@pytest.fixture(scope="module")
def images(servers) -> Server:
    return servers["images"]


@pytest.fixture(scope="module")
def valid_score(images) -> float:
    """The score of a valid image document, before anything hostile was sent."""
    with images.client() as client:
        response = post(client, rerank({"image": PNG}, query="a photo"))
    assert response.status_code == 200, response.text[:300]
    return scores_of(response.json())[0]


@pytest.mark.parametrize("name", [*HOSTILE, *BIG])
def test_a_hostile_image_request_is_refused_naming_its_input_fast(images, valid_score, name):
    case = HOSTILE.get(name) or BIG[name]
    with images.client(timeout=30) as client:
        started = time.perf_counter()
        response, request_id = send(images, case, client)
        took = time.perf_counter() - started
    says = [case.says] if case.says else []
    assert_error(response, case.status, param=case.param, contains=says)
    server_s = images.access_record(request_id)["latency_ms"] / 1000
    print(
        f"\n{name}: {response.status_code} in {server_s * 1000:.1f} ms ({took * 1000:.0f} client)"
    )
    assert server_s < REFUSAL_S, f"{name}: {case.status} after {server_s:.2f} s (server)"
    assert took < 10 * REFUSAL_S, f"{name}: {took:.2f} s (client)"


def test_health_stays_fast_memory_bounded_and_images_still_score_while_hostile_ones_arrive(
    images, valid_score
):
    """Every small hostile request, one at a time, twice over, while /health is polled from
    another process and RSS sampled; then the valid image scores as it did before."""
    with HealthPoller(images.url) as idle:
        time.sleep(1.0)
    baseline = percentile(idle.latencies(), 99)
    sends: list[tuple[float, float]] = []
    with images.client(timeout=30) as client:
        before = images.rss_bytes()
        with HealthPoller(images.url) as poller, RssSampler(images) as rss:
            for _ in range(2):
                for case in HOSTILE.values():
                    started = time.monotonic()
                    response, _ = send(images, case, client)
                    sends.append((started, time.monotonic()))
                    assert response.status_code == case.status, response.text[:300]
                    time.sleep(PAUSE_S)
        after = post(client, rerank({"image": PNG}, query="a photo"))
    window = poller.latencies(sends[0][0], sends[-1][1])
    p99 = percentile(window, 99)
    growth = rss.peak - before
    print(
        f"\n/health p99 {p99 * 1000:.1f} ms over {len(window)} polls during {len(sends)} hostile "
        f"requests (idle p99 {baseline * 1000:.1f} ms); RSS {before / MIB:.0f} MiB, peak "
        f"+{growth / MIB:.1f} MiB; slowest request "
        f"{max(end - start for start, end in sends) * 1000:.0f} ms (client)"
    )
    assert len(window) >= 20, f"only {len(window)} /health polls during the hostile requests"
    assert p99 <= baseline + HEALTH_P99_S, f"/health p99 {p99 * 1000:.0f} ms"
    assert growth <= HOSTILE_RSS_GROWTH, f"peak RSS grew {growth / MIB:.0f} MiB"
    assert after.status_code == 200, after.text[:300]
    assert scores_of(after.json()) == [valid_score]
    assert images.proc.poll() is None


def test_a_remote_url_is_refused_without_a_connection(images):
    """SSRF: without --allow-remote-media the server never connects to a URL it is sent (a
    listener on this machine sees no connection attempt)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        with images.client() as client:
            for url in (f"http://127.0.0.1:{port}/a.png", f"https://localhost:{port}/a.png"):
                response = post(client, rerank("x", {"image": url}))
                assert_error(response, 400, param="documents[1]", contains=["--allow-remote"])
        with pytest.raises(TimeoutError):
            listener.accept()


def test_a_text_only_documents_object_scores_as_the_same_list(images):
    """vLLM's documents object with text parts only: each part one document, scored as the
    same strings in a list (was a 500: the parts were joined into one text first)."""
    texts = ["ab", "a longer document", "c"]
    with images.client() as client:
        listed = post(client, rerank(*texts))
        as_object = client.post(
            "/v1/rerank",
            json={
                "query": "q",
                "documents": {"content": [{"type": "text", "text": t} for t in texts]},
            },
        )
        mixed = client.post(
            "/v1/rerank",
            json={
                "query": "q",
                "documents": {"content": [image_part(PNG), {"type": "text", "text": "ab"}]},
            },
        )
    assert listed.status_code == as_object.status_code == mixed.status_code == 200, as_object.text[
        :300
    ]
    assert scores_of(as_object.json()) == pytest.approx(scores_of(listed.json()), abs=1e-6)
    assert scores_of(mixed.json())[1] == pytest.approx(scores_of(listed.json())[0], abs=1e-6)
    echoed = {r["index"]: r["document"] for r in as_object.json()["results"]}
    assert echoed[0] == {"type": "text", "text": "ab"}


def test_a_bomb_within_the_pixel_cap_is_scored_in_bounded_time_and_memory(images):
    """A 6000x6000 one-colour PNG (36 M pixels, 35 KB: under --max-image-pixels) is a valid
    image: decoded, resized to the model's pixel budget and scored."""
    body = {"query": "q", "documents": ["x", {"image": data_uri(one_colour_png(6000, 6000))}]}
    with images.client(timeout=60) as client, RssSampler(images) as rss:
        before = images.rss_bytes()
        request_id = f"big-image-{uuid.uuid4().hex}"
        response = client.post("/v1/rerank", json=body, headers={"X-Request-Id": request_id})
    assert response.status_code == 200, response.text[:300]
    server_s = images.access_record(request_id)["latency_ms"] / 1000
    growth = rss.peak - before
    print(f"\n36 MP image: scored in {server_s:.2f} s (server), peak RSS +{growth / MIB:.0f} MiB")
    assert server_s < 10, server_s
    # the greyscale decode (1 byte a pixel), its RGB copy (3), the resize's float buffers and
    # allocator slack: 16 bytes a pixel (measured: ~9)
    assert growth <= 16 * 6000 * 6000, f"peak RSS grew {growth / MIB:.0f} MiB"
