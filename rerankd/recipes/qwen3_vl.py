"""Qwen3-VL-Reranker (2B/8B): queries and documents of text and images, scored by yes − no.

Reproduces QwenLM/Qwen3-VL-Embedding's `src/models/qwen3_vl_reranker.py` token for token:

- messages: a system message (the Qwen3-Reranker judge sentence) and one user message whose
  parts are `<Instruct>: {instruction}`, `<Query>:`, the query's parts, `\\n<Document>:`, the
  document's parts (`format_mm_instruction` / `format_mm_content`). Within one side, images
  come first, then texts, joined with nothing between them; a side with neither is `NULL`.
  Rendered by Qwen3-VL's chat template with the generation prompt, that is
  `<|im_start|>system\\n{judge}<|im_end|>\\n<|im_start|>user\\n<Instruct>: {i}<Query>:{q}`
  `\\n<Document>:{d}<|im_end|>\\n<|im_start|>assistant\\n`, an image being
  `<|vision_start|><|image_pad|><|vision_end|>` with the pad repeated once per merged patch.
- images: `qwen_vl_utils.fetch_image` (RGBA over white, else RGB; `smart_resize` to multiples
  of 32 within [min_pixels, max_pixels], aspect ratio at most 200; `Image.resize`, bicubic),
  then the checkpoint's own image processor with `do_resize=False`.
- truncation (`truncate_tokens_optimized`): all but the last 5 tokens (the generation prompt)
  keep every special token (vision pads included) and their first `max_length` − #special
  other tokens; the last 5 are appended. The card's max_length is 10240, so a pair has at
  most 10245 tokens; `--max-model-len N` caps the whole pair at N.
- score: sigmoid(h_last · (W[yes] − W[no])), W the LM head.

Inputs, outputs and the request-level steps are recipes/vision.py's (`VisionRecipe`), shared
with jina-reranker-m0; this module is the prompt, the image conversion and the truncation.
"""

from __future__ import annotations

import math
from typing import Any

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import ScoreHead
from rerankd.recipes.media import MAX_ASPECT_RATIO
from rerankd.recipes.vision import IMAGE_PLACEHOLDER, EncodedVisionPair, VisionRecipe

__all__ = ["EncodedVisionPair", "Qwen3VLReranker", "smart_resize"]

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
#: tokens of SUFFIX (<|im_end|> \n <|im_start|> assistant \n), which truncation never cuts
SUFFIX_TOKENS = 5
DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
#: the official MAX_LENGTH: tokens before the 5-token generation prompt
CARD_MAX_LENGTH = 10240
#: qwen_vl_utils' resize factor for Qwen3-VL: image_patch_size 16 x spatial merge 2
IMAGE_FACTOR = 32
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR  # 4 merged patches
MAX_PIXELS = 1800 * IMAGE_FACTOR * IMAGE_FACTOR  # 1800 merged patches, the card's budget


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen_vl_utils' `smart_resize` with factor 32: (h, w) multiples of 32, pixels within
    [min_pixels, max_pixels], aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"its aspect ratio {max(height, width) / min(height, width):.0f} is above "
            f"{MAX_ASPECT_RATIO} ({width}x{height})"
        )
    f = IMAGE_FACTOR
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / f) * f
        w_bar = math.floor(width / beta / f) * f
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


