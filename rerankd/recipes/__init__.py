"""Scoring recipes and their detection from a checkpoint's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rerankd.errors import ModelLoadError
from rerankd.recipes.base import Recipe, ScoreHead, sigmoid
from rerankd.recipes.bge_gemma import BgeGemmaReranker
from rerankd.recipes.bi_encoder import (
    BiEncoder,
    checkpoint_dir,
    is_mean_pooling_bi_encoder,
    sentence_transformer_info,
)
from rerankd.recipes.cross_encoder import CrossEncoder
from rerankd.recipes.qwen3 import Qwen3Reranker, Qwen3SeqCls

RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (Qwen3Reranker, Qwen3SeqCls, BgeGemmaReranker, CrossEncoder, BiEncoder)
}

__all__ = ["RECIPES", "Recipe", "ScoreHead", "build_recipe", "detect_recipe", "sigmoid"]


def detect_recipe(config: Any, model_dir: Path | str | None = None) -> type[Recipe]:
    """Pick the recipe from `config.architectures` (and, for bi-encoders, the
    sentence-transformers files in `model_dir`); no flags needed for known families."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        for recipe in RECIPES.values():
            if arch in recipe.architectures:
                return recipe
    for arch in architectures:
        if arch.endswith("ForSequenceClassification") and getattr(config, "num_labels", 1) == 1:
            return CrossEncoder
    model_dir = model_dir if model_dir is not None else checkpoint_dir(config)
    if is_mean_pooling_bi_encoder(config, model_dir):
        return BiEncoder
    why = ""
    try:
        sentence_transformer_info(model_dir)
    except ModelLoadError as exc:  # sentence-transformers files we cannot reproduce
        why = f" {exc.message}."
    raise ModelLoadError(
        f"no scoring recipe fits this checkpoint (architectures: {architectures or 'none'}, "
        f"num_labels: {getattr(config, 'num_labels', '?')}).{why} Supported: Qwen3ForCausalLM "
        "(qwen3-reranker), Qwen3ForSequenceClassification (qwen3-seq-cls), GemmaForCausalLM "
        "(bge-gemma), any one-label *ForSequenceClassification (cross-encoder), a "
        "sentence-transformers encoder with mean pooling (bi-encoder). Pass --recipe "
        f"with one of {', '.join(RECIPES)} to force one."
    )


def build_recipe(
    name: str | None,
    tokenizer: Any,
    config: Any,
    max_model_len: int | None,
    model_dir: Path | str | None = None,
) -> Recipe:
    """Instantiate the named recipe, or the detected one when `name` is None/"auto"."""
    if name in (None, "", "auto"):
        cls = detect_recipe(config, model_dir)
    elif name in RECIPES:
        cls = RECIPES[name]
    else:
        raise ModelLoadError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if cls is BiEncoder:  # reads its checkpoint's sentence-transformers files
        return cls(tokenizer, config, max_model_len, model_dir=model_dir)
    return cls(tokenizer, config, max_model_len)
