"""W-GPU benchmark (DESIGN.md §5): 1 query × 100 documents, 80-token shared prefix,
documents uniform in [128, 512] tokens, Qwen3-Reranker shape, bf16, one GPU.

Engines, same seeded token ids, one run:
- rerankd: the packed engine through its real scheduler (token-budget batches, shared
  prefix computed once, varlen attention when it agrees with SDPA);
- transformers, model-card style: padded batches of the request order, full LM logits;
- transformers, best effort: length-sorted padded batches, SDPA, only the last position's
  logits (`logits_to_keep=1`).
Prints docs/s per engine and rerankd's ratio to each. Runs on CPU too (`--device cpu`),
which is only a smoke test of the script.

    python -m benchmarks.bench_gpu --size 0.6b            # needs a CUDA device
    python -m benchmarks.bench_gpu --size 4b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.make_model import ensure_model
from rerankd.metrics import Metrics
from rerankd.runtime import load_model
from rerankd.scheduler import Scheduler
from rerankd.settings import Settings
from rerankd.types import EncodedPair

PREFIX_TOKENS = 80


def workload(
    vocab: int, n_docs: int, seed: int, doc_range: tuple[int, int]
) -> list[tuple[int, ...]]:
    """Token ids of each pair: a shared 80-token prefix, the document, a 9-token suffix."""
    rng = random.Random(seed)
    prefix = tuple(rng.randrange(1000, vocab) for _ in range(PREFIX_TOKENS))
    suffix = tuple(rng.randrange(1000, vocab) for _ in range(9))
    return [
        prefix + tuple(rng.randrange(1000, vocab) for _ in range(rng.randint(*doc_range))) + suffix
        for _ in range(n_docs)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (kernels, allocator, varlen validation)
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def run_rerankd(model_dir: Path, pairs, device: torch.device, batch_tokens: int | None):
    settings = Settings(
        model=str(model_dir), dtype="bfloat16", device=str(device), max_batch_tokens=batch_tokens
    )
    served = load_model(settings, Metrics())
    encoded = [EncodedPair(p) for p in pairs]

    engine = served.scheduler.engine

    async def one_request():
        scheduler = Scheduler(engine, Metrics(), served.name, batch_tokens, max_queued_tokens=10**9)
        scheduler.start()
        try:
            return await scheduler.submit(encoded)
        finally:
            await scheduler.stop()

    def go():
        return asyncio.run(one_request())

    return go, served.scheduler.engine.attention


def run_transformers(model_dir: Path, pairs, device: torch.device, batch: int, best_effort: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.to(device).eval()
    yes, no = 100, 101  # any two rows: the cost is what is measured
    order = (
        sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
        if best_effort
        else list(range(len(pairs)))
    )

    @torch.inference_mode()
    def go():
        scores = []
        for start in range(0, len(order), batch):
            chunk = [pairs[i] for i in order[start : start + batch]]
            width = max(map(len, chunk))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):  # left padding, as the model card's tokenizer.pad
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            kwargs = {"logits_to_keep": 1} if best_effort else {}
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
            ).logits[:, -1, :]
            scores += (logits[:, yes] - logits[:, no]).float().tolist()
        return scores

    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.6b", choices=["0.6b", "4b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--doc-min", type=int, default=128)
    parser.add_argument("--doc-max", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="transformers batch size")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="rerankd token budget")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model_dir = ensure_model(args.size)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    pairs = workload(vocab, args.docs, seed=0, doc_range=(args.doc_min, args.doc_max))
    tokens = sum(map(len, pairs))
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{args.size}, {args.docs} docs, {tokens} tokens ({tokens / args.docs:.0f}/pair, {PREFIX_TOKENS} shared)"
    )
    results = {}
    rerankd_run, attention = run_rerankd(model_dir, pairs, device, args.max_batch_tokens)
    engines = {
        f"rerankd (packed, {attention})": rerankd_run,
        "transformers model-card": run_transformers(model_dir, pairs, device, args.batch, False),
        "transformers best-effort": run_transformers(model_dir, pairs, device, args.batch, True),
    }
    for name, fn in engines.items():
        times = timed(fn, device, args.repeats)
        results[name] = args.docs / statistics.median(times)
        print(f"{name:32s} {results[name]:9.1f} docs/s  (median of {args.repeats})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = next(v for k, v in results.items() if k.startswith("rerankd"))
    for name, value in results.items():
        if not name.startswith("rerankd"):
            print(f"rerankd / {name}: {ours / value:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"size": args.size, "device": str(device), "docs_per_s": results}, indent=2)
        )


if __name__ == "__main__":
    main()