class Qwen3VLReranker(VisionRecipe):
    name = "qwen3-vl-reranker"
    architectures = ("Qwen3VLForConditionalGeneration",)
    supports_instruction = True

    MIN_PIXELS, MAX_PIXELS = MIN_PIXELS, MAX_PIXELS  # the module's, as class attributes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`VisionRecipe`'s arguments; ValueError for a length that leaves no prompt."""
        super().__init__(*args, **kwargs)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.front_budget = self.max_length - SUFFIX_TOKENS
        if self.front_budget <= 0:
            raise ValueError(f"max length {self.max_length} leaves no room for the prompt")

    @property
    def head(self) -> ScoreHead:
        vocab = self.tokenizer.get_vocab()
        return ScoreHead(
            kind="lm_rows", positive_token_id=vocab["yes"], negative_token_id=vocab["no"]
        )

    def _max_length(self, max_model_len: int | None) -> int:
        text = getattr(self.config, "text_config", self.config)
        context = getattr(text, "max_position_embeddings", None) or CARD_MAX_LENGTH + SUFFIX_TOKENS
        limit = CARD_MAX_LENGTH + SUFFIX_TOKENS if max_model_len is None else max_model_len
        return min(limit, context)

    # --- encoding (the rest is VisionRecipe's) ----------------------------------------------

    def _side(self, item: Any, param: str, cache: dict) -> tuple[str, list]:
        """The rendered text of one side (images first, then texts, or NULL) and its images'
        (pixels, grid)."""
        texts, images = self._parts(item, param, cache)
        if not texts and not images:
            return "NULL", []
        return IMAGE_PLACEHOLDER * len(images) + "".join(texts), images

    def process_image(self, image: Any) -> tuple[Any, tuple[int, int, int]]:
        """fetch_image's conversion and resize, then the image processor (no resize)."""
        from PIL import Image

        if image.mode == "RGBA":
            white = Image.new("RGB", image.size, (255, 255, 255))
            white.paste(image, mask=image.split()[3])
            image = white
        else:
            image = image.convert("RGB")
        width, height = image.size
        h, w = smart_resize(height, width, self.min_pixels, self.max_pixels)
        image = image.resize((w, h))
        out = self.image_processor(images=[image], do_resize=False, return_tensors="np")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return out["pixel_values"], grid  # (patches, 1536) float32; (t, h, w)

    def _build(self, queries, documents, instruction) -> list[EncodedVisionPair]:
        instruct = instruction or DEFAULT_INSTRUCTION
        cache: dict = {}
        texts, images = [], []
        one_query = len({id(q) for q in queries}) == 1
        for index, (query, document) in enumerate(zip(queries, documents, strict=True)):
            q_param = "query" if one_query else f"queries[{index}]"
            q_text, q_images = self._side(query, q_param, cache)
            d_text, d_images = self._side(document, f"documents[{index}]", cache)
            pair_images = q_images + d_images
            body = f"<Instruct>: {instruct}<Query>:{q_text}\n<Document>:{d_text}"
            texts.append(self._expand(PREFIX + body + SUFFIX, pair_images))
            images.append(pair_images)
        pairs = []
        for index, ids in enumerate(self.encode_texts(texts)):
            kept = self._truncate(ids[:-SUFFIX_TOKENS]) + ids[-SUFFIX_TOKENS:]
            cut = len(ids) - len(kept)
            if cut:
                self._check_images_fit(kept, index)
                self._check_query_fits(texts[index], index)
            pairs.append(EncodedVisionPair(tuple(kept), None, cut, images=tuple(images[index])))
        return pairs

    def _truncate(self, ids: list[int]) -> list[int]:
        """truncate_tokens_optimized: every special token, and the first budget − #special
        others."""
        if len(ids) <= self.front_budget:
            return list(ids)
        special = self.special_ids
        keep = self.front_budget - sum(1 for t in ids if t in special)
        out, kept = [], 0
        for token in ids:
            if token in special:
                out.append(token)
            elif kept < keep:
                out.append(token)
                kept += 1
        return out

    def _check_images_fit(self, ids: list[int], index: int) -> None:
        """Special tokens (image placeholders among them) are never cut: when they alone
        fill the limit, no text is left, which is a 400, not a score."""
        special = sum(1 for t in ids if t in self.special_ids)
        if special >= self.front_budget:
            raise InvalidRequest(
                f"document {index}: its images and the query's take {special} tokens, more "
                f"than this model's limit of {self.max_length} tokens leaves room for; send "
                "fewer or smaller images, or serve with a lower --image-pixel-budget",
                param=f"documents[{index}]",
            )

    def _check_query_fits(self, text: str, index: int) -> None:
        """A cut that reaches into the prompt or the query (not just the document) is a 400."""
        head = text[: text.index("\n<Document>:") + len("\n<Document>:")]
        ids = self.encode_text(head)
        plain = sum(1 for t in ids if t not in self.special_ids)
        budget = self.front_budget - sum(1 for t in ids if t in self.special_ids)
        if plain >= budget:
            raise InvalidRequest(
                f"the query and instruction take about {len(ids) + SUFFIX_TOKENS} tokens with "
                f"the prompt template and the images, leaving no room for document {index} "
                f"within this model's limit of {self.max_length} tokens; shorten the query",
                param="query",
            )
