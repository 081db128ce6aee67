"""Tokenization throughput of one CPU core: the capacity model's "docs/s per core".

A replica (or, with several models on Ray, an ingress replica) turns each request into token
ids before the engine sees it. This measures exactly that step — rerankd's Qwen3-Reranker
recipe (`recipe.encode`, the service's call) on W-CPU requests — on one core
(`TOKENIZERS_PARALLELISM=false`, one thread), so docs/scaling.md can say how many cores keep
a given engine fed.

    python -m benchmarks.bench_tokenize [--model-dir DIR] [--seconds 20]

Without --model-dir it uses the benchmark checkpoint (`benchmarks/make_model.py`, a 24k-token
byte-level BPE with Qwen's special tokens); pass a real Qwen3-Reranker directory to measure
Qwen's own 151k-token vocabulary.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: set before tokenizers loads

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.make_model import ensure_model  # noqa: E402
from benchmarks.workload import w_cpu  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, help="checkpoint directory (default: benchmark one)")
    p.add_argument("--seconds", type=float, default=20.0, help="measure for about this long")
    args = p.parse_args(argv)

    from rerankd.models.loader import load_config_and_tokenizer
    from rerankd.recipes import build_recipe

    model_dir = args.model_dir or ensure_model("0.6b")
    config, tokenizer = load_config_and_tokenizer(model_dir)
    recipe = build_recipe("auto", tokenizer, config, None, model_dir=model_dir)
    requests = [r for seed in range(8) for r in w_cpu(seed)]
    recipe.encode([requests[0].query], [requests[0].documents[0]])  # warm

    rates, token_rates = [], []
    deadline = time.perf_counter() + args.seconds
    rounds = 0
    while time.perf_counter() < deadline or rounds < 3:
        docs = tokens = 0
        started = time.perf_counter()
        for r in requests:
            pairs = recipe.encode([r.query] * len(r.documents), list(r.documents))
            docs += len(pairs)
            tokens += sum(len(pair) for pair in pairs)
        wall = time.perf_counter() - started
        rates.append(docs / wall)
        token_rates.append(tokens / wall)
        rounds += 1
    print(f"== Tokenization on one core: recipe {recipe.name}, tokenizer of {model_dir}")
    print(
        f"   W-CPU requests (1 query x 16 documents of 60-240 words), {docs} documents and "
        f"{tokens} tokens per round, {rounds} rounds"
    )
    print(
        f"   {statistics.median(rates):,.0f} docs/s per core (median; best "
        f"{max(rates):,.0f}), {statistics.median(token_rates):,.0f} tokens/s per core"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
