"""bge-reranker-v2-minicpm-layerwise: W-CPU-style docs/s per `cutoff_layers` setting.

The real depth and head layout (BAAI/bge-reranker-v2-minicpm-layerwise's config.json: 40
layers, a score head after each layer from 8 on, MHA, intermediate 2.5 x hidden) at a reduced
width (``--hidden``, heads of 64; the real model is 2304 wide, 2.4B parameters, beyond this
machine's time), random weights (tests/fixtures/minicpm_layerwise.py) with its Llama-style
tokenizer retrained at ``--vocab`` tokens on the fixtures' English. Workload: W-CPU's shape,
4 requests of 1 query x 16 documents of 60-240 words, through the service (recipe, scheduler,
packed engine), bf16 by default. Settings run interleaved within each round (the order
rotated every round), so load on a shared machine hits them alike; docs/s is the median
round, and the speed-up of each setting over the last layer (the reference's default) is the
median of its per-round ratios.

    python -m benchmarks.bench_layerwise [--hidden 512] [--rounds 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rerankd.runtime import build_service
from rerankd.settings import Settings
from tests.fixtures.minicpm_layerwise import LAYERWISE_CONFIG, build_minicpm_layerwise, tokenizer
from tests.fixtures.tiny_models import generate_corpus

#: the cutoff layers compared; 40 (the last) is the reference's default and the base
CUTOFFS = (40, 32, 28, 24, 16, 8)


def build(path: Path, hidden: int, vocab: int) -> Path:
    """The real depth and heads at width `hidden`, with a `vocab`-token tokenizer."""
    tok = tokenizer(0, vocab_size=vocab)
    heads = hidden // 64
    shape = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 5 // 2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=LAYERWISE_CONFIG["num_hidden_layers"],
        start_layer=LAYERWISE_CONFIG["start_layer"],
        torch_dtype="bfloat16",
        vocab_size=len(tok),
    )
    build_minicpm_layerwise(path, **shape)
    tok.save_pretrained(path)
    return path


def requests(seed: int) -> list[tuple[str, list[str]]]:
    """4 x (query, 16 documents of 60-240 words) from the tokenizer's corpus."""
    rng = random.Random(seed)
    words = " ".join(generate_corpus(3)).split()

    def text(k: int) -> str:
        start = rng.randrange(len(words) - k)
        return " ".join(words[start : start + k])

    return [
        (text(rng.randint(4, 10)), [text(rng.randint(60, 240)) for _ in range(16)])
        for _ in range(4)
    ]


def run(model_dir: Path, rounds: int, dtype: str) -> dict:
    service = build_service(Settings(model=str(model_dir), device="cpu", dtype=dtype))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(service.start())
    model = service.models[0]

    async def score(work, cutoff) -> None:
        for query, docs in work:
            await service.rerank(model, query, docs, cutoff_layers=cutoff)

    loop.run_until_complete(score(requests(10_000)[:1], CUTOFFS[0]))  # warm-up
    seconds: dict[int, list[float]] = {c: [] for c in CUTOFFS}
    tokens = [len(p) for q, d in requests(0) for p in model.recipe.encode([q] * len(d), d)]
    for r in range(rounds):
        work = requests(r)
        shift = r % len(CUTOFFS)
        for cutoff in CUTOFFS[shift:] + CUTOFFS[:shift]:
            started = time.perf_counter()
            loop.run_until_complete(score(work, cutoff))
            seconds[cutoff].append(time.perf_counter() - started)
        print(f"round {r + 1}: " + ", ".join(f"{c} {64 / seconds[c][-1]:.2f}" for c in CUTOFFS))
    loop.run_until_complete(service.stop())
    loop.close()
    base = seconds[CUTOFFS[0]]
    return {
        "tokens_per_pair": statistics.mean(tokens),
        "docs_per_s": {c: 64 / statistics.median(s) for c, s in seconds.items()},
        "speedup": {
            c: statistics.median(b / x for b, x in zip(base, s, strict=True))
            for c, s in seconds.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(
            build(Path(tmp) / "layerwise", args.hidden, args.vocab), args.rounds, args.dtype
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"40 layers, hidden {args.hidden}, {args.dtype}, {torch.get_num_threads()} threads, "
        f"{result['tokens_per_pair']:.0f} tokens/pair, median of {args.rounds} interleaved "
        f"rounds, load average at the end {load}:"
    )
    print("| cutoff_layers | docs/s | vs 40 (median of per-round ratios) |")
    print("|---|---|---|")
    for cutoff in CUTOFFS:
        print(
            f"| {cutoff} | {result['docs_per_s'][cutoff]:.2f} | {result['speedup'][cutoff]:.2f}x |"
        )


if __name__ == "__main__":
    main()
