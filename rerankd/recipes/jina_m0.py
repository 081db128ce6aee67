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

from typing import Any

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import ScoreHead
from rerankd.recipes.vision import IMAGE_PLACEHOLDER, EncodedVisionPair, VisionRecipe

#: the official compute_score's max_length (query + document + score token)
CARD_MAX_LENGTH = 10240
#: compute_score's max_query_length: only used to derive max_doc_length
MAX_QUERY_LENGTH = 512
#: JinaVLForRanking.score_token_id, appended to every pair
SCORE_TOKEN_ID = 100
#: subtracted from the MLP's logit before the sigmoid (modeling.py's LOGIT_BIAS)
LOGIT_BIAS = 2.65
#: compute_score's processor: min 4 and max 768 merged 28x28 patches
MIN_PIXELS = 3136
MAX_PIXELS = 602112


class JinaM0Reranker(VisionRecipe):
    name = "jina-reranker-m0"
    architectures = ("JinaVLForRanking",)
    supports_instruction = False
    #: added to the head's logit by the engine: raw = logit − LOGIT_BIAS
    score_offset = -LOGIT_BIAS

    MIN_PIXELS, MAX_PIXELS = MIN_PIXELS, MAX_PIXELS  # the module's, as class attributes
    processor_resizes = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`VisionRecipe`'s arguments; ValueError for a length the official code refuses."""
        super().__init__(*args, **kwargs)
        self.max_doc_length = max(self.max_length - MAX_QUERY_LENGTH, MAX_QUERY_LENGTH)
        if self.max_doc_length + MAX_QUERY_LENGTH > self.max_length:
            raise ValueError(
                f"max length {self.max_length} is below {2 * MAX_QUERY_LENGTH}, the least "
                "jina-reranker-m0's official code accepts (512 query + 512 document tokens)"
            )
        if len(self.tokenizer.get_vocab()) <= SCORE_TOKEN_ID:
            raise ValueError("the tokenizer has no score token (id 100); this is a bug")

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="classifier")

    def _max_length(self, max_model_len: int | None) -> int:
        text = getattr(self.config, "text_config", self.config)
        context = getattr(text, "max_position_embeddings", None) or CARD_MAX_LENGTH
        limit = CARD_MAX_LENGTH if max_model_len is None else max_model_len
        return min(limit, context)

    # --- encoding (the rest is VisionRecipe's) ----------------------------------------------

    def _side(self, item: Any, param: str, cache: dict) -> tuple[str, list[str], list]:
        """(placeholders, texts, processed images) of one side."""
        texts, images = self._parts(item, param, cache)
        return IMAGE_PLACEHOLDER * len(images), texts, images

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

    def _build(self, queries, documents, instruction=None) -> list[EncodedVisionPair]:
        """The official prompts, tokenized whole with the score token appended; the
        checkpoint takes no instruction (`instruction` is ignored)."""
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
