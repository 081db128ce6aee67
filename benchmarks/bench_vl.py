"""Qwen3-VL-Reranker docs/s: text documents and image documents, shared prefix on and off.

Shape: Qwen/Qwen3-VL-Reranker-2B's config (text: 28 layers, hidden 2048, 16 heads / 8 KV
heads of 128, intermediate 6144, M-RoPE [24, 20, 20]; vision: 24 blocks, hidden 1024, 16
heads, DeepStack at 5/11/17), random weights; the tokenizer and image processor of the test
fixture (tests/fixtures/qwen3_vl.py; its small vocabulary only shrinks the embedding).
`--layers` / `--vision-depth` cut the depth for a quick CPU run (say so when quoting).

Workload: `--requests` requests of 1 query x `--docs` documents, either text (60–240 words)
or images (`--image-size` square noise PNGs with a short caption; 512 -> 256 image tokens).
Each request goes through the recipe (tokenizing, image resizing and the image processor:
"encode") and the vision-language engine ("score"), the shared prefix on and off,
interleaved round by round; prints docs/s of each and checks their scores agree.

    python -m benchmarks.bench_vl [--device cuda --dtype bfloat16] [--layers 2 --vision-depth 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.workload import _TextGen
from rerankd.engine.multimodal_engine import VisionLanguageEngine
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes.qwen3_vl import Qwen3VLReranker
from rerankd.types import Batch
from tests.fixtures.qwen3_vl import build_qwen3_vl_reranker


def build_checkpoint(path: Path, layers: int, vision_depth: int) -> Path:
    """The fixture's files with Qwen3-VL-Reranker-2B's dimensions (depths as asked)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    build_qwen3_vl_reranker(path)
    config = Qwen3VLConfig.from_pretrained(path)
    text, vision = config.text_config, config.vision_config
    text.update(
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": layers,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
        }
    )
    text.rope_parameters["mrope_section"] = [24, 20, 20]
    deepstack = [i for i in (5, 11, 17) if i < vision_depth] or [0]
    vision.update(
        {
            "depth": vision_depth,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": deepstack,
        }
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return path


def workload(kind: str, requests: int, docs: int, image_size: int, seed: int = 0):
    rng = random.Random(seed)
    gen = _TextGen(rng)
    out = []
    for r in range(requests):
        query = gen.text(rng.randint(8, 16))
        if kind == "text":
            documents = [gen.text(rng.randint(60, 240)) for _ in range(docs)]
        else:
            documents = []
            for d in range(docs):
                pixels = np.random.RandomState(seed + 1000 * r + d).randint(
                    0, 256, (image_size, image_size, 3), np.uint8
                )
                caption = gen.text(rng.randint(4, 12))
                documents.append((("image", Image.fromarray(pixels)), ("text", caption)))
        out.append((query, documents))
    return out


def run(recipe, engine, requests) -> tuple[float, float, list[float]]:
    """(encode seconds, score seconds, scores) over the requests."""
    encode = score = 0.0
    scores: list[float] = []
    for query, documents in requests:
        started = time.perf_counter()
        pairs = recipe.encode([query] * len(documents), documents)
        encode += time.perf_counter() - started
        started = time.perf_counter()
        scores += engine.score(Batch(pairs))
        score += time.perf_counter() - started
    return encode, score, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vision-depth", type=int, default=24)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "vl-2b", args.layers, args.vision_depth)
        config, tokenizer = load_config_and_tokenizer(path)
        recipe = Qwen3VLReranker(tokenizer, config, None, model_dir=path)
        engines = {
            share: VisionLanguageEngine(path, recipe.head, device, dtype, share_prefix=share)
            for share in (True, False)
        }
        print(
            f"Qwen3-VL-Reranker-2B shape ({args.layers} text layers, {args.vision_depth} vision "
            f"blocks), {args.device} {args.dtype}; {args.requests} x 1 query x {args.docs} docs"
        )
        for kind in ("text", "image"):
            requests = workload(kind, args.requests, args.docs, args.image_size)
            run(recipe, engines[True], requests[:1])  # warm-up
            times: dict[bool, list[float]] = {True: [], False: []}
            encodes, results = [], {}
            for _ in range(args.rounds):
                for share, engine in engines.items():
                    encode, score, scores = run(recipe, engine, requests)
                    encodes.append(encode)
                    times[share].append(score)
                    results[share] = scores
            diff = max(abs(a - b) for a, b in zip(results[True], results[False], strict=True))
            docs = args.requests * args.docs
            tokens = sum(len(p) for q, d in requests for p in recipe.encode([q] * len(d), d))
            shared, plain = (statistics.median(times[s]) for s in (True, False))
            print(
                f"  {kind:5s} docs ({tokens / docs:.0f} tokens/pair): encode "
                f"{docs / statistics.median(encodes):7.1f} docs/s | score shared prefix "
                f"{docs / shared:6.2f} docs/s, unshared {docs / plain:6.2f} docs/s "
                f"(x{plain / shared:.2f}); max |diff| {diff:.1e}"
            )


if __name__ == "__main__":
    main()
