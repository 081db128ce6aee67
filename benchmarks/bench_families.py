"""W-CPU-style docs/s of the issue-20 families: rerankd's engine vs the transformers path.

    python -m benchmarks.bench_families                     # ModernBERT, bf16, 5 rounds
    python -m benchmarks.bench_families --family mxbai-v2 --rounds 4
    python -m benchmarks.bench_families --family jina-v3 --layers 14 --rounds 4

ModernBERT: a random-weight checkpoint of Alibaba-NLP/gte-reranker-modernbert-base's shape
(the hub card's config.json: 22 layers, hidden 768, every third layer global, local window
±64, mean pooling; `tests/fixtures/modernbert.py`), with a ModernBERT-style byte-level BPE
tokenizer (24k tokens) trained on the benchmark's generated English, built once into
``~/.cache/rerankd-bench/`` (``$RERANKD_BENCH_CACHE``) like ``benchmarks/make_model.py``.
mxbai-v2 and jina-v3: mxbai-rerank-base-v2's and jina-reranker-v3's shapes
(``benchmarks/family_checkpoints.py``; ``--layers`` shortens them).

Engines, built the way ``rerankd serve`` builds them and warmed up: ModernBERT and mxbai-v2
compare ``--engine packed`` with ``--engine transformers`` on the same token ids (pairs
tokenized once, outside the timing); jina-v3 compares the listwise engine with the
transformers reference of tests/reference_jina_v3.py (the hub modeling.py's `rerank` on
transformers' Qwen3), both from texts, so tokenizing is timed for both. A jina-v3 request of
16 such documents is one window (one prompt of ~4k tokens) in both.

Workload: W-CPU's shape (``benchmarks/workload.py``): 4 requests of 1 query × 16 documents of
60-240 words, one engine batch per request, requests one after another; every round draws
fresh documents (workload seed = round) and both engines score the same ones. Rounds
interleave the engines (ABAB…, the order flipped every round) so load on a shared machine
hits both alike; docs/s is the median over rounds, and the output adds each round's ratio
(its two engines ran back to back, under the same load), their median, and the best round
of each engine (the least disturbed: on a shared machine, the closest to its unloaded
speed). Random weights: scores are noise, speed is not.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.make_model import cache_root

FAMILY_CHOICES = ("modernbert", "mxbai-v2", "jina-v3")
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


def load(model_dir: Path, engine: str, dtype: str, **settings):
    """(recipe, engine) as `rerankd serve --engine ENGINE --dtype DTYPE` builds them."""
    from rerankd.runtime import load_engine, load_recipe
    from rerankd.settings import Settings

    settings = Settings(model=str(model_dir), engine=engine, dtype=dtype, device="cpu", **settings)
    model_dir, config, recipe = load_recipe(settings)
    return recipe, load_engine(settings, model_dir, config, recipe)


@dataclass
class Side:
    """One engine of the comparison: `prepare` turns a round's requests into its inputs
    (outside the timing), `run` scores them (timed)."""

    name: str
    prepare: Callable[[list], Any]
    run: Callable[[Any], None]
    detail: str = ""


def _packed_pair(family: str, model_dir: Path, dtype: str) -> list[Side]:
    """Our packed engine and the transformers engine, on the same token ids (encoded once)."""
    from rerankd.types import Batch

    extra = {"recipe": "mxbai-rerank-v2"} if family == "mxbai-v2" else {}
    sides, encoded = [], {}

    def prepare(requests: list) -> list[list]:
        key = id(requests)
        if key not in encoded:
            encoded.clear()
            encoded[key] = [
                recipe.encode([r.query] * len(r.documents), list(r.documents), None)
                for r in requests
            ]
        return encoded[key]

    for name in ("packed", "transformers"):
        recipe, engine = load(model_dir, name, dtype, **extra)
        run = lambda pairs_list, e=engine: [e.score(Batch(p, None)) for p in pairs_list]  # noqa: E731
        sides.append(Side(name, prepare, run, getattr(engine, "kernel", "")))
    return sides


def _listwise_pair(model_dir: Path, dtype: str) -> list[Side]:
    """The listwise engine and the transformers reference (tests/reference_jina_v3.py, the hub
    modeling.py's `rerank` transcribed), both from texts: tokenizing is inside the timing."""
    import torch

    from rerankd.types import Batch
    from tests.reference_jina_v3 import Reference

    recipe, engine = load(model_dir, "auto", dtype)
    reference = Reference(model_dir, dtype=getattr(torch, dtype))
    texts = lambda requests: requests  # noqa: E731

    def listwise(requests: list) -> None:
        for r in requests:
            engine.score(
                Batch(recipe.encode([r.query] * len(r.documents), list(r.documents)), None)
            )

    def transformers(requests: list) -> None:
        for r in requests:
            reference.rerank(r.query, list(r.documents))

    return [Side("listwise", texts, listwise), Side("transformers", texts, transformers)]


def sides_of(family: str, dtype: str, layers: int | None) -> tuple[str, list[Side]]:
    """(the model's description, its two engines), warmed up."""
    if family == "modernbert":
        model_dir = ensure_modernbert()
        label = "gte-reranker-modernbert-base shape (random weights)"
    else:
        from benchmarks.family_checkpoints import ensure_checkpoint

        model_dir = ensure_checkpoint(family, layers)
        shape = {"mxbai-v2": "mxbai-rerank-base-v2", "jina-v3": "jina-reranker-v3"}[family]
        label = f"{shape} shape, {layers or 'all'} layers (random weights)"
    started = time.perf_counter()
    if family == "jina-v3":
        sides = _listwise_pair(model_dir, dtype)
    else:
        sides = _packed_pair(family, model_dir, dtype)
    _log(f"engines loaded in {time.perf_counter() - started:.0f}s")
    from benchmarks.workload import w_cpu

    warm = w_cpu(10_000)[:1]
    for side in sides:
        side.run(side.prepare(warm))
    return label, sides


def run(rounds: int, dtype: str, family: str = "modernbert", layers: int | None = None) -> dict:
    import torch

    from benchmarks.workload import w_cpu

    label, sides = sides_of(family, dtype, layers)
    names = [s.name for s in sides]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    docs = 0
    for r in range(rounds):
        requests = w_cpu(r)
        docs = sum(len(q.documents) for q in requests)
        for side in sides if r % 2 == 0 else sides[::-1]:
            inputs = side.prepare(requests)
            started = time.perf_counter()
            side.run(inputs)
            seconds[side.name].append(time.perf_counter() - started)
        _log(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {docs / seconds[n][-1]:.2f} docs/s" for n in names)
        )
    ours, theirs = names
    rates = {name: docs / statistics.median(s) for name, s in seconds.items()}
    best = {name: docs / min(s) for name, s in seconds.items()}
    # each round's two engines ran back to back: their ratio shares the round's load
    round_ratios = [t / p for p, t in zip(seconds[ours], seconds[theirs], strict=True)]
    return {
        "family": family,
        "model": label,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "rounds": rounds,
        "docs_per_round": docs,
        "engines": names,
        "attention": sides[0].detail,
        "docs_per_s": rates,
        "per_round_docs_per_s": {n: [docs / x for x in s] for n, s in seconds.items()},
        "ratio": rates[ours] / rates[theirs],
        "best_docs_per_s": best,
        "best_ratio": best[ours] / best[theirs],
        "per_round_ratio": round_ratios,
        "median_round_ratio": statistics.median(round_ratios),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="modernbert", choices=FAMILY_CHOICES)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--layers", type=int, help="fewer layers than the real model's")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.rounds, args.dtype, args.family, args.layers)
    rates, (ours, theirs) = result["docs_per_s"], result["engines"]
    print(
        f"{result['model']}, W-CPU-style (4 x 1 query x 16 docs of 60-240 words), "
        f"{result['dtype']}, {result['threads']} threads, {result['cpu']}, median of "
        f"{result['rounds']} interleaved rounds (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])}):"
    )
    print(f"  {ours} {result['attention']}: {rates[ours]:.2f} docs/s")
    print(f"  {theirs}: {rates[theirs]:.2f} docs/s")
    print(f"  ratio {ours} / {theirs}: {result['ratio']:.2f}x")
    ratios = ", ".join(f"{r:.2f}" for r in result["per_round_ratio"])
    print(f"  per-round ratios: {ratios} (median {result['median_round_ratio']:.2f}x)")
    best = result["best_docs_per_s"]
    print(
        f"  best round: {ours} {best[ours]:.2f}, {theirs} {best[theirs]:.2f} docs/s "
        f"({result['best_ratio']:.2f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
