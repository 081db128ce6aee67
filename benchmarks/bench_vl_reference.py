"""Image rerankers' docs/s: rerankd against each model's official scoring path, interleaved.

Models (random weights, real widths, depth cut by `--layers` / `--vision-depth`):
- Qwen3-VL-Reranker-2B's shape (benchmarks/bench_vl.py's checkpoint: text hidden 2048,
  16 / 8 heads of 128, intermediate 6144; vision hidden 1024, 16 heads, out 2048);
- jina-reranker-m0's shape (Qwen2-VL-2B: text hidden 1536, 12 / 2 heads of 128,
  intermediate 8960; vision embed 1280, 16 heads, MLP ratio 4, out 1536).
Tokenizers and image processors are the test fixtures' (small vocabularies shrink only the
embedding).

Paths compared, both given the same decoded PIL images:
- rerankd: the served recipe and engine, as `rerankd serve` loads them (`load_model`):
  recipe.encode, then the engine's padded length-sorted batches (the shared query prefix
  once per request for Qwen3-VL);
- reference: the official code transcribed on transformers' classes (tests/reference_*.py):
  Qwen3-VL `Qwen3VLReranker.process` (one pair per forward, as the original) and m0
  `compute_score` (batches of 8, padded on the left).

Workload: `--requests` x 1 query x `--docs` documents: text (60-240 words) or images
(`--image-size` square noise; Qwen3-VL: image + a short caption, m0: the image alone, its
official `doc_type="image"`). Rounds alternate which path runs first; prints each round's
docs/s, the paired ratio, their median, and max |score difference| between the paths.

    python -m benchmarks.bench_vl_reference [--model qwen3-vl|m0|both] [--layers 2] ...
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_vl import build_checkpoint as build_qwen3_vl
from benchmarks.workload import _TextGen
from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch


def build_m0(path: Path, layers: int, vision_depth: int) -> Path:
    """The m0 fixture's files with jina-reranker-m0's widths (depths as asked)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from tests.fixtures.jina_m0 import _legacy_name, build_jina_m0

    build_jina_m0(path)
    config = Qwen2VLConfig.from_pretrained(path)
    config.text_config.update(
        {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": layers,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "layer_types": ["full_attention"] * layers,
        }
    )
    config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]
    config.vision_config.update(
        {"depth": vision_depth, "embed_dim": 1280, "num_heads": 16, "hidden_size": 1536}
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    score = torch.nn.Sequential(
        torch.nn.Linear(1536, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, 1)
    )
    with torch.no_grad():
        for param in [*model.parameters(), *score.parameters()]:
            param.normal_(0.0, 0.02)
    tensors = {
        _legacy_name(name): t.contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }
    tensors.update({f"score.{name}": t.contiguous() for name, t in score.state_dict().items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    saved = json.loads((path / "config.json").read_text())
    saved.update(
        {k: v for k, v in config.to_dict().items() if k in ("text_config", "vision_config")}
    )
    (path / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return path


def workload(kind: str, requests: int, docs: int, size: int, caption: bool, seed: int = 0):
    """[(query, [(text or None, image or None)])]."""
    rng = random.Random(seed)
    gen = _TextGen(rng)
    out = []
    for r in range(requests):
        documents: list[tuple[str | None, Any]] = []
        for d in range(docs):
            if kind == "text":
                documents.append((gen.text(rng.randint(60, 240)), None))
                continue
            pixels = np.random.RandomState(seed + 1000 * r + d).randint(0, 256, (size, size, 3))
            image = Image.fromarray(pixels.astype(np.uint8))
            documents.append((gen.text(rng.randint(4, 12)) if caption else None, image))
        out.append((gen.text(rng.randint(8, 16)), documents))
    return out


def as_parts(text: str | None, image: Any) -> Any:
    """A document as rerankd's recipes take it."""
    if image is None:
        return text
    return (("image", image),) + ((("text", text),) if text is not None else ())


def run_rerankd(model, requests) -> list[float]:
    scores: list[float] = []
    for query, documents in requests:
        parts = [as_parts(t, i) for t, i in documents]
        pairs = model.recipe.encode([query] * len(parts), parts)
        scores += model.scheduler.engine.score(Batch(pairs))
    return scores


def run_reference(name: str, reference, requests) -> list[float]:
    scores: list[float] = []
    for query, documents in requests:
        if name == "qwen3-vl":
            docs = [{"text": t, "image": i} for t, i in documents]
            scores += [raw for raw, _ in reference.process({"text": query}, docs)]
        elif documents[0][1] is None:
            scores += reference.compute_score([(query, t) for t, _ in documents])
        else:
            pairs = [(query, i) for _, i in documents]
            scores += reference.compute_score(pairs, doc_type="image")
    return scores


def compare(name: str, model, reference, requests, rounds: int) -> None:
    docs = sum(len(d) for _, d in requests)
    run_rerankd(model, requests[:1])  # warm-up, both
    run_reference(name, reference, requests[:1])
    ratios, rates = [], {"rerankd": [], "reference": []}
    for round_ in range(rounds):
        took = {}
        order = ("rerankd", "reference") if round_ % 2 == 0 else ("reference", "rerankd")
        for path in order:
            started = time.perf_counter()
            if path == "rerankd":
                ours = run_rerankd(model, requests)  # raw: the engine's logit
            else:
                theirs = run_reference(name, reference, requests)
            took[path] = time.perf_counter() - started
            rates[path].append(docs / took[path])
        ratios.append(took["reference"] / took["rerankd"])
        worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        print(
            f"    round {round_ + 1} ({' then '.join(order)}): rerankd "
            f"{rates['rerankd'][-1]:6.2f} docs/s, reference {rates['reference'][-1]:6.2f} docs/s,"
            f" {ratios[-1]:.2f}x; max |raw diff| {worst:.1e}"
        )
    print(
        f"    median: rerankd {statistics.median(rates['rerankd']):.2f} docs/s, reference "
        f"{statistics.median(rates['reference']):.2f} docs/s, paired ratio "
        f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})"
    )


def load_reference(name: str, path: Path, dtype: torch.dtype):
    if name == "qwen3-vl":
        from tests.reference_qwen3_vl import ReferenceQwen3VLReranker

        return ReferenceQwen3VLReranker(path, dtype=dtype)
    from tests.reference_jina_m0 import ReferenceJinaM0

    return ReferenceJinaM0(path, dtype=dtype)


def bench_model(name: str, args, tmp: Path) -> None:
    build = build_qwen3_vl if name == "qwen3-vl" else build_m0
    path = build(tmp / name, args.layers, args.vision_depth)
    model = load_model(Settings(model=str(path), device="cpu", dtype=args.dtype), Metrics())
    reference = load_reference(name, path, getattr(torch, args.dtype))
    size = args.image_size
    print(
        f"{name}: 2B widths, {args.layers} text layers, {args.vision_depth} vision blocks, cpu "
        f"{args.dtype}, torch threads {torch.get_num_threads()}; {args.requests} requests x 1 "
        f"query x {args.docs} docs"
    )
    for kind in ("text", "image"):
        requests = workload(kind, args.requests, args.docs, size, caption=name == "qwen3-vl")
        pairs = [
            len(p)
            for q, d in requests
            for p in model.recipe.encode([q] * len(d), [as_parts(t, i) for t, i in d])
        ]
        what = f"{size}x{size} images" if kind == "image" else "text"
        print(f"  {what} documents, {statistics.mean(pairs):.0f} tokens per pair:")
        compare(name, model, reference, requests, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="both", choices=["qwen3-vl", "m0", "both"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    names = ("qwen3-vl", "m0") if args.model == "both" else (args.model,)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            bench_model(name, args, Path(tmp))


if __name__ == "__main__":
    main()
