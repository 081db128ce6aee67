"""Image inputs (issue 19 part 2), in-process: the request shapes that carry images, and the
image-input security rules (data: URIs always; http(s) only with --allow-remote-media, then
bounded; every bad image a 400 naming its document; decoding off the event loop).

The parsing of the shapes (api/documents.py) and the fetch/decode rules (recipes/media.py)
are tested directly; the HTTP behaviour over the fake engine, with the tiny Qwen3-VL
fixture's recipe (real tokenizer and image processor) or the text-only Qwen3 recipe.
"""

from __future__ import annotations

import base64
import http.server
import math
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from rerankd.api.documents import document_inputs, input_text, query_input
from rerankd.errors import InvalidRequest
from rerankd.recipes.media import MediaError, MediaPolicy, load_image
from tests.fixtures.qwen3_vl import png_data_uri

PNG = png_data_uri(40, 30, seed=1)
PNG2 = png_data_uri(64, 64, seed=2, mode="RGBA")


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _png_bytes(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def _uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with one tiny compressed row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --- the shapes, parsed ------------------------------------------------------------------


def test_vllm_documents_object_is_one_document_per_part():
    inputs, sent = document_inputs(
        {"content": [_image_part(PNG), {"type": "text", "text": "a caption"}]}
    )
    assert inputs == [(("image", PNG),), "a caption"]
    assert sent[0] == _image_part(PNG)


def test_a_list_mixes_strings_text_objects_content_items_and_jina_forms():
    documents = [
        "plain",
        {"text": "an object", "id": 7, "content": "a Cohere field, not vLLM's list"},
        {"content": [{"type": "text", "text": "t"}, _image_part(PNG)]},
        {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"image": PNG},
        {"text": "both", "image": PNG2},
    ]
    inputs, sent = document_inputs(documents)
    assert inputs == [
        "plain",
        "an object",
        (("text", "t"), ("image", PNG)),
        "ab",  # text parts only: their texts joined, as the official VL code joins them
        (("image", PNG),),
        (("image", PNG2), ("text", "both")),
    ]
    assert sent == documents
    assert input_text(inputs[5]) == "both"


def test_queries_take_the_same_forms():
    assert query_input("q") == "q"
    assert query_input({"text": "q"}, text_object=True) == "q"  # /v1/score's query lists
    with pytest.raises(InvalidRequest, match="query must be a string"):
        query_input({"text": "q"})  # a rerank query object without an image stays a 400
    assert query_input({"content": [_image_part(PNG)]}) == (("image", PNG),)
    assert query_input({"image": PNG, "text": "q"}) == (("image", PNG), ("text", "q"))


@pytest.mark.parametrize(
    ("documents", "param"),
    [
        (["ok", {"content": [{"type": "video_url", "video_url": {"url": "x"}}]}], "documents[1]"),
        (["ok", {"content": [{"type": "image_url", "image_url": {}}]}], "documents[1]"),
        (["ok", {"content": "not a list"}], "documents[1]"),
        (["ok", "ok", {"image": 3}], "documents[2].image"),
        ([{"content": [_image_part(PNG)] * 17}], "documents[0]"),
        ([{"content": [{"type": "text", "text": "x"}] * 65}], "documents[0]"),
        ({"items": []}, "documents"),
    ],
)
def test_malformed_shapes_are_400s_naming_the_document(documents, param):
    with pytest.raises(InvalidRequest) as caught:
        document_inputs(documents)
    assert caught.value.param.startswith(param), caught.value.message


# --- fetching and decoding -----------------------------------------------------------------


def test_a_data_uri_decodes():
    assert load_image(PNG, MediaPolicy()).size == (40, 30)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,!!!!", "base64"),
        ("data:image/png," + "abc", "base64-encoded"),
        (_uri(b"<svg></svg>", "image/svg+xml"), "could not be decoded"),
        (_uri(b"hello", "text/plain"), "not an image"),
        (_uri(b"GIF89a-not-really"), "could not be decoded"),
        (_uri(_png_bytes(PNG)[:60]), "decoded"),  # truncated PNG
        (_uri(_bomb_png(100_000, 100_000)), "pixels"),  # decompression bomb, refused unread
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/a.png", "scheme"),
        ("https://example.com/a.png", "--allow-remote-media"),
    ],
)
def test_bad_images_are_refused_with_a_reason(url, message):
    with pytest.raises(MediaError, match=message.replace("-", r"\-")):
        load_image(url, MediaPolicy())


