"""Qwen3-VL-Reranker: a request's shared prefix kept across its sub-batches, or recomputed.

A request whose pairs do not fit one padded sub-batch (`--max-batch-tokens`, or the
scheduler's batch budget) is scored in several forwards. The engine keeps the last shared
prefix's K/V (template, instruction, the query and its image) and reuses it in every later
forward of the request ("kept"); before commit 9de9f68 each forward computed its own
("per sub-batch", emulated here by never reusing the kept one, which is what that code did).

Shape: benchmarks/bench_vl.py's checkpoint (Qwen3-VL-Reranker-2B widths, random weights,
`--layers` / `--vision-depth` deep). Workload: `--requests` requests of one image query
(`--image-size` square noise plus a short text) x `--docs` text documents (60-240 words),
rounds alternating which variant runs first; prints docs/s, the paired ratio and the largest
score difference.

    python -m benchmarks.bench_vl_prefix [--layers 2 --vision-depth 2 --max-batch-tokens 2048]
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

from benchmarks.bench_vl import build_checkpoint
from benchmarks.workload import _TextGen
from rerankd.engine.multimodal_engine import VisionLanguageEngine
from rerankd.models.loader import load_config_and_tokenizer
from rerankd.recipes.qwen3_vl import Qwen3VLReranker
from rerankd.types import Batch


class PerSubBatchPrefix(VisionLanguageEngine):
    """The engine as it was before the prefix was kept: each forward computes its own."""

    def _prepare_prefix(self, pairs) -> None:
        pass

    @staticmethod
    def _starts_all(prefix, pairs) -> bool:
        return False


def workload(requests: int, docs: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    gen = _TextGen(rng)
    out = []
    for r in range(requests):
        pixels = np.random.RandomState(seed + r).randint(0, 256, (size, size, 3), np.uint8)
        query = (("image", Image.fromarray(pixels)), ("text", gen.text(rng.randint(4, 8))))
        out.append((query, [gen.text(rng.randint(60, 240)) for _ in range(docs)]))
    return out


def run(recipe, engine, requests) -> tuple[float, list[float], int]:
    """(seconds, scores, forwards of the base model) over the requests, encoding included."""
    calls = [0]
    forward = engine._base.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    engine._base.forward = counting
    scores: list[float] = []
    started = time.perf_counter()
    try:
        for query, documents in requests:
            pairs = recipe.encode([query] * len(documents), documents)
            scores += engine.score(Batch(pairs))
    finally:
        del engine._base.forward
    return time.perf_counter() - started, scores, calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "vl-2b", args.layers, args.vision_depth)
        config, tokenizer = load_config_and_tokenizer(path)
        recipe = Qwen3VLReranker(tokenizer, config, None, model_dir=path)
        engines = {
            name: cls(path, recipe.head, cpu, dtype, args.max_batch_tokens)
            for name, cls in (("kept", VisionLanguageEngine), ("per sub-batch", PerSubBatchPrefix))
        }
        requests = workload(args.requests, args.docs, args.image_size)
        pairs = recipe.encode([requests[0][0]] * args.docs, requests[0][1])
        print(
            f"Qwen3-VL-Reranker-2B widths ({args.layers} text layers, {args.vision_depth} vision "
            f"blocks), cpu {args.dtype}, torch threads {torch.get_num_threads()}; {args.requests}"
            f" requests x 1 image query ({args.image_size}x{args.image_size}) x {args.docs} text "
            f"docs, {statistics.mean(len(p) for p in pairs):.0f} tokens/pair, shared prefix "
            f"{engines['kept'].shared_prefix(pairs)[0]} tokens, --max-batch-tokens "
            f"{args.max_batch_tokens}"
        )
        for engine in engines.values():
            run(recipe, engine, requests[:1])  # warm-up
        docs, ratios = args.requests * args.docs, []
        for round_ in range(args.rounds):
            order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
            took, scores, calls = {}, {}, {}
            for name in order:
                took[name], scores[name], calls[name] = run(recipe, engines[name], requests)
            ratios.append(took["per sub-batch"] / took["kept"])
            worst = max(
                abs(a - b) for a, b in zip(scores["kept"], scores["per sub-batch"], strict=True)
            )
            print(
                "  round {} ({}): ".format(round_ + 1, " then ".join(order))
                + ", ".join(f"{n} {docs / took[n]:.2f} docs/s ({calls[n]} forwards)" for n in order)
                + f"; {ratios[-1]:.2f}x; max |diff| {worst:.1e}"
            )
        print(
            f"  kept / per sub-batch: median {statistics.median(ratios):.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
