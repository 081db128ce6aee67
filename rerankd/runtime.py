"""Assemble a running service from Settings: resolve, load, warm up.

The only place that wires the layers together (loader → recipe → engine → scheduler →
service), so each of them stays constructible from plain values in tests.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rerankd.engine import Engine, resolve_device, resolve_dtype
from rerankd.engine.malloc import keep_freed_memory
from rerankd.engine.packed_engine import check_modes
from rerankd.errors import InvalidRequest, ModelLoadError
from rerankd.metrics import Metrics
from rerankd.models.loader import load_config_and_tokenizer, resolve_model_dir
from rerankd.recipes import Recipe, build_recipe
from rerankd.recipes.media import MediaPolicy
from rerankd.scheduler import Scheduler
from rerankd.service import (
    PROBE_DOCUMENT,
    PROBE_QUERY,
    Limits,
    RerankService,
    ServedModel,
    aliases_for,
)
from rerankd.settings import Settings
from rerankd.types import Batch

log = logging.getLogger(__name__)


def load_model(settings: Settings, metrics: Metrics) -> ServedModel:
    """Load the configured model; raises ModelLoadError with a user-facing message."""
    started = time.perf_counter()
    model_dir, config, recipe = load_recipe(settings)
    engine = load_engine(settings, model_dir, config, recipe)
    names = aliases_for(settings.model, settings.served_model_name)
    scheduler = Scheduler(
        engine, metrics, names[0], settings.max_batch_tokens, settings.max_queued_tokens
    )
    kernels = [f"{engine.attention} attention"] if hasattr(engine, "attention") else []
    kernels += ["compiled"] if getattr(engine, "compiled", False) else []

    def graphs_on() -> bool:  # read live: graphs turn off if a capture fails while serving
        return getattr(engine, "graphs", None) is not None

    kernels += ["CUDA graphs"] if graphs_on() else []
    log.info(
        "loaded %s (recipe %s, %s engine, %s, max %d tokens/pair) in %.1fs",
        settings.model,
        recipe.name,
        engine.name,
        ", ".join([engine.device, engine.dtype, *kernels]),
        recipe.max_length,
        time.perf_counter() - started,
    )
    return ServedModel(
        names[0],
        recipe,
        scheduler,
        names[1:],
        source=settings.model,
        attention=getattr(engine, "kernel", None),
        device=engine.device,
        dtype=engine.dtype,
        quantization=None if settings.quantize == "none" else settings.quantize,
        compiled=bool(getattr(engine, "compiled", False)),
        cuda_graphs=graphs_on,
    )


def load_recipe(settings: Settings) -> tuple[Path, Any, Recipe]:
    """The checkpoint directory, its config and its recipe (tokenizer included): all that
    tokenizing needs, without the weights (cheap: a Ray ingress replica loads just this)."""
    model_dir = resolve_model_dir(settings.model, settings.revision)
    config, tokenizer = load_config_and_tokenizer(model_dir)
    recipe = build_recipe(
        settings.recipe,
        tokenizer,
        config,
        settings.max_model_len,
        model_dir=model_dir,
        image_pixel_budget=settings.image_pixel_budget,
    )
    if settings.cutoff_layers is not None and hasattr(recipe, "set_default_layer"):
        try:  # a layerwise model's default layer; other models ignore the flag
            recipe.set_default_layer(settings.cutoff_layers)
        except InvalidRequest as exc:
            raise ModelLoadError(exc.message) from exc
    compression = settings.compress_ratio is not None or settings.compress_layers
    if compression and hasattr(recipe, "set_default_compression"):
        try:  # a token-compressing model's defaults; other models ignore the flags
            layers = [int(v) for item in settings.compress_layers for v in item.split(",") if v]
            recipe.set_default_compression(settings.compress_ratio, layers or None)
        except ValueError as exc:
            raise ModelLoadError(f"--compress-layers: {exc}") from exc
        except InvalidRequest as exc:
            raise ModelLoadError(exc.message) from exc
    return model_dir, config, recipe


def load_engine(settings: Settings, model_dir: Path, config: Any, recipe: Recipe) -> Engine:
    """The warmed-up engine of a model whose recipe `load_recipe` built."""
    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if device.type == "cpu":
        keep_freed_memory()  # activations are reused batch after batch, not re-faulted
    try:
        engine = build_engine(settings.engine, model_dir, config, recipe, device, dtype, settings)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the weights in {str(model_dir)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if settings.cuda_graphs == "on" and not hasattr(engine, "graphs"):
        # the packed engine says itself why it runs without; other engines have no graphs
        log.warning(
            "--cuda-graphs on: the %s engine has no CUDA graphs; running without", engine.name
        )
    if settings.fault_injection:
        from rerankd.engine.faults import FaultInjectingEngine, FaultPlan

        log.warning("fault injection on: %s (testing only)", settings.fault_injection)
        try:
            plan = FaultPlan.parse(settings.fault_injection, recipe.encode_text)
        except ValueError as exc:
            raise ModelLoadError(f"--fault-injection: {exc}") from exc
        engine = FaultInjectingEngine(engine, plan)
    warm_up(recipe, engine)
    return engine


def build_engine(kind: str, model_dir, config, recipe, device, dtype, settings: Settings):
    """`packed` (our model code), `transformers` (generic fallback) or `auto` (packed if we
    have code for the architecture, else transformers). Families with an engine of their own
    (bi-encoders, vision-language, listwise, late interaction) get it whatever `kind` says,
    or a clear error where `kind`/`--quantize` asks for something it cannot do."""
    from rerankd.engine.factory import UnsupportedCheckpoint, build_packed_engine
    from rerankd.engine.transformers_engine import TransformersEngine

    if kind not in ("auto", "packed", "transformers"):
        raise ModelLoadError(f"unknown engine {kind!r}; use auto, packed or transformers")
    try:
        check_modes(settings.quantize, settings.compile, settings.attention, settings.cuda_graphs)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if settings.quantize != "none" and kind == "transformers":
        raise ModelLoadError("--quantize needs the packed engine (--engine auto or packed)")
    if recipe.head.kind == "layers" and kind == "transformers":  # its heads are remote code
        raise ModelLoadError(
            f"the {recipe.name} recipe runs on the packed engine only (transformers would need "
            "the checkpoint's own code, which rerankd never runs); drop --engine transformers"
        )
    family = _family_engine(kind, model_dir, config, recipe, device, dtype, settings)
    if family is not None:
        return family
    if kind in ("auto", "packed"):
        try:
            return build_packed_engine(
                model_dir,
                config,
                recipe.head,
                device,
                dtype,
                settings.quantize,
                settings.compile,
                settings.attention,
                settings.cuda_graphs,
            )
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        except UnsupportedCheckpoint as exc:
            if kind == "packed" or settings.quantize != "none":
                raise ModelLoadError(f"--engine packed cannot serve this model: {exc}") from exc
            log.info("packed engine unavailable (%s); using the transformers engine", exc)
    return TransformersEngine(model_dir, recipe.head, device, dtype, settings.max_batch_tokens)


def _family_engine(kind: str, model_dir, config, recipe, device, dtype, settings: Settings):
    """The engine of a family that has its own (None for plain cross-encoders/decoders)."""
    quantized = settings.quantize != "none"
    if recipe.head.kind == "cosine":  # bi-encoders: each sequence embedded on its own
        from rerankd.engine.embedding_engine import EmbeddingEngine

        if kind == "packed" or quantized:
            raise ModelLoadError(
                "the bi-encoder recipe runs on its embedding engine only; drop --engine packed "
                "and --quantize"
            )
        return EmbeddingEngine(model_dir, device, dtype, settings.max_batch_tokens)
    if getattr(recipe, "supports_images", False):  # text and images: transformers' VL model
        from rerankd.engine.multimodal_engine import VisionLanguageEngine

        if kind == "packed" or quantized:
            raise ModelLoadError(
                f"the {recipe.name} recipe runs on the vision-language engine (transformers' "
                "model, padded) only; drop --engine packed and --quantize"
            )
        offset = getattr(recipe, "score_offset", 0.0)
        return VisionLanguageEngine(
            model_dir, recipe.head, device, dtype, settings.max_batch_tokens, score_offset=offset
        )
    if recipe.head.kind == "listwise":  # jina-reranker-v3: documents ranked in window prompts
        from rerankd.engine.listwise import ListwiseEngine

        if kind == "transformers" or quantized:
            raise ModelLoadError(
                f"the {recipe.name} recipe runs on its listwise engine (our Qwen3 decoder) "
                "only; drop --engine transformers and --quantize"
            )
        return ListwiseEngine(
            model_dir, config, device, dtype, settings.max_batch_tokens, compile=settings.compile
        )
    if recipe.head.kind == "maxsim":  # late interaction: per-token embeddings, MaxSim
        from rerankd.engine.late_interaction import LateInteractionEngine

        if quantized:
            raise ModelLoadError("the colbert recipe's late-interaction engine has no --quantize")
        return LateInteractionEngine(
            model_dir,
            config,
            device,
            dtype,
            settings.max_batch_tokens,
            dense_dirs=recipe.dense_dirs,
            skiplist_ids=recipe.skiplist_ids,
            backbone=kind,
        )
    return None


def warm_up(recipe, engine) -> None:
    """Run one tiny batch so the first request does not pay for lazy initialization."""
    pairs = recipe.encode([PROBE_QUERY], [PROBE_DOCUMENT])
    engine.score(Batch(pairs))
    if getattr(recipe, "supports_images", False):  # the vision tower too
        engine.score(Batch(recipe.encode([PROBE_QUERY] * 2, recipe.warm_up_documents())))


def limits_of(settings: Settings) -> Limits:
    return Limits(
        max_documents=settings.max_documents,
        max_query_tokens=settings.max_query_tokens,
        max_concurrent_requests=settings.max_concurrent_requests,
        request_timeout=settings.request_timeout,
        max_queued_tokens=settings.max_queued_tokens,
        media=MediaPolicy(
            allow_remote=settings.allow_remote_media,
            timeout=settings.media_timeout,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_image_pixels,
        ),
    )


def build_service(settings: Settings, metrics: Metrics | None = None) -> RerankService:
    """The service of every model in `settings` (`--model`, or each of `--models`)."""
    metrics = metrics or Metrics()
    limits = limits_of(settings)
    try:
        per_model = settings.per_model()
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    return RerankService([load_model(s, metrics) for s in per_model], metrics, limits)
