"""W-CPU-style docs/s of the issue-20 families: our packed engine vs the transformers engine.

    python -m benchmarks.bench_families                     # ModernBERT, bf16, 5 rounds
    python -m benchmarks.bench_families --dtype float32 --rounds 3

ModernBERT: a random-weight checkpoint of Alibaba-NLP/gte-reranker-modernbert-base's shape
(the hub card's config.json: 22 layers, hidden 768, every third layer global, local window
±64, mean pooling; `tests/fixtures/modernbert.py`), with a ModernBERT-style byte-level BPE
tokenizer (24k tokens) trained on the benchmark's generated English, built once into
``~/.cache/rerankd-bench/`` (``$RERANKD_BENCH_CACHE``) like ``benchmarks/make_model.py``.

Workload: W-CPU's shape (``benchmarks/workload.py``): 4 requests of 1 query × 16 documents of
60-240 words, one engine batch per request, requests one after another; every round draws
fresh documents (workload seed = round) and both engines score the same ones. Rounds
interleave the engines (ABAB…, the order flipped every round) so load on a shared machine
hits both alike; docs/s is the median over rounds, and the output adds each round's ratio
(its two engines ran back to back, under the same load), their median, and the best round
of each engine (the least disturbed: on a shared machine, the closest to its unloaded speed). Engines are built the way ``rerankd
serve`` builds them (``--engine packed`` / ``--engine transformers``, warmed up); pairs are
tokenized once, outside the timing (both engines take the same ids). Random weights: scores
are noise, speed is not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.make_model import cache_root

TOKENIZER_VOCAB = 24000  # as make_model: the workload's words average ~1.1 tokens
WEIGHT_STD = 0.02  # the card's initializer_range
_MARKER = ".rerankd-bench-complete"


def _log(msg: str) -> None:
    print(f"[bench_families] {msg}", file=sys.stderr, flush=True)


# --- the checkpoint ---------------------------------------------------------------------------


def _fingerprint() -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for file in (
        Path(__file__),
        root / "workload.py",
        root.parent / "tests/fixtures/modernbert.py",
    ):
        h.update(file.read_bytes())
    h.update(f"{transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:10]


def build_modernbert(path: Path, seed: int = 0) -> Path:
    """gte-reranker-modernbert-base's shape, seeded N(0, 0.02) bf16 weights (norms 1)."""
    import torch
    from transformers import ModernBertForSequenceClassification

    from benchmarks.workload import corpus
    from tests.fixtures.modernbert import modernbert_config, tokenizer

    path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tok = tokenizer(corpus(1234), vocab_size=TOKENIZER_VOCAB)
    _log(f"tokenizer: {len(tok)} tokens in {time.perf_counter() - started:.0f}s")
    config = modernbert_config(tok, dtype="bfloat16")
    config.vocab_size = 50368  # the card's embedding rows; the tokenizer uses the first 24k
    with torch.device("meta"):
        model = ModernBertForSequenceClassification(config)
    model = model.to(dtype=torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, WEIGHT_STD, generator=gen)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    _log(f"checkpoint written in {time.perf_counter() - started:.0f}s: {path}")
    return path


def ensure_modernbert() -> Path:
    """The cached checkpoint directory, built on first use (atomic rename)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"gte-reranker-modernbert-base-random-{_fingerprint()}"
    if (target / _MARKER).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        build_modernbert(staging)
        (staging / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for stale in root.glob("gte-reranker-modernbert-base-random-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


# --- the run ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load(model_dir: Path, engine: str, dtype: str):
    """(recipe, engine) as `rerankd serve --engine ENGINE --dtype DTYPE` builds them."""
    from rerankd.runtime import load_engine, load_recipe
    from rerankd.settings import Settings

    settings = Settings(model=str(model_dir), engine=engine, dtype=dtype, device="cpu")
    model_dir, config, recipe = load_recipe(settings)
    return recipe, load_engine(settings, model_dir, config, recipe)


def encoded_requests(recipe, seed: int) -> list[list]:
    from benchmarks.workload import w_cpu

    return [
        recipe.encode([r.query] * len(r.documents), list(r.documents), None) for r in w_cpu(seed)
    ]


def time_workload(engine, requests: list[list]) -> float:
    """Seconds to score the requests one after another, one batch each."""
    from rerankd.types import Batch

    started = time.perf_counter()
    for pairs in requests:
        engine.score(Batch(pairs, None))
    return time.perf_counter() - started


def run(rounds: int, dtype: str) -> dict:
    import torch

    model_dir = ensure_modernbert()
    engines = {}
    recipe = None
    for name in ("packed", "transformers"):
        started = time.perf_counter()
        recipe, engines[name] = load(model_dir, name, dtype)
        detail = getattr(engines[name], "attention", "")
        _log(
            f"{name} engine ({engines[name].dtype} {detail}) in {time.perf_counter() - started:.0f}s"
        )
    warm = encoded_requests(recipe, seed=10_000)
    for engine in engines.values():
        time_workload(engine, warm[:1])
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    docs, tokens = 0, []
    for r in range(rounds):
        requests = encoded_requests(recipe, seed=r)
        docs = sum(len(pairs) for pairs in requests)
        tokens += [len(p) for pairs in requests for p in pairs]
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for name in order:
            seconds[name].append(time_workload(engines[name], requests))
        _log(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {docs / seconds[n][-1]:.1f} docs/s" for n in engines)
        )
    rates = {name: docs / statistics.median(s) for name, s in seconds.items()}
    best = {name: docs / min(s) for name, s in seconds.items()}
    # each round's two engines ran back to back: their ratio shares the round's load
    round_ratios = [t / p for p, t in zip(seconds["packed"], seconds["transformers"], strict=True)]
    result = {
        "model": "gte-reranker-modernbert-base shape (random weights)",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "rounds": rounds,
        "docs_per_round": docs,
        "tokens_per_pair": statistics.mean(tokens),
        "packed_attention": getattr(engines["packed"], "kernel", ""),
        "docs_per_s": rates,
        "per_round_docs_per_s": {n: [docs / x for x in s] for n, s in seconds.items()},
        "ratio": rates["packed"] / rates["transformers"],
        "best_docs_per_s": best,
        "best_ratio": best["packed"] / best["transformers"],
        "per_round_ratio": round_ratios,
        "median_round_ratio": statistics.median(round_ratios),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.rounds, args.dtype)
    rates = result["docs_per_s"]
    print(
        f"ModernBERT-base shape, W-CPU-style (4 x 1 query x 16 docs of 60-240 words, "
        f"{result['tokens_per_pair']:.0f} tokens/pair), {result['dtype']}, "
        f"{result['threads']} threads, {result['cpu']}, median of {result['rounds']} "
        f"interleaved rounds:"
    )
    print(f"  packed ({result['packed_attention']}): {rates['packed']:.1f} docs/s")
    print(f"  transformers:                 {rates['transformers']:.1f} docs/s")
    print(f"  ratio packed / transformers:  {result['ratio']:.2f}x")
    ratios = ", ".join(f"{r:.2f}" for r in result["per_round_ratio"])
    print(f"  per-round ratios: {ratios} (median {result['median_round_ratio']:.2f}x)")
    best = result["best_docs_per_s"]
    print(
        f"  best round: packed {best['packed']:.1f}, transformers {best['transformers']:.1f} "
        f"docs/s ({result['best_ratio']:.2f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
