"""jina-reranker-m0: queries and documents of text and images, scored by the checkpoint's MLP.

Reproduces the checkpoint's own `modeling.py` (`JinaVLForRanking.compute_score`) token for
token, without running it:

- prompt: `**Document**:\\n{doc}\\n**Query**:\\n{query}` (`formatting_prompts_func`), an image
  side being `<|vision_start|><|image_pad|><|vision_end|>` with the pad repeated once per
  merged patch (Qwen2VLProcessor's expansion); the document comes first.
- truncation: a text document longer than `max_doc_length` tokens (max_length − 512, at least
  512; 9728 at the card's max_length 10240) is cut to that many tokens and decoded back to
  text, then the pair is tokenized whole (no special tokens: Qwen2's tokenizer adds none) and
  the score token (id 100, `score_token_id`) appended, so a pair has at most max_length
  tokens. Where the official code would then cut the pair's end (that is, the query: a query
  longer than ~512 tokens, or images that fill the limit), this recipe refuses with a 400
  instead, as rerankd never cuts a query.
- images: transformers' `load_image` conversion (EXIF orientation applied, then RGB), then the
  checkpoint's image processor with the official `min_pixels` 3136 and `max_pixels` 602112
  (768 merged 28x28 patches; `--image-pixel-budget` overrides the latter).
- score: the MLP `Linear(h, h) -> ReLU -> Linear(h, 1)` on the last position's final hidden
  state (the score token); raw = that logit − 2.65 (`LOGIT_BIAS`, as vLLM's raw score), and
  the activation sigmoid(raw) is the official `compute_score` value.

Sides with both text and images: the official code has one kind per side (`query_type`,
`doc_type`); Jina's `{"text", "image"}` document is rendered here as its image placeholders
followed by its texts, joined with nothing (Qwen3-VL-Reranker's rule). A side with neither is
the empty string, as `formatting_prompts_func` renders "". An image query with an image
document passes its images in prompt order, the document's first (the official
`[[d, q]]`).

Shared prefix: the document comes before the query, so pairs of one request share only
`**Document**:\\n` (4 tokens): the query runs once per document, and the engine's shared-prefix
path (which needs 16 common tokens) does not apply. That is the model's layout, not a choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import Recipe, ScoreHead
from rerankd.recipes.qwen3_vl import EncodedVisionPair, split_parts
from rerankd.types import EncodedPair

#: the official compute_score's max_length (query + document + score token)
CARD_MAX_LENGTH = 10240
#: compute_score's max_query_length: only used to derive max_doc_length
MAX_QUERY_LENGTH = 512
#: JinaVLForRanking.score_token_id, appended to every pair
SCORE_TOKEN_ID = 100
#: subtracted from the MLP's logit before the sigmoid (modeling.py's LOGIT_BIAS)
LOGIT_BIAS = 2.65
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
#: compute_score's processor: min 4 and max 768 merged 28x28 patches
MIN_PIXELS = 3136
MAX_PIXELS = 602112
#: strings that would make a text part claim vision tokens the request has no image for
_VISION_MARKUP = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class JinaM0Reranker(Recipe):
    name = "jina-reranker-m0"
    architectures = ("JinaVLForRanking",)
    supports_instruction = False
    #: queries and documents may hold images (the service refuses them for other recipes)
    supports_images = True
    #: added to the head's logit by the engine: raw = logit − LOGIT_BIAS
    score_offset = -LOGIT_BIAS

    def __init__(
        self,
        tokenizer,
        config,
        max_model_len: int | None = None,
        model_dir: Path | str | None = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        image_processor: Any = None,
    ) -> None:
        super().__init__(tokenizer, config, max_model_len)
        max_pixels = max(min_pixels, max_pixels)
        if image_processor is None:
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(
                model_dir, min_pixels=min_pixels, max_pixels=max_pixels
            )
        self.image_processor = image_processor
        self.merge = int(image_processor.merge_size) ** 2
        self.max_doc_length = max(self.max_length - MAX_QUERY_LENGTH, MAX_QUERY_LENGTH)
        if self.max_doc_length + MAX_QUERY_LENGTH > self.max_length:
            raise ValueError(
                f"max length {self.max_length} is below {2 * MAX_QUERY_LENGTH}, the least "
                "jina-reranker-m0's official code accepts (512 query + 512 document tokens)"
            )
        vocab = tokenizer.get_vocab()
        if len(vocab) <= SCORE_TOKEN_ID:
            raise ValueError("the tokenizer has no score token (id 100); this is a bug")

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="classifier")

    def _max_length(self, max_model_len: int | None) -> int:
        text = getattr(self.config, "text_config", self.config)
        context = getattr(text, "max_position_embeddings", None) or CARD_MAX_LENGTH
        limit = CARD_MAX_LENGTH if max_model_len is None else max_model_len
        return min(limit, context)

    def warm_up_documents(self) -> list[Any]:
        """Two small image documents (a grey 64x64 image, with and without a caption), for the
        start-up warm-up to run the vision tower once."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (128, 128, 128))
        return [(("image", image),), (("image", image), ("text", "warm-up document"))]

    # --- encoding ---------------------------------------------------------------------------

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
        """Aligned pairs of strings or part tuples (see recipes/qwen3_vl.py's docstring)."""
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
        pairs = self._build(queries, documents)
        if not truncate:
            self.check_fits(pairs)
        return [
            EncodedVisionPair(p.input_ids, None, p.cut_tokens + cut, images=p.images) if cut else p
            for p, cut in zip(pairs, capped, strict=True)
        ]

    def _encode_pairs(self, queries, documents, instruction, side: str = "right"):
        """Text pairs exactly as the official code tokenizes them (chunking's entry)."""
        return self._build(queries, documents)

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

    def _side(self, item: Any, param: str, cache: dict) -> tuple[str, list[Any], list]:
        """(placeholders, texts, processed images) of one side; each image processed once
        per call (`cache`, by identity)."""
        texts, images = split_parts(item)
        for text in texts:
            if any(mark in text for mark in _VISION_MARKUP):
                raise InvalidRequest(
                    f"{param} holds vision markup ({', '.join(_VISION_MARKUP)}) in its text; "
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
        return IMAGE_PLACEHOLDER * len(images), texts, processed

    def process_image(self, image: Any) -> tuple[Any, tuple[int, int, int]]:
        """transformers' `load_image` conversion (EXIF orientation, RGB), then the image
        processor (smart_resize to multiples of 28 within [min_pixels, max_pixels])."""
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image).convert("RGB")
        out = self.image_processor(images=[image], return_tensors="np")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return out["pixel_values"], grid  # (patches, 3·2·14·14) float32; (t, h, w)

    def _cut_document(self, text: str) -> tuple[str, int]:
        """compute_score's document cut: more than `max_doc_length` tokens → the first
        `max_doc_length`, decoded back to text; and how many tokens were dropped."""
        ids = self.encode_text(text)
        if len(ids) < self.max_doc_length:
            return text, 0
        return self.tokenizer.decode(ids[: self.max_doc_length]), len(ids) - self.max_doc_length

    def _build(self, queries, documents) -> list[EncodedVisionPair]:
        cache: dict = {}
        texts, images, cuts = [], [], []
        one_query = len({id(q) for q in queries}) == 1
        for index, (query, document) in enumerate(zip(queries, documents, strict=True)):
            q_param = "query" if one_query else f"queries[{index}]"
            q_marks, q_texts, q_images = self._side(query, q_param, cache)
            d_marks, d_texts, d_images = self._side(document, f"documents[{index}]", cache)
            d_text, cut = self._cut_document("".join(d_texts)) if d_texts else ("", 0)
            prompt = f"**Document**:\n{d_marks}{d_text}\n**Query**:\n{q_marks}{''.join(q_texts)}"
            pair_images = d_images + q_images  # prompt order: the document's first
            texts.append(self._expand(prompt, pair_images))
            images.append(pair_images)
            cuts.append(cut)
        pairs = []
        for index, ids in enumerate(self.encode_texts(texts)):
            if len(ids) + 1 > self.max_length:
                raise self._overflow(index, len(ids) + 1, bool(images[index]))
            pairs.append(
                EncodedVisionPair(
                    (*ids, SCORE_TOKEN_ID), None, cuts[index], images=tuple(images[index])
                )
            )
        return pairs

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

    def _overflow(self, index: int, tokens: int, has_images: bool) -> InvalidRequest:
        """A pair over the limit after its document's cut: the official code would cut the
        query's end (or split an image); rerankd refuses."""
        what = "the query and the images" if has_images else "the query"
        return InvalidRequest(
            f"document {index}: the pair takes {tokens} tokens after the document's cut to "
            f"{self.max_doc_length} tokens, more than this model's limit of {self.max_length}; "
            f"{what} leave too little room (this model's official code would cut the query); "
            "shorten the query, or send fewer or smaller images",
            param="query" if not has_images else f"documents[{index}]",
        )
