"""ColBERT reranking docs/s: documents encoded fresh vs served from the embedding cache.

Shape: answerdotai/answerai-colbert-small-v1 (BERT, 12 layers, hidden 384, 12 heads,
intermediate 1536, Dense to 96; query length 32, document length 300), random weights, in
PyLate's layout (tokenizer: the test fixture's WordPiece). Workload (RAG-like repeats):
`--requests` queries × `--docs` documents of 60–240 words, each request's documents drawn
from a pool of `--pool` distinct documents, so later requests meet documents earlier ones
already encoded. Each round runs the whole workload with the cache off and on (cleared first),
interleaved; prints docs/s, the hit rate and the speed-up. Scores are checked equal.

    python -m benchmarks.bench_colbert [--requests 6 --docs 16 --pool 32 --rounds 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workload import _TextGen
from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.settings import Settings
from rerankd.types import Batch
from tests.fixtures.colbert import build_colbert_bert


def build_checkpoint(path: Path) -> Path:
    """The fixture's files with answerai-colbert-small-v1's backbone and projection shape."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    build_colbert_bert(path)
    config = BertConfig.from_pretrained(path)
    config.update(
        {
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
        }
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(path)
    dense = path / "1_Dense"
    text = (dense / "config.json").read_text().replace('"in_features": 64', '"in_features": 384')
    (dense / "config.json").write_text(text)
    save_file({"linear.weight": torch.randn(96, 384) * 0.05}, str(dense / "model.safetensors"))
    return path


def workload(requests: int, docs: int, pool: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    gen = _TextGen(rng)
    texts = [gen.text(rng.randint(60, 240)) for _ in range(pool)]
    return [(gen.query(), rng.sample(texts, docs)) for _ in range(requests)]


def run(model, requests, cache_on: bool) -> tuple[float, list[list[float]], float, int]:
    """(seconds, scores, cache hit rate, tokens through the backbone) of the workload."""
    engine = model.scheduler.engine
    engine.cache.clear()
    engine.cache.max_rows = 1 << 20 if cache_on else 0
    hits, misses = engine.cache.hits, engine.cache.misses
    encoded = [0]
    forward = engine._backbone.forward

    def counting(items, limited):
        encoded[0] += sum(len(ids) for ids, _ in items)
        return forward(items, limited)

    engine._backbone.forward = counting
    scores = []
    started = time.perf_counter()
    try:
        for query, documents in requests:
            pairs = model.recipe.encode([query] * len(documents), documents)
            scores.append(engine.score(Batch(pairs, [0] * len(pairs))))
    finally:
        del engine._backbone.forward  # the class's method again
    elapsed = time.perf_counter() - started
    looked = engine.cache.hits - hits + engine.cache.misses - misses
    return elapsed, scores, (engine.cache.hits - hits) / max(1, looked), encoded[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "answerai-colbert-small-shape")
        settings = Settings(model=str(path), device=args.device, dtype=args.dtype)
        model = load_model(settings, Metrics())
        requests = workload(args.requests, args.docs, args.pool)
        n_docs = args.requests * args.docs
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            fresh, fresh_scores, _, fresh_tokens = run(model, requests, False)
            cached, cached_scores, hit_rate, cached_tokens = run(model, requests, True)
            times[False].append(fresh)
            times[True].append(cached)
            worst = max(
                abs(a - b)
                for x, y in zip(fresh_scores, cached_scores, strict=True)
                for a, b in zip(x, y, strict=True)
            )
        fresh, cached = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"{args.requests} requests x {args.docs} docs from a pool of {args.pool} "
            f"({args.device}, {args.dtype}, torch threads {torch.get_num_threads()}):\n"
            f"  fresh  {n_docs / fresh:8.1f} docs/s\n"
            f"  cached {n_docs / cached:8.1f} docs/s  (hit rate {hit_rate:.0%}, "
            f"{fresh / cached:.2f}x; max |score diff| {worst:.1e})\n"
            f"  tokens through the backbone: {fresh_tokens} fresh, {cached_tokens} cached "
            f"({fresh_tokens / cached_tokens:.2f}x fewer)"
        )


if __name__ == "__main__":
    main()