def test_byte_and_pixel_caps():
    with pytest.raises(MediaError, match="bytes"):
        load_image(PNG2, MediaPolicy(max_bytes=200))
    with pytest.raises(MediaError, match="64x64 pixels"):
        load_image(PNG2, MediaPolicy(max_pixels=64 * 63))


def test_an_aspect_ratio_the_processors_refuse_is_refused_from_the_header():
    """A 1 x 39,000,000 strip is within max_pixels, but smart_resize (Qwen2-VL's, Qwen3-VL's)
    refuses an aspect ratio above 200: refused before decoding (decoding it took 0.7 s here,
    3.3 s for a complete strip). The bound is smart_resize's: 200 passes, 201 does not."""
    strip = _uri(_bomb_png(1, 39_000_000))
    started = time.perf_counter()
    with pytest.raises(MediaError, match="1x39000000 pixels: its aspect ratio 39000000"):
        load_image(strip, MediaPolicy())
    assert time.perf_counter() - started < 0.1
    assert load_image(png_data_uri(200, 1, seed=4), MediaPolicy()).size == (200, 1)
    with pytest.raises(MediaError, match="aspect ratio 201 is above 200"):
        load_image(png_data_uri(1, 201, seed=4), MediaPolicy())
    assert load_image(strip, MediaPolicy(max_aspect_ratio=math.inf)).size == (1, 39_000_000)


