"""Scaling with document length: docs/s and peak RSS of `rerankd serve` for 1 query × 16
documents of 256 → 8,192 tokens each, on the Qwen3-Reranker-0.6B shape (random weights).

    python -m benchmarks.bench_length [--lengths 256,512,...] [--repeats 2] [--json out.json]
        [--plot docs/benchmarks-length.png] [--dtype bfloat16] [-- extra serve flags]

One server for the whole run (its peak RSS, VmHWM, can only grow, so lengths run shortest
first and each row reads the peak reached so far). Each length sends one warm-up request, then
`--repeats` fresh requests (another seed each: no cache can answer). Documents are cut to the
target length with the checkpoint's tokenizer; the token counts reported are the server's own
(`usage.total_tokens`). Cost per document is then compared against the two terms it is made
of: linear layers (∝ L) and causal attention (∝ L²), so the growth exponent between successive
lengths says which one dominates.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402

from benchmarks.make_model import SHAPES, ensure_model, non_embedding_params  # noqa: E402
from benchmarks.workload import _TextGen  # noqa: E402
from tests.harness import spawn_rerankd  # noqa: E402

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
DOCUMENTS = 16
#: room above the longest document for the prompt (template, instruction, query: ~90 tokens)
PROMPT_ROOM = 256


def _log(msg: str) -> None:
    print(msg, flush=True)


def request(tokenizer, length: int, seed: int) -> dict:
    """1 query × 16 documents of `length` tokens each (cut by the tokenizer, decoded back)."""
    rng = random.Random(seed)
    gen = _TextGen(rng)
    documents = []
    for _ in range(DOCUMENTS):
        words = gen.text(length)  # ~1.1 tokens per word: always at least `length` tokens
        ids = tokenizer.encode(words, add_special_tokens=False)[:length]
        documents.append(tokenizer.decode(ids))
    return {"query": gen.query(), "documents": documents}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def flops_per_document(size: str, tokens: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one causal pass over `tokens` tokens."""
    s = SHAPES[size]
    linear = 2 * non_embedding_params(size) * tokens
    per_key = 4 * s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"]
    return linear, per_key * tokens * (tokens + 1) / 2


def run(args) -> dict:
    model = ensure_model(args.size)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [int(x) for x in args.lengths.split(",")]
    serve_args = [
        "--model", str(model),
        "--dtype", args.dtype,
        "--max-model-len", str(max(lengths) + PROMPT_ROOM),
        "--request-timeout", "3600",  # 16 × 8,192 tokens takes minutes on a small CPU
        *args.serve_args,
    ]  # fmt: skip
    rows = []
    logs = Path(tempfile.mkdtemp(prefix="bench-length-"))
    with spawn_rerankd("rerankd", serve_args, logs) as server:
        server.wait_healthy(900)
        idle_rss = peak_rss_bytes(server.pid)
        _log(f"   server healthy, peak RSS {idle_rss / 2**30:.2f} GiB before any request")
        with server.client(timeout=3600) as client:
            for length in lengths:
                rows.append(_measure(client, server.pid, tokenizer, length, args.repeats))
    return {"size": args.size, "dtype": args.dtype, "idle_peak_rss": idle_rss, "rows": rows}


def _measure(client, pid: int, tokenizer, length: int, repeats: int) -> dict:
    def post(seed: int) -> tuple[float, int]:
        body = request(tokenizer, length, seed)
        started = time.perf_counter()
        response = client.post("/v1/rerank", json=body)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return elapsed, response.json()["usage"]["total_tokens"]

    post(seed=length)  # warm-up: new row counts, allocator growth
    times, tokens = zip(*(post(seed=length * 100 + r) for r in range(repeats)), strict=True)
    best = min(times)
    row = {
        "length": length,
        "tokens_per_request": tokens[0],
        "seconds": list(times),
        "docs_per_s": DOCUMENTS / best,
        "peak_rss": peak_rss_bytes(pid),
    }
    _log(
        f"   {length:>5} tokens/doc: {row['docs_per_s']:7.2f} docs/s (best of {repeats}: "
        f"{best:.2f} s/request, {tokens[0]} tokens), peak RSS {row['peak_rss'] / 2**30:.2f} GiB"
    )
    return row


def report(out: dict) -> None:
    _log(f"\n== docs/s vs document length, Qwen3-Reranker {out['size']} shape, {out['dtype']}")
    _log(
        "   length  docs/s  s/doc   peak RSS  attention share  growth exponent "
        "(log Δs/doc ÷ log Δlength)"
    )
    previous = None
    for row in out["rows"]:
        seconds_per_doc = 1 / row["docs_per_s"]
        linear, attention = flops_per_document(out["size"], row["length"])
        growth = ""
        if previous:
            ratio = seconds_per_doc / previous[1]
            growth = f"{math.log(ratio) / math.log(row['length'] / previous[0]):.2f}"
        _log(
            f"   {row['length']:>6}  {row['docs_per_s']:6.2f}  {seconds_per_doc:6.3f}  "
            f"{row['peak_rss'] / 2**30:6.2f} GiB  {attention / (linear + attention):14.0%}  "
            f"{growth:>6}"
        )
        previous = (row["length"], seconds_per_doc)


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("   matplotlib missing (pip install matplotlib): no plot")
        return
    lengths = [row["length"] for row in out["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(lengths, [row["docs_per_s"] for row in out["rows"]], "o-")
    left.set(xscale="log", yscale="log", xlabel="tokens per document", ylabel="docs/s")
    left.set_xticks(lengths, [str(n) for n in lengths])
    left.set_title("throughput, 1 × 16 documents")
    right.plot(lengths, [row["peak_rss"] / 2**30 for row in out["rows"]], "o-")
    right.set(xscale="log", xlabel="tokens per document", ylabel="peak RSS (GiB)")
    right.set_xticks(lengths, [str(n) for n in lengths])
    right.set_title("server peak RSS")
    for axes in (left, right):  # only the measured lengths on the log axis, no minor labels
        axes.minorticks_off()
    fig.suptitle(f"rerankd, Qwen3-Reranker {out['size']} shape, {out['dtype']}, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _log(f"   plot: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--repeats", type=int, default=2, help="measured requests per length")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("serve_args", nargs="*", help="extra `rerankd serve` flags (after --)")
    args = parser.parse_args(argv)
    out = run(args)
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(out, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
