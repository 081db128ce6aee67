"""Hostile images in jina-reranker-m0's own request shapes, against a real `rerankd serve`.

test_hostile_images.py sends every document form to the Qwen3-VL-Reranker fixture; here the
server runs the tiny jina-reranker-m0 fixture (its recipe: EXIF orientation applied, then the
Qwen2-VL image processor with the official 602,112-pixel budget), and the bodies use Jina's
`{"image": ...}` and `{"text": ..., "image": ...}` objects, as documents, as the query and in
/v1/score's query lists. Each bad one is a 400 whose `param` names the input, fast by the
server's clock; images that are odd but valid (16-bit, CMYK, palette with transparency, a
rotating or corrupt EXIF block, 1x1, 200:1, 50 frames) score, finite; no body is ever a 500.
"""

from __future__ import annotations

import io
import math
import struct
import time
import uuid
from typing import Any

import numpy as np
import pytest

from .conftest import Server, assert_error, scores_of
from .test_hostile_images import (
    BOMB,
    PNG,
    REFUSAL_S,
    STRIP,
    TINY_IDAT,
    VALID,
    data_uri,
    png_bytes,
)

SERVERS = ("m0",)


def _saved(image: Any, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with an APP1 segment holding `payload` right after its SOI marker."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def odd_but_valid() -> dict[str, str]:
    """Images a decoder and the m0 recipe must handle (data: URIs), by name."""
    from PIL import Image

    noise = Image.fromarray(np.random.RandomState(5).randint(0, 256, (30, 40, 3), np.uint8))
    rotate = Image.Exif()
    rotate[0x0112] = 6  # orientation: rotate 90
    jpeg = _saved(noise, "JPEG")
    frames = [Image.new("P", (20, 20), i) for i in range(50)]
    grey16 = np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50
    return {
        "16-bit greyscale PNG": data_uri(_saved(Image.fromarray(grey16), "PNG")),
        "CMYK JPEG": data_uri(_saved(noise.convert("CMYK"), "JPEG"), "image/jpeg"),
        "palette PNG with transparency": data_uri(
            _saved(noise.convert("P"), "PNG", transparency=0)
        ),
        "grey + alpha PNG": data_uri(_saved(noise.convert("LA"), "PNG")),
        "1-bit PNG": data_uri(_saved(noise.convert("1"), "PNG")),
        "JPEG with EXIF orientation 6": data_uri(_saved(noise, "JPEG", exif=rotate), "image/jpeg"),
        "JPEG with a corrupt EXIF block": data_uri(
            _with_app1(jpeg, b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 16), "image/jpeg"
        ),
        "JPEG whose EXIF claims 65535 entries": data_uri(
            _with_app1(jpeg, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x00" * 8),
            "image/jpeg",
        ),
        "1x1 PNG": data_uri(_saved(Image.new("RGB", (1, 1)), "PNG")),
        "200x1 PNG (the largest aspect ratio allowed)": data_uri(
            _saved(Image.new("RGB", (200, 1)), "PNG")
        ),
        "50-frame GIF": data_uri(
            _saved(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif"
        ),
    }


def _tiff() -> str:
    from PIL import Image

    return data_uri(_saved(Image.new("RGB", (8, 8)), "TIFF"), "image/tiff")


#: name: (path, body, param, a phrase of the message)
HOSTILE: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "a bomb with a caption": (
        "/v1/rerank",
        {"query": "q", "documents": ["x", {"text": "a caption", "image": BOMB}]},
        "documents[1]",
        "too many pixels",
    ),
    "a 1 x 39,000,000 strip": (
        "/v1/rerank",
        {"query": "q", "documents": [{"image": STRIP}]},
        "documents[0]",
        "aspect ratio",
    ),
    "a 7000x7000 header with a caption": (
        "/v1/rerank",
        {
            "query": "q",
            "documents": [{"text": "t", "image": data_uri(png_bytes(7000, 7000, TINY_IDAT))}],
        },
        "documents[0]",
        "--max-image-pixels",
    ),  # fmt: skip
    "a truncated PNG with a caption, third in a mixed list": (
        "/v1/rerank",
        {
            "query": "q",
            "documents": ["a", {"image": PNG}, {"text": "c", "image": data_uri(VALID[:80])}],
        },
        "documents[2]",
        "decoded",
    ),  # fmt: skip
    "text that is a number": (
        "/v1/rerank",
        {"query": "q", "documents": [{"text": 5, "image": PNG}]},
        "documents[0].text",
        "string",
    ),
    "an image that is null beside text": (
        "/v1/rerank",
        {"query": "q", "documents": ["x", {"text": "x", "image": None}]},
        "documents[1].image",
        "string",
    ),
    "an empty image string": (
        "/v1/rerank",
        {"query": "q", "documents": [{"text": "x", "image": ""}]},
        "documents[0].image",
        "string",
    ),
    "vision markup in the text": (
        "/v1/rerank",
        {"query": "q", "documents": [{"text": "<|image_pad|>" * 3, "image": PNG}]},
        "documents[0]",
        "vision markup",
    ),
    "17 images in one document": (
        "/v1/rerank",
        {"query": "q", "documents": [{"text": "t", "image": [PNG] * 17}]},
        "documents[0]",
        "at most 16",
    ),
    "an http image without --allow-remote-media": (
        "/v1/rerank",
        {"query": "q", "documents": [{"text": "t", "image": "http://169.254.169.254/a.png"}]},
        "documents[0]",
        "--allow-remote-media",
    ),
    "a text/plain data: URI": (
        "/v1/rerank",
        {"query": "q", "documents": [{"image": "data:text/plain;base64,aGVsbG8="}]},
        "documents[0]",
        "not an image",
    ),
    "a bomb as the query's image": (
        "/v1/rerank",
        {"query": {"text": "q", "image": BOMB}, "documents": ["d"]},
        "query",
        "pixels",
    ),
    "a query whose text is a list": (
        "/v1/rerank",
        {"query": {"image": PNG, "text": ["a"]}, "documents": ["d"]},
        "query.text",
        "string",
    ),
    "a TIFF as the second query of /v1/score": (
        "/v1/score",
        {"queries": [{"image": PNG}, {"image": _tiff()}], "documents": ["a", "b"]},
        "queries[1]",
        "formats",
    ),
}


@pytest.fixture(scope="module")
def m0(servers) -> Server:
    server = servers["m0"]
    with server.client() as client:
        (model,) = client.get("/v1/models").json()["data"]
    assert model["recipe"] == "jina-reranker-m0", model
    return server


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_bad_image_in_jina_s_shapes_is_a_400_naming_its_input_fast(m0, name):
    path, body, param, says = HOSTILE[name]
    request_id = f"hostile-m0-{uuid.uuid4().hex}"
    with m0.client(timeout=30) as client:
        response = client.post(path, json=body, headers={"X-Request-Id": request_id})
    assert_error(response, 400, param=param, contains=[says])
    server_s = m0.access_record(request_id)["latency_ms"] / 1000
    print(f"\n{name}: 400 in {server_s * 1000:.1f} ms (server)")
    assert server_s < REFUSAL_S, f"{name}: 400 after {server_s:.2f} s (server)"


def test_odd_but_valid_images_score_in_every_jina_shape(m0):
    """Each odd image as {"image"}, as {"text", "image"} and as the query: 200, finite."""
    images = odd_but_valid()
    with m0.client(timeout=60) as client:
        for name, url in images.items():
            bodies = (
                {
                    "query": "q",
                    "documents": ["text", {"image": url}, {"text": "cap", "image": url}],
                },
                {"query": {"text": "q", "image": url}, "documents": ["d", {"image": PNG}]},
            )
            for body in bodies:
                started = time.perf_counter()
                response = client.post("/v1/rerank", json=body)
                assert response.status_code == 200, f"{name}: {response.text[:300]}"
                scores = scores_of(response.json())
                assert all(math.isfinite(s) for s in scores), (name, scores)
                print(f"\n{name}: 200 in {(time.perf_counter() - started) * 1000:.0f} ms")


def test_the_server_is_alive_and_scores_the_same_after_everything(m0):
    """After the hostile and odd bodies, a valid image document scores as before."""
    body = {"query": "a photo", "documents": [{"text": "cap", "image": PNG}]}
    with m0.client(timeout=30) as client:
        before = scores_of(client.post("/v1/rerank", json=body).json())
        for path, hostile, _, _ in HOSTILE.values():
            assert client.post(path, json=hostile).status_code == 400
        after = client.post("/v1/rerank", json=body)
        health = client.get("/health")
    assert after.status_code == 200 and scores_of(after.json()) == before
    assert health.status_code == 200 and m0.proc.poll() is None
