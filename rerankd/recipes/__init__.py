"""Scoring recipes and their detection from a checkpoint's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rerankd.errors import ModelLoadError
from rerankd.recipes.base import Recipe, ScoreHead, sigmoid
from rerankd.recipes.bge_gemma import BgeGemmaReranker
from rerankd.recipes.bge_layerwise import BgeLayerwiseReranker
from rerankd.recipes.bge_lightweight import BgeLightweightReranker
from rerankd.recipes.bi_encoder import (
    BiEncoder,
    checkpoint_dir,
    is_mean_pooling_bi_encoder,
    sentence_transformer_info,
)
from rerankd.recipes.colbert import ColbertReranker, colbert_info
from rerankd.recipes.cross_encoder import CrossEncoder
from rerankd.recipes.jina_m0 import JinaM0Reranker
from rerankd.recipes.jina_v3 import JinaV3Reranker
from rerankd.recipes.mxbai import MxbaiRerankV2, is_mxbai_v2_download
from rerankd.recipes.qwen3 import Qwen3Reranker, Qwen3SeqCls
from rerankd.recipes.qwen3_vl import Qwen3VLReranker
from rerankd.recipes.st_causal import StCausalReranker, st_causal_info

RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls
    for cls in (
        Qwen3Reranker,
        Qwen3SeqCls,
        BgeGemmaReranker,
        BgeLayerwiseReranker,
        BgeLightweightReranker,
        CrossEncoder,
        BiEncoder,
        MxbaiRerankV2,
        StCausalReranker,
        ColbertReranker,
        Qwen3VLReranker,
        JinaM0Reranker,
        JinaV3Reranker,
    )
}
#: recipes that read their checkpoint's own files besides config and tokenizer
_READS_MODEL_DIR = (BiEncoder, StCausalReranker, ColbertReranker)

__all__ = ["RECIPES", "Recipe", "ScoreHead", "build_recipe", "detect_recipe", "sigmoid"]


def detect_recipe(config: Any, model_dir: Path | str | None = None) -> type[Recipe]:
    """Pick the recipe from the checkpoint; no flags needed for known families.

    Order: a ColBERT checkpoint (PyLate's or stanford's files) is late interaction; a
    checkpoint that declares its own scoring in sentence-transformers files (a
    LogitScore cross-encoder) is served as it declares, whatever its architecture (a Qwen3
    LM with its own chat template must not get the Qwen3-Reranker prompt); then a hub
    download of mxbai-rerank v2; then `config.architectures`; then bi-encoder files.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    model_dir = model_dir if model_dir is not None else checkpoint_dir(config)
    if colbert_info(config, model_dir) is not None:
        return ColbertReranker
    if st_causal_info(model_dir) is not None:
        return StCausalReranker
    if "Qwen2ForCausalLM" in architectures and is_mxbai_v2_download(model_dir):
        return MxbaiRerankV2
    for arch in architectures:
        for recipe in RECIPES.values():
            if arch in recipe.architectures:
                return recipe
    for arch in architectures:
        if arch.endswith("ForSequenceClassification") and getattr(config, "num_labels", 1) == 1:
            return CrossEncoder
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
        "(qwen3-reranker), Qwen3VLForConditionalGeneration (qwen3-vl-reranker), "
        "JinaVLForRanking (jina-reranker-m0), "
        "Qwen3ForSequenceClassification (qwen3-seq-cls), GemmaForCausalLM "
        "(bge-gemma), LayerWiseMiniCPMForCausalLM (bge-layerwise), "
        "CostWiseGemmaForCausalLM (bge-lightweight), JinaForRanking "
        "(jina-reranker-v3), any one-label "
        "*ForSequenceClassification (cross-encoder), a "
        "sentence-transformers encoder with mean pooling (bi-encoder), a sentence-transformers "
        "causal-LM cross-encoder with a LogitScore module (st-causal-lm), a ColBERT "
        "checkpoint in PyLate's or stanford's layout (colbert). A Qwen2ForCausalLM "
        "mxbai-rerank v2 checkpoint in a local directory needs --recipe mxbai-rerank-v2 (its "
        "files are a plain Qwen2.5 LM's; only a hub download is recognized). Pass --recipe "
        f"with one of {', '.join(RECIPES)} to force one."
    )


def build_recipe(
    name: str | None,
    tokenizer: Any,
    config: Any,
    max_model_len: int | None,
    model_dir: Path | str | None = None,
    image_pixel_budget: int | None = None,
) -> Recipe:
    """Instantiate the named recipe, or the detected one when `name` is None/"auto";
    `image_pixel_budget`: the most pixels a multimodal recipe resizes an image to."""
    if name in (None, "", "auto"):
        cls = detect_recipe(config, model_dir)
    elif name in RECIPES:
        cls = RECIPES[name]
    else:
        raise ModelLoadError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if cls in (Qwen3VLReranker, JinaM0Reranker):  # read their image processor from the checkpoint
        model_dir = model_dir if model_dir is not None else checkpoint_dir(config)
        budget = {"max_pixels": image_pixel_budget} if image_pixel_budget else {}
        return cls(tokenizer, config, max_model_len, model_dir=model_dir, **budget)
    if cls in _READS_MODEL_DIR:  # reads its checkpoint's sentence-transformers files
        model_dir = model_dir if model_dir is not None else checkpoint_dir(config)
        return cls(tokenizer, config, max_model_len, model_dir=model_dir)
    return cls(tokenizer, config, max_model_len)
