"""jina-reranker-m0's own scorer, transcribed, on transformers' Qwen2-VL classes.

Source: the checkpoint's `modeling.py` (huggingface.co/jinaai/jina-reranker-m0, the version
that runs on transformers 5; read through the code search, and vLLM's
`tests/models/multimodal/pooling/test_jinavl_reranker.py`, which carries the same file):
`formatting_prompts_func` (`**Document**:\\n{doc}\\n**Query**:\\n{query}`, an image side being
`<|vision_start|><|image_pad|><|vision_end|>`), `load_images` (transformers' `load_image`),
`JinaVLForRanking` (Qwen2VLForConditionalGeneration with an Identity lm_head, the score MLP
`Linear(h, h) -> ReLU -> Linear(h, 1)` on the last position of the last hidden state, then
`sigmoid(logit - 2.65)`) and `compute_score` (documents cut to `max_doc_length` tokens and
decoded back to text, the processor with padding (left), truncation to `max_length - 1`, then
`score_token_id` 100 appended to every row).

Transcribed, not imported: the file is the checkpoint's own code. One substitution, with the
same transformers code the official path reaches: `AutoProcessor.from_pretrained` needs the
torchvision-only video processor, so the processor's steps are done here as
`Qwen2VLProcessor.__call__` does them (the image processor with the official min/max pixels,
each `<|image_pad|>` repeated grid.prod() // merge_size² times in order, the tokenizer with
padding, truncation and `max_length`, and `mm_token_type_ids` from the image tokens).
The checkpoint's legacy weight names are mapped as vLLM's test maps them (`visual.` ->
`model.visual.`, `model.` -> `model.language_model.`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

LOGIT_BIAS = 2.65
MIN_PIXELS = 3136
MAX_PIXELS = 602112


def load_images(images):
    from PIL import Image
    from transformers.image_utils import load_image

    pil_max_px = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    batch = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
    Image.MAX_IMAGE_PIXELS = pil_max_px
    return batch


def formatting_prompts_func(query, doc, query_type: str = "text", doc_type: str = "text"):
    if query_type == "image":
        query_part = "**Query**:\n<|vision_start|><|image_pad|><|vision_end|>"
    else:
        query_part = f"**Query**:\n{query}"
    if doc_type == "image":
        doc_part = "**Document**:\n<|vision_start|><|image_pad|><|vision_end|>"
    else:
        doc_part = f"**Document**:\n{doc}"
    return doc_part + "\n" + query_part


def _jina_vl_for_ranking():
    from transformers import Qwen2VLForConditionalGeneration

    class JinaVLForRanking(Qwen2VLForConditionalGeneration):
        def __init__(self, config):
            config.tie_word_embeddings = False  # the Identity lm_head must not be tied
            super().__init__(config)
            self.padding_side = "left"
            self.num_labels = 1
            self.lm_head = nn.Identity()
            hidden_size = config.text_config.hidden_size
            self.score = nn.Sequential(
                nn.Linear(hidden_size, hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, self.num_labels),
            )
            self.score_token_id = 100

        def forward(self, **kwargs):
            kwargs.pop("output_hidden_states", None)
            kwargs.pop("use_cache", None)
            outputs = super().forward(**kwargs, use_cache=False, output_hidden_states=True)
            hidden_states = outputs.hidden_states[-1]
            # the padding is on the left: the last position is every row's score token
            return self.score(hidden_states[:, -1]).squeeze(-1)  # the logit, before the bias

    return JinaVLForRanking


def _legacy_to_current(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(
        ("model.language_model.", "model.visual.")
    ):
        return "model.language_model." + name.removeprefix("model.")
    return name


class ReferenceJinaM0:
    """`JinaVLForRanking.compute_score` on a local checkpoint, float32 by default; returns the
    logit − 2.65 per pair (`compute_score` returns its sigmoid)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        self.model = _jina_vl_for_ranking()(config)
        state = {
            _legacy_to_current(k): v for k, v in load_file(model_dir / "model.safetensors").items()
        }
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise RuntimeError(f"reference weights: missing {missing}, unexpected {unexpected}")
        self.model.to(dtype).eval()
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(
            model_dir, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS
        )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    # --- Qwen2VLProcessor.__call__'s steps ---------------------------------------------------

    def _process(self, text: list[str], images, max_length: int) -> dict:
        inputs: dict = {}
        if images is not None:
            out = self.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"] = out["pixel_values"]
            inputs["image_grid_thw"] = out["image_grid_thw"]
            merge = self.image_processor.merge_size**2
            grids = iter(out["image_grid_thw"])
            expanded = []
            for sample in text:
                pieces = sample.split("<|image_pad|>")
                sample = pieces[0]
                for piece in pieces[1:]:
                    sample += "<|image_pad|>" * int(next(grids).prod() // merge) + piece
                expanded.append(sample)
            text = expanded
        encoded = self.tokenizer(
            text, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        inputs["input_ids"] = encoded["input_ids"]
        inputs["attention_mask"] = encoded["attention_mask"]
        inputs["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).int()
        return inputs

    # --- compute_score -----------------------------------------------------------------------

    def batch_inputs(
        self,
        pairs,
        max_length: int = 10240,
        max_query_length: int = 512,
        max_doc_length: int | None = None,
        query_type: str = "text",
        doc_type: str = "text",
    ) -> dict:
        if max_doc_length is None:
            max_doc_length = max(max_length - max_query_length, max_query_length)
        if max_doc_length < max_query_length:
            warnings.warn("max_doc_length should be greater than max_query_length", stacklevel=2)
        assert max_doc_length + max_query_length <= max_length
        max_length = max_length - 1
        batch_inputs = []
        for q, d in pairs:
            if doc_type == "text":
                tokens = self.tokenizer(d, truncation=True, max_length=max_doc_length)
                if len(tokens["input_ids"]) >= max_doc_length:
                    d = self.tokenizer.decode(tokens["input_ids"])
            batch_inputs.append(formatting_prompts_func(q, d, query_type, doc_type))
        batch_images = None
        doc_images = load_images([d for (q, d) in pairs]) if doc_type == "image" else []
        query_images = load_images([q for (q, d) in pairs]) if query_type == "image" else []
        if len(doc_images) == len(query_images) and len(doc_images) > 0:
            batch_images = [[d, q] for q, d in zip(query_images, doc_images, strict=True)]
        elif len(doc_images) > 0:
            batch_images = doc_images
        elif len(query_images) > 0:
            batch_images = query_images
        batch = self._process(batch_inputs, batch_images, max_length)
        size = batch["input_ids"].size(0)
        batch["input_ids"] = torch.cat(
            [batch["input_ids"], torch.full((size, 1), self.model.score_token_id)], dim=1
        )
        batch["attention_mask"] = torch.cat(
            [batch["attention_mask"], torch.ones((size, 1), dtype=torch.long)], dim=1
        )
        batch["mm_token_type_ids"] = torch.cat(
            [batch["mm_token_type_ids"], torch.zeros((size, 1), dtype=torch.int)], dim=1
        )
        return batch

    @torch.no_grad()
    def compute_score(self, pairs, batch_size: int = 8, **kwargs) -> list[float]:
        """Raw scores (logit − LOGIT_BIAS) of (query, document) pairs, `compute_score`'s
        batching; the official value is `sigmoid` of each."""
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            batch = self.batch_inputs(pairs[start : start + batch_size], **kwargs)
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
            logits = self.model(**batch).view(-1).float().numpy()
            scores.extend((logits - LOGIT_BIAS).tolist())
        return scores

    def token_ids(self, pair, **kwargs) -> list[int]:
        """The ids of one pair, padding removed."""
        batch = self.batch_inputs([pair], **kwargs)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        return ids.tolist()


def sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))
