"""bge-reranker-v2.5-gemma2-lightweight: speed and fidelity per (cutoff_layers, compress_ratio,
compress_layers) setting, on the test fixture's shape (tests/fixtures/gemma2_lightweight.py:
the real 42 layers, hidden 32) and, with ``--hidden``, a wider one of the same depth.

One request of 1 query x N documents of 60-240 words (cut to FlagEmbedding's L = 512 passage
tokens), float32, CPU, through the service (recipe, scheduler, engine). Settings run
interleaved, `--rounds` times; docs/s is the median round. Fidelity: max |Δ raw score| against
the uncompressed model at the same cutoff and against the uncompressed full-depth model
(random weights: the deltas show how far a setting moves scores, not ranking quality on real
data).

    python -m benchmarks.bench_lightweight [--documents 32] [--rounds 3] [--hidden 256]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rerankd.runtime import build_service
from rerankd.settings import Settings
from tests.fixtures.gemma2_lightweight import build_gemma2_lightweight
from tests.fixtures.tiny_models import generate_corpus

#: (cutoff_layers, compress_ratio, compress_layers); the first is the reference point
SETTINGS = [
    (42, 1, ()),
    (42, 2, (24, 40)),
    (42, 4, (8,)),
    (28, 1, ()),
    (28, 2, (24, 40)),  # the model card's
    (28, 2, (8,)),
    (28, 4, (8,)),
    (20, 1, ()),
    (20, 2, (8,)),
    (8, 1, ()),
]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(generate_corpus(seed + 3)).split()
    out = []
    for _ in range(n):
        k = rng.randint(60, 240)
        start = rng.randrange(len(words) - k)
        out.append(" ".join(words[start : start + k]))
    return out


def run(model_dir: Path, n: int, rounds: int) -> list[tuple]:
    service = build_service(Settings(model=str(model_dir), device="cpu", dtype="float32"))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(service.start())
    model = service.models[0]
    docs = documents(n)

    async def score(cutoff, ratio, layers):
        options = {
            "cutoff_layers": cutoff,
            "compress_ratio": ratio,
            "compress_layers": list(layers),
        }
        return (await service.rerank(model, "what is panda?", docs, **options)).raw_scores

    scores, times = {}, {s: [] for s in SETTINGS}
    loop.run_until_complete(score(*SETTINGS[0]))  # warm-up
    for _ in range(rounds):
        for setting in SETTINGS:
            started = time.perf_counter()
            scores[setting] = loop.run_until_complete(score(*setting))
            times[setting].append(time.perf_counter() - started)
    loop.run_until_complete(service.stop())
    loop.close()
    full = scores[SETTINGS[0]]
    rows = []
    for setting in SETTINGS:
        same_cut = scores[(setting[0], 1, ())]
        delta = lambda a, b: max(abs(x - y) for x, y in zip(a, b, strict=True))  # noqa: E731
        docs_s = n / statistics.median(times[setting])
        base = n / statistics.median(times[SETTINGS[0]])
        rows.append(
            (setting, docs_s, docs_s / base, delta(scores[setting], same_cut), delta(scores[setting], full))
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=None, help="a wider model (head_dim 32)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wider = {}
    if args.hidden:
        h = args.hidden
        wider = dict(
            hidden_size=h, intermediate_size=4 * h, num_attention_heads=h // 32,
            num_key_value_heads=max(1, h // 64), head_dim=32, query_pre_attn_scalar=32,
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_gemma2_lightweight(Path(tmp) / "lightweight", **wider)
        rows = run(model_dir, args.documents, args.rounds)
    print("| setting (cutoff, ratio, layers) | docs/s | vs 42/1 | max |Δ| vs same cutoff "
          "uncompressed | max |Δ| vs 42 uncompressed |")  # fmt: skip
    print("|---|---|---|---|---|")
    for (cutoff, ratio, layers), docs_s, speedup, same, full in rows:
        print(f"| {cutoff}, {ratio}, {list(layers)} | {docs_s:.1f} | {speedup:.2f}x | {same:.3f} | "
              f"{full:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
