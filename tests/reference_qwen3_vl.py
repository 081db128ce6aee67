"""The official Qwen3-VL-Reranker scorer, transcribed, on transformers' Qwen3-VL classes.

Source: QwenLM/Qwen3-VL-Embedding, `src/models/qwen3_vl_reranker.py` (commit 8ce3aab):
`Qwen3VLReranker.format_mm_instruction` / `format_mm_content` (the messages),
`tokenize` (chat template, processor, `truncate_tokens_optimized`, the last 5 tokens kept)
and `compute_scores` (the last hidden state of `Qwen3VLForConditionalGeneration.model`
through a one-row linear = lm_head[yes] − lm_head[no], then a sigmoid). Images go through
`qwen_vl_utils.fetch_image` (qwen-vl-utils 0.0.14, `vision_process.py`: `to_rgb`,
`smart_resize` with factor 32 and the reranker's min/max pixels, `Image.resize`) before
the processor, which then runs with `do_resize=False`.

Transcribed, not imported: the module imports qwen_vl_utils and scipy at the top and loads
the checkpoint with `trust_remote_code=True`. Two substitutions, both with the same
transformers code the official path reaches: `AutoProcessor.from_pretrained` needs the
torchvision-only video processor, so the processor's image step is done here as
`Qwen3VLProcessor.__call__` does it (image processor, then each `<|image_pad|>` repeated
grid.prod() // merge_size² times, then the tokenizer); and the model gets the
`mm_token_type_ids` that processor returns (transformers 5 computes M-RoPE from them).
One pair at a time, as `process` runs them. Videos are not reproduced.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
MAX_LENGTH = 10240
IMAGE_FACTOR = 32
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_PIXELS = 1800 * IMAGE_FACTOR * IMAGE_FACTOR


# --- qwen_vl_utils.vision_process ------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    if max(height, width) / min(height, width) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fetch_image(image, min_pixels: int, max_pixels: int):
    from PIL import Image

    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        image = white
    else:
        image = image.convert("RGB")
    width, height = image.size
    h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    return image.resize((w, h))


# --- Qwen3VLReranker ---------------------------------------------------------------------------


def format_mm_content(text, image, prefix: str, min_pixels: int, max_pixels: int) -> list[dict]:
    content = [{"type": "text", "text": prefix}]
    texts = [] if text is None else [text] if isinstance(text, str) else list(text)
    images = [] if image is None else list(image) if isinstance(image, list) else [image]
    if not texts and not images:
        content.append({"type": "text", "text": "NULL"})
        return content
    for img in images:
        content.append(
            {"type": "image", "image": img, "min_pixels": min_pixels, "max_pixels": max_pixels}
        )
    for txt in texts:
        content.append({"type": "text", "text": txt})
    return content


def format_mm_instruction(query: dict, document: dict, instruction, min_pixels, max_pixels):
    contents = [{"type": "text", "text": "<Instruct>: " + (instruction or DEFAULT_INSTRUCTION)}]
    contents += format_mm_content(
        query.get("text"), query.get("image"), "<Query>:", min_pixels, max_pixels
    )
    contents += format_mm_content(
        document.get("text"), document.get("image"), "\n<Document>:", min_pixels, max_pixels
    )
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": contents},
    ]


def truncate_tokens_optimized(tokens: list[int], max_length: int, special: list[int]) -> list[int]:
    if len(tokens) <= max_length:
        return tokens
    special_set = set(special)
    keep = max_length - sum(1 for t in tokens if t in special_set)
    final, kept = [], 0
    for token in tokens:
        if token in special_set:
            final.append(token)
        elif kept < keep:
            final.append(token)
            kept += 1
    return final


class ReferenceQwen3VLReranker:
    """`Qwen3VLReranker` on a local checkpoint, float32 by default; `process` as the original
    (query and documents as {"text", "image"} dicts, images as PIL images), returning
    (raw, activated) per document."""

    def __init__(
        self,
        model_dir: Path,
        max_length: int = MAX_LENGTH,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            Qwen3VLForConditionalGeneration,
        )

        lm = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.model = lm.model
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.max_length, self.min_pixels, self.max_pixels = max_length, min_pixels, max_pixels
        vocab = self.tokenizer.get_vocab()
        weight = lm.lm_head.weight.data
        self.score_weight = (weight[vocab["yes"]] - weight[vocab["no"]]).to(dtype)

    def tokenize(self, pair: list[dict]) -> dict:
        text = self.tokenizer.apply_chat_template(pair, tokenize=False, add_generation_prompt=True)
        images = [
            fetch_image(part["image"], part["min_pixels"], part["max_pixels"])
            for message in pair
            for part in message["content"]
            if part.get("type") == "image"
        ]
        inputs: dict = {}
        if images:
            out = self.image_processor(images=images, do_resize=False)
            inputs["pixel_values"] = torch.as_tensor(out["pixel_values"])
            inputs["image_grid_thw"] = torch.as_tensor(out["image_grid_thw"])
            merge = self.image_processor.merge_size**2
            pieces = text.split("<|image_pad|>")
            text = pieces[0]
            for grid, piece in zip(inputs["image_grid_thw"], pieces[1:], strict=True):
                text += "<|image_pad|>" * int(grid.prod() // merge) + piece
        ids = self.tokenizer(text)["input_ids"]
        special = self.tokenizer.all_special_ids
        ids = truncate_tokens_optimized(ids[:-5], self.max_length, special) + ids[-5:]
        image_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs["input_ids"] = torch.tensor([ids])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if images:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).int()
        return inputs

    @torch.no_grad()
    def process(self, query: dict, documents: list[dict], instruction: str | None = None):
        scores = []
        for document in documents:
            pair = format_mm_instruction(
                query, document, instruction, self.min_pixels, self.max_pixels
            )
            inputs = self.tokenize(pair)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.score_weight.dtype)
            hidden = self.model(**inputs).last_hidden_state[:, -1]
            raw = float((hidden @ self.score_weight).float()[0])
            scores.append((raw, 1.0 / (1.0 + math.exp(-raw))))
        return scores

    def token_ids(self, query: dict, document: dict, instruction: str | None = None) -> list[int]:
        pair = format_mm_instruction(query, document, instruction, self.min_pixels, self.max_pixels)
        return self.tokenize(pair)["input_ids"][0].tolist()