class _ImageServer(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes, float]] = {}

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        kind, body, delay = self.routes.get(self.path, ("text/plain", b"missing", 0.0))
        if delay:
            threading.Event().wait(delay)
        self.send_response(200 if self.path in self.routes else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    _ImageServer.routes = {
        "/a.png": ("image/png", _png_bytes(PNG), 0.0),
        "/page.html": ("text/html", b"<html></html>", 0.0),
        "/big.png": ("image/png", _png_bytes(PNG2), 0.0),
        "/slow.png": ("image/png", _png_bytes(PNG), 2.0),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_images_only_when_allowed_then_bounded(image_server):
    allowed = MediaPolicy(allow_remote=True, timeout=0.5, max_bytes=8000)
    with pytest.raises(MediaError, match="--allow-remote-media"):
        load_image(f"{image_server}/a.png", MediaPolicy())
    assert load_image(f"{image_server}/a.png", allowed).size == (40, 30)
    with pytest.raises(MediaError, match="content type 'text/html'"):
        load_image(f"{image_server}/page.html", allowed)
    with pytest.raises(MediaError, match="larger than 8000 bytes"):
        load_image(f"{image_server}/big.png", allowed)
    with pytest.raises(MediaError, match="could not be fetched"):
        load_image(f"{image_server}/slow.png", allowed)
    with pytest.raises(MediaError, match="could not be fetched"):
        load_image(f"{image_server}/missing.png", allowed)
    redirect = f"{image_server}/redirect?"
    assert load_image(f"{redirect}{image_server}/a.png", allowed).size == (40, 30)
    with pytest.raises(MediaError, match="non-http"):
        load_image(f"{redirect}ftp://127.0.0.1/a.png", allowed)
    with pytest.raises(MediaError, match="not allowed"):  # urllib's own check, first
        load_image(f"{redirect}file:///etc/hostname", allowed)


# --- over HTTP, on the fake engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def vl_recipe():
    from rerankd.runtime import load_recipe
    from rerankd.settings import Settings
    from tests.fixtures.qwen3_vl import qwen3_vl_dir

    return load_recipe(Settings(model=str(qwen3_vl_dir())))[2]


@pytest.fixture(scope="module")
def make_vl_client(vl_recipe):
    """`with make_vl_client(media=MediaPolicy(...)) as client:` the app over a fake engine
    with the tiny Qwen3-VL-Reranker's recipe (real tokenizer and image processor)."""
    from contextlib import contextmanager

    from starlette.testclient import TestClient

    from rerankd.api import create_app
    from rerankd.metrics import Metrics
    from rerankd.scheduler import Scheduler
    from rerankd.service import Limits, RerankService, ServedModel
    from tests.api.conftest import FakeEngine

    @contextmanager
    def make(media: MediaPolicy | None = None):
        metrics = Metrics()
        engine = FakeEngine()
        model = ServedModel("tiny-vl", vl_recipe, Scheduler(engine, metrics, "tiny-vl"))
        service = RerankService([model], metrics, Limits(media=media or MediaPolicy()))
        with TestClient(create_app(service), raise_server_exceptions=False) as client:
            client.engine = engine  # type: ignore[attr-defined]
            yield client

    return make


@pytest.fixture()
def vl_client(make_vl_client):
    with make_vl_client() as client:
        yield client


def _scores(response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {r["index"]: r["relevance_score"] for r in response.json()["results"]}


def test_a_text_only_model_refuses_an_image_document_naming_it(client):
    body = {"query": "q", "documents": ["a", {"image": PNG}]}
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "documents[1]" and "reads text only" in error["message"]
    body = {"queries": {"content": [_image_part(PNG)]}, "documents": ["a"]}
    response = client.post("/v1/score", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "query"
    # text parts alone are text, for every model
    text_parts = {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    same = client.post("/v1/rerank", json={"query": "q", "documents": [text_parts, "ab"]})
    scores = _scores(same)
    assert scores[0] == scores[1]


def test_every_image_form_scores_the_same_document(vl_client):
    forms = [
        {"documents": {"content": [_image_part(PNG), {"type": "text", "text": "t"}]}},
        {"documents": [{"content": [_image_part(PNG)]}, "t"]},
        {"documents": [{"image": PNG}, {"text": "t"}]},
    ]
    answers = [_scores(vl_client.post("/v1/rerank", json={"query": "q", **f})) for f in forms]
    assert answers[0] == answers[1] == answers[2]
    results = vl_client.post("/v1/rerank", json={"query": "q", **forms[0]}).json()["results"]
    echoed = {r["index"]: r["document"] for r in results}
    assert echoed == {0: _image_part(PNG), 1: {"type": "text", "text": "t"}}
    batch = vl_client.engine.batches[-1]
    with_images = [p for p in batch.pairs if p.images]
    assert len(with_images) == 1 and with_images[0].images[0][1] == (1, 4, 6)  # 40x30 -> 96x64


def test_a_mixed_list_and_an_image_query(vl_client):
    documents = [
        "plain",
        {"text": "an object", "id": 7},
        {"content": [{"type": "text", "text": "t"}, _image_part(PNG)]},
        {"image": PNG2},
        {"text": "both", "image": PNG2},
    ]
    for query in ("q", {"content": [_image_part(PNG2)]}, {"image": PNG, "text": "q"}):
        response = vl_client.post("/v1/rerank", json={"query": query, "documents": documents})
        assert len(_scores(response)) == 5
        assert {r["index"]: r["document"] for r in response.json()["results"]}[1] == documents[1]
    image_query = vl_client.engine.batches[-1].pairs
    assert all(len(pair.images) >= 1 for pair in image_query)


def test_score_takes_the_same_forms(vl_client):
    pairs = {
        "queries": [{"image": PNG}, "text query"],
        "documents": [{"content": [_image_part(PNG2)]}, {"image": PNG, "text": "t"}],
    }
    response = vl_client.post("/v1/score", json=pairs)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    one_to_many = {
        "queries": {"content": [_image_part(PNG)]},
        "documents": {"content": [_image_part(PNG2), {"type": "text", "text": "t"}]},
    }
    response = vl_client.post("/v1/score", json=one_to_many)
    assert response.status_code == 200 and len(response.json()["data"]) == 2
    rerank = vl_client.post(
        "/v1/rerank", json={"query": one_to_many["queries"], "documents": one_to_many["documents"]}
    )
    by_index = _scores(rerank)
    assert [d["score"] for d in response.json()["data"]] == [by_index[0], by_index[1]]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/a.png", "--allow-remote-media"),
        (_uri(_bomb_png(100_000, 100_000)), "pixels"),
        (_uri(_png_bytes(PNG)[:60]), "decoded"),
        ("data:image/png;base64,%%%", "base64"),
        (_uri(b"%PDF-1.4", "application/pdf"), "not an image"),
        (png_data_uri(600, 2, seed=3), "aspect ratio"),
    ],
)
def test_a_bad_image_is_a_400_naming_its_document(vl_client, url, message):
    documents = ["fine", {"image": PNG}, {"content": [_image_part(url)]}]
    response = vl_client.post("/v1/rerank", json={"query": "q", "documents": documents})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "documents[2]" and message in error["message"], error
    response = vl_client.post("/v1/rerank", json={"query": {"image": url}, "documents": ["d"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "query"


def test_the_byte_and_pixel_caps_apply_per_server(make_vl_client):
    with make_vl_client(MediaPolicy(max_bytes=5000, max_pixels=30 * 30)) as client:
        for document, message in (({"image": PNG2}, "bytes"), ({"image": PNG}, "pixels")):
            response = client.post("/v1/rerank", json={"query": "q", "documents": [document]})
            assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_request_s_images_have_a_pixel_total(make_vl_client):
    # PNG is 40x30 (1,200 pixels): two distinct ones fit 2,500, a third does not; a repeat
    # of one is decoded once and costs nothing more
    with make_vl_client(MediaPolicy(max_request_pixels=2500)) as client:
        third = png_data_uri(40, 30, seed=9)
        documents = [{"image": PNG}, {"image": PNG}, {"image": png_data_uri(40, 30, seed=8)}]
        assert (
            len(_scores(client.post("/v1/rerank", json={"query": "q", "documents": documents})))
            == 3
        )
        response = client.post(
            "/v1/rerank", json={"query": "q", "documents": [*documents, {"image": third}]}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "documents[3]" and "--max-request-image-pixels" in error["message"]


def test_models_say_which_inputs_they_read(vl_client, client):
    assert vl_client.get("/v1/models").json()["data"][0]["input_modalities"] == ["text", "image"]
    assert client.get("/v1/models").json()["data"][0]["input_modalities"] == ["text"]


def test_oversized_content_lists_are_refused(vl_client):
    documents = [{"content": [_image_part(PNG)] * 17}]
    response = vl_client.post("/v1/rerank", json={"query": "q", "documents": documents})
    assert response.status_code == 400 and response.json()["error"]["param"] == "documents[0]"


def test_remote_images_with_the_flag(make_vl_client, image_server):
    allowed = MediaPolicy(allow_remote=True, timeout=0.5)
    with make_vl_client(allowed) as client:
        documents = [{"image": f"{image_server}/a.png"}, {"image": PNG}]
        scores = _scores(client.post("/v1/rerank", json={"query": "q", "documents": documents}))
        assert scores[0] == scores[1]  # the same PNG, fetched or inline
        documents = ["d", {"image": f"{image_server}/page.html"}]
        response = client.post("/v1/rerank", json={"query": "q", "documents": documents})
        assert response.status_code == 400 and response.json()["error"]["param"] == "documents[1]"


def test_images_are_decoded_off_the_event_loop(vl_client, monkeypatch):
    import rerankd.inputs

    threads = []
    real = rerankd.inputs.load_image

    def recording(url, policy, *rest):
        threads.append(threading.current_thread().name)
        return real(url, policy, *rest)

    monkeypatch.setattr(rerankd.inputs, "load_image", recording)
    documents = [{"image": PNG}, {"image": PNG}, {"image": PNG2}]
    assert (
        len(_scores(vl_client.post("/v1/rerank", json={"query": "q", "documents": documents}))) == 3
    )
    assert len(threads) == 2  # one decode per distinct image in a request
    assert all(name.startswith("rerankd-tok") for name in threads), threads
