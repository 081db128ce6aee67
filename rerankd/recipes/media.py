"""Images a request refers to: `data:` URIs always, http(s) only when the server allows it;
bounded in bytes and pixels before any decoding.

Called from the service's worker threads (never the event loop): a remote fetch blocks its
thread for at most `MediaPolicy.timeout` seconds. Every failure is a `MediaError` whose
message says what was wrong; the service adds which document it was.

What this module does not do: resize or normalize (the recipe does, the way its model's
official code does), or cache across requests.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_ASPECT_RATIO",
    "DecodedImage",
    "MediaError",
    "MediaPolicy",
    "decode_image",
    "load_image",
]

#: formats PIL may try: the web's image formats (a smaller parser surface than all of PIL's)
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: the media types a remote response may declare
ALLOWED_CONTENT_TYPES = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    "image/gif",
    "image/bmp",
)

#: the longest side over the shortest that an image may have: `smart_resize` in qwen_vl_utils
#: and in transformers' Qwen2-VL/Qwen3-VL image processors refuses more than 200, so neither
#: image recipe (Qwen3-VL-Reranker, jina-reranker-m0) can use such an image
MAX_ASPECT_RATIO = 200


class MediaError(ValueError):
    """An image that cannot be used; the message names the reason, not the document."""


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may make the server fetch and decode (see Settings for each flag)."""

    #: http(s) URLs fetched by the server (off by default: a request could make the server
    #: reach hosts only it can reach, SSRF)
    allow_remote: bool = False
    #: seconds one remote fetch may take, connect and read together
    timeout: float = 10.0
    #: most encoded bytes of one image (a data: URI's decoded payload, or a download)
    max_bytes: int = 20 * 1024 * 1024
    #: most pixels of one image, checked from its header before decoding (decompression
    #: bombs: a few KB of PNG can claim gigapixels)
    max_pixels: int = 40_000_000
    #: most pixels of all the distinct images of one request together (each is held decoded
    #: until the request is encoded: many small, highly compressible PNGs must not add up to
    #: gigabytes)
    max_request_pixels: int = 400_000_000
    #: most (longest side / shortest side), checked from the header: a 1 x 39 M strip is
    #: within `max_pixels` but no recipe can use it, and decoding it would cost seconds
    max_aspect_ratio: float = MAX_ASPECT_RATIO


class DecodedImage:
    """A decoded image as a request part: hashed and compared by identity (PIL images are not
    hashable, and the service keys inputs by value), the PIL image in `image`."""

    __slots__ = ("image",)

    def __init__(self, image: Any) -> None:
        self.image = image

    def __repr__(self) -> str:
        return f"DecodedImage({self.image.width}x{self.image.height})"


def load_image(url: str, policy: MediaPolicy, pixels_left: int | None = None) -> Any:
    """The decoded PIL image that `url` (a data: URI or, when allowed, an http(s) URL) holds;
    `pixels_left`: what the request's other images left of `max_request_pixels`."""
    if not isinstance(url, str) or not url:
        raise MediaError("an image must be given as a data: URI or an http(s) URL string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(_data_uri_bytes(url, policy.max_bytes), policy, pixels_left)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError(
                "remote image URLs are not fetched by this server (start it with "
                "--allow-remote-media to allow them); send the image as a data: URI"
            )
        return decode_image(_download(url, policy), policy, pixels_left)
    raise MediaError(
        f"unsupported image URL scheme {scheme or url[:16]!r}: send a data: URI "
        "(data:image/png;base64,...) or an http(s) URL"
    )


def _data_uri_bytes(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("a data: URI needs a comma before its payload")
    meta = header[5:].split(";")
    media_type = meta[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"a data: URI of type {media_type!r} is not an image")
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise MediaError("an image data: URI must be base64-encoded (data:image/png;base64,...)")
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise MediaError(f"the image is larger than {max_bytes} bytes (--max-image-bytes)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the data: URI is not valid base64 ({exc})") from exc


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib's own handler also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise MediaError(f"the URL redirected to a non-http(s) URL ({newurl[:64]!r})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpRedirectsOnly)


def _download(url: str, policy: MediaPolicy) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "rerankd"})
    try:
        with _OPENER.open(request, timeout=policy.timeout) as response:
            kind = (response.headers.get_content_type() or "").lower()
            if kind not in ALLOWED_CONTENT_TYPES:
                raise MediaError(f"the URL answered with content type {kind!r}, not an image")
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise MediaError(
                    f"the image is larger than {policy.max_bytes} bytes (--max-image-bytes)"
                )
            data = response.read(policy.max_bytes + 1)
    except MediaError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MediaError(f"the image could not be fetched: {exc}") from exc
    if len(data) > policy.max_bytes:
        raise MediaError(f"the image is larger than {policy.max_bytes} bytes (--max-image-bytes)")
    return data


def decode_image(data: bytes, policy: MediaPolicy, pixels_left: int | None = None) -> Any:
    """Decode `data`, refusing an image whose header claims more than `max_pixels` (or more
    than `pixels_left`), or an aspect ratio above `max_aspect_ratio`, before its pixels are
    decoded, and a truncated or corrupt one."""
    from PIL import Image

    if len(data) > policy.max_bytes:
        raise MediaError(f"the image is larger than {policy.max_bytes} bytes (--max-image-bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise MediaError(f"the image has too many pixels ({exc})") from exc
    except Exception as exc:  # UnidentifiedImageError, or a corrupt header
        raise MediaError(
            f"the image could not be decoded (formats: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    width, height = image.size
    if width < 1 or height < 1 or width * height > policy.max_pixels:
        raise MediaError(
            f"the image is {width}x{height} pixels, more than {policy.max_pixels} "
            "(--max-image-pixels)"
        )
    if max(width, height) / min(width, height) > policy.max_aspect_ratio:
        raise MediaError(
            f"the image is {width}x{height} pixels: its aspect ratio "
            f"{max(width, height) / min(width, height):.0f} is above "
            f"{policy.max_aspect_ratio:g}, which the model's image processor refuses"
        )
    if pixels_left is not None and width * height > pixels_left:
        raise MediaError(
            f"the request's images together have more than {policy.max_request_pixels} pixels "
            "(--max-request-image-pixels); send fewer or smaller images per request"
        )
    try:
        image.load()  # reads every pixel: a truncated file fails here
    except Exception as exc:
        raise MediaError(f"the image could not be decoded: {exc}") from exc
    return image
