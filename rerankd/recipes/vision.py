"""What the Qwen2-VL-family recipes share (recipes/qwen3_vl.py, recipes/jina_m0.py): pairs
whose sides are strings or part tuples of texts and images, each image processed once per
call and expanded into one `<|image_pad|>` per merged patch, and the request-level steps
around a recipe's own prompt (`_build`): query and document precuts, document caps, fitting.

Inputs: a query or a document is a string, or a tuple of parts `("text", str)` /
`("image", image)` where image is a decoded PIL image, or a `DecodedImage` holding one (the
service decodes `data:` URIs and URLs with recipes/media.py before calling `encode`). Pairs
come back as `EncodedVisionPair`, whose `images` hold each image's pixel patches and grid for
the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import Recipe
from rerankd.recipes.media import DecodedImage
from rerankd.types import EncodedPair

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
#: strings that would make a text part claim vision tokens the request has no image for
VISION_MARKUP = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True, eq=False)
class EncodedVisionPair(EncodedPair):
    """A pair whose ids hold image placeholders: `images[k]` = (pixel patches, a float32
    array (patches, 3·2·16·16), and the grid (t, h, w) in patches) of the k-th image."""

    images: tuple[tuple[Any, tuple[int, int, int]], ...] = ()


def split_parts(item: Any) -> tuple[list[str], list[Any]]:
    """(texts, images) of one query or document, in their order within each kind."""
    if isinstance(item, str):
        return [item], []
    texts = [value for kind, value in item if kind == "text"]
    images = [
        value.image if isinstance(value, DecodedImage) else value
        for kind, value in item
        if kind == "image"
    ]
    return texts, images


class VisionRecipe(Recipe):
    """A recipe over text-and-image pairs. A subclass names its official pixel bounds and
    writes `_build` (its prompt, tokenization and cut) and `process_image` (its official
    image conversion)."""

    #: queries and documents may hold images (the service refuses them for other recipes)
    supports_images = True
    #: the official pixel bounds of an image (`max_pixels`: `--image-pixel-budget`)
    MIN_PIXELS: ClassVar[int]
    MAX_PIXELS: ClassVar[int]
    #: the checkpoint's image processor resizes within the bounds (jina-reranker-m0), rather
    #: than the recipe before it (Qwen3-VL's qwen_vl_utils)
    processor_resizes: ClassVar[bool] = False

    def __init__(
        self,
        tokenizer,
        config,
        max_model_len: int | None = None,
        model_dir: Path | str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        image_processor: Any = None,
    ) -> None:
        super().__init__(tokenizer, config, max_model_len)
        self.min_pixels = self.MIN_PIXELS if min_pixels is None else min_pixels
        self.max_pixels = max(self.min_pixels, max_pixels or self.MAX_PIXELS)
        if image_processor is None:
            from transformers import AutoImageProcessor

            bounds = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
            options = bounds if self.processor_resizes else {}
            image_processor = AutoImageProcessor.from_pretrained(model_dir, **options)
        self.image_processor = image_processor
        #: merged patches per `<|image_pad|>`
        self.merge = int(image_processor.merge_size) ** 2

    def warm_up_documents(self) -> list[Any]:
        """Two small image documents (a grey 64x64 image, with and without a caption), for
        the start-up warm-up to run the vision tower (and a shared-prefix path) once."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (128, 128, 128))
        return [(("image", image),), (("image", image), ("text", "warm-up document"))]

    def encode(
        self,
        queries: Sequence[Any],
        documents: Sequence[Any],
        instruction: str | None = None,
        truncate: bool = True,
        *,
        side: str = "right",
        max_document_tokens: int | None = None,
    ) -> list[EncodedPair]:
        """Aligned pairs of strings or part tuples (see the module docstring)."""
        if len(queries) != len(documents):
            raise ValueError("queries and documents must be aligned; this is a bug")
        if side != "right":
            raise InvalidRequest(
                "this model's truncation cuts a document's end, as its official code does; "
                "keeping the end (truncation_side left) is not supported",
                param="truncation_side",
            )
        if not documents:
            return []
        cut_queries: dict[int, Any] = {}  # a request's one query: cut once, one object
        for query in queries:
            if id(query) not in cut_queries:
                cut_queries[id(query)] = self._precut(query)
        queries = [cut_queries[id(q)] for q in queries]
        documents = [self._precut(d) for d in documents]
        capped = [0] * len(documents)
        if max_document_tokens is not None:
            documents, capped = self._cap(documents, max_document_tokens)
        pairs = self._build(queries, documents, instruction)
        if not truncate:
            self.check_fits(pairs)
        return [
            EncodedVisionPair(p.input_ids, None, p.cut_tokens + cut, images=p.images) if cut else p
            for p, cut in zip(pairs, capped, strict=True)
        ]

    def _encode_pairs(self, queries, documents, instruction, side: str = "right"):
        """Text pairs exactly as the official code tokenizes them (chunking's entry)."""
        return self._build(queries, documents, instruction)

    def _precut(self, item: Any) -> Any:
        if isinstance(item, str):
            return self.precut(item, "right")
        return tuple((k, self.precut(v, "right") if k == "text" else v) for k, v in item)

    def _cap(self, documents: list[Any], limit: int) -> tuple[list[Any], list[int]]:
        """Each document's text parts cut to `limit` tokens each (images are never cut)."""
        out, cuts = [], []
        for document in documents:
            parts = (("text", document),) if isinstance(document, str) else document
            capped, total = [], 0
            for kind, value in parts:
                if kind == "text":
                    texts, cut = self.cap_texts([value], limit, "right")
                    value, total = texts[0], total + cut[0]
                capped.append((kind, value))
            out.append(capped[0][1] if isinstance(document, str) else tuple(capped))
            cuts.append(total)
        return out, cuts

    def _parts(self, item: Any, param: str, cache: dict) -> tuple[list[str], list[Any]]:
        """(texts, processed images) of one side; each image processed once per call
        (`cache`, by identity). Text claiming vision tokens, or an image that cannot be
        processed, is a 400 naming `param`."""
        texts, images = split_parts(item)
        for text in texts:
            if any(mark in text for mark in VISION_MARKUP):
                raise InvalidRequest(
                    f"{param} holds vision markup ({', '.join(VISION_MARKUP)}) in its text; "
                    "send images as image parts",
                    param=param,
                )
        processed = []
        for image in images:
            key = id(image)
            if key not in cache:
                try:
                    cache[key] = (image, self.process_image(image))
                except InvalidRequest:
                    raise
                except Exception as exc:
                    raise InvalidRequest(
                        f"{param}: the image cannot be used: {exc}", param=param
                    ) from exc
            processed.append(cache[key][1])
        return texts, processed

    def _expand(self, text: str, images: list) -> str:
        """The processor's placeholder expansion: each `<|image_pad|>` repeated once per
        merged patch of its image."""
        if not images:
            return text
        pieces = text.split("<|image_pad|>")
        out = [pieces[0]]
        for (_, (t, h, w)), piece in zip(images, pieces[1:], strict=True):
            out.append("<|image_pad|>" * (t * h * w // self.merge) + piece)
        return "".join(out)
