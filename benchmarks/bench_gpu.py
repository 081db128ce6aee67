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

`--quantize fp8` adds rerankd `--quantize fp8` to the same run: its docs/s, its ratio to
rerankd bf16, and its fidelity against bf16 on the W-GPU request's documents (max |Δ| of raw
scores and probabilities, the share of document pairs ordered the same way, same top
document), as bench_cpu.py prints for int8. On CPU the server refuses fp8; the smoke test
then loads the engine in float32, takes its scores, and quantizes its linears in place
(`quantize_fp8`, torch's reference `_scaled_mm` on CPU): fidelity against that float32
engine, speed of a reference kernel. It checks the script and the arithmetic, not a serving
path, and says so in its output (`fp8.path`).

    python -m benchmarks.bench_gpu --size 0.6b            # needs a CUDA device
    python -m benchmarks.bench_gpu --size 4b
    python -m benchmarks.bench_gpu --size 0.6b --quantize fp8   # + fp8 speed and fidelity
    python -m benchmarks.bench_gpu --size 0.6b --cuda-graphs on --no-peers  # graphs vs not
    python -m benchmarks.bench_gpu --device cpu --model DIR --docs 8   # a smoke test

`--json` writes what was measured (docs/s, ratios, p50 of a 1 x 16 request, the attention
kernel, peak CUDA memory, `fp8`, `cuda_graphs`); scripts/device_check.sh runs both sizes
on the GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.make_model import ensure_model
from rerankd.metrics import Metrics
from rerankd.ops.fp8 import fp8_refusal, quantize_fp8
from rerankd.recipes import sigmoid
from rerankd.runtime import load_model
from rerankd.scheduler import Scheduler
from rerankd.settings import Settings
from rerankd.types import Batch, EncodedPair

PREFIX_TOKENS = 80
#: the fp8 engine's row in `docs_per_s` (`--quantize fp8`)
FP8_NAME = "rerankd fp8"
#: the two arms of the CUDA graphs measurement (`--cuda-graphs on`)
GRAPHS, NO_GRAPHS = "graphs", "no graphs"


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


def request_from_args(args) -> tuple[Path, list[tuple[int, ...]]]:
    """The checkpoint (`--model` or `--size`'s) and the W-GPU request's token ids for the
    parsed `--docs`, `--doc-min`, `--doc-max` (seed 0): shared by bench_gpu and profile_gpu."""
    model_dir = args.model or ensure_model(args.size)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return model_dir, workload(vocab, args.docs, seed=0, doc_range=(args.doc_min, args.doc_max))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (kernels, allocator, varlen validation)
    return paired({"": fn}, device, repeats)[""]


def paired(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each of `fns` (already warmed up), taken in turn call
    by call, so that drifts of the clock or of the machine fall on every one alike."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out[name].append(time.perf_counter() - start)
    return out


def run_rerankd(
    model_dir: Path,
    pairs,
    device: torch.device,
    batch_tokens: int | None,
    compile: str = "auto",
    quantize: str = "none",
    cuda_graphs: str = "auto",
):
    """(one W-GPU request through a fresh scheduler, one 1 x 16 request, the engine).

    `quantize="fp8"` where the server refuses it (CPU, GPUs below 8.9): see `fp8_stand_in`."""
    settings = Settings(
        model=str(model_dir),
        dtype="bfloat16",
        device=str(device),
        max_batch_tokens=batch_tokens,
        compile=compile,
        quantize=quantize,
        cuda_graphs=cuda_graphs,
    )
    if quantize == "fp8" and fp8_refusal(device) is not None:
        settings.dtype, settings.quantize = "float32", "none"
    served = load_model(settings, Metrics())
    engine = served.scheduler.engine

    def request(encoded: list[EncodedPair]):
        async def one_request():
            scheduler = Scheduler(
                engine, Metrics(), served.name, batch_tokens, max_queued_tokens=10**9
            )
            scheduler.start()
            try:
                return await scheduler.submit(encoded)
            finally:
                await scheduler.stop()

        return asyncio.run(one_request())

    everything = [EncodedPair(p) for p in pairs]
    return (lambda: request(everything)), (lambda: request(everything[:16])), engine


def fp8_stand_in(engine, pairs) -> list[float]:
    """Where the server refuses fp8 (the CPU smoke test): `engine` was loaded in float32 (no
    oneDNN-prepacked linears, which `quantize_fp8` cannot swap); its scores are taken, then
    its linears quantized in place on torch's reference `_scaled_mm`. Returns the scores
    before: the fidelity reference of this path (float32, the same engine)."""
    before = raw_scores(engine, pairs)
    if quantize_fp8(engine.model) == 0:
        raise RuntimeError("quantize_fp8 swapped no linear: the fp8 stand-in would be bf16")
    engine.dtype = "fp8-e4m3 (float32 activations; torch's reference kernel, not served)"
    return before


def fp8_path(device: torch.device) -> str:
    """How the fp8 engine of this run was built: served, or the smoke test's stand-in."""
    refusal = fp8_refusal(device)
    if refusal is None:
        return "served (--quantize fp8), fidelity vs rerankd bf16"
    return f"stand-in, not served ({refusal}); fidelity vs the same engine in float32"


def raw_scores(engine, pairs) -> list[float]:
    """Raw scores of the W-GPU request's pairs in one engine call (one group: shared prefix)."""
    return engine.score(Batch([EncodedPair(p) for p in pairs], [0] * len(pairs)))


def fidelity(reference: list[float], other: list[float]) -> dict:
    """What a quantized engine costs in scores against `reference` (bf16), on one request:
    max |Δ| of raw scores and of probabilities, the share of document pairs ordered the same
    way (pairs tied in the reference left out), and whether the top document is the same."""
    same, pairs = 0, 0
    for i in range(len(reference)):
        for j in range(i + 1, len(reference)):
            if reference[i] != reference[j]:
                pairs += 1
                same += (reference[i] > reference[j]) == (other[i] > other[j])
    top = max(range(len(reference)), key=reference.__getitem__)
    return {
        "max_abs_raw_diff": max(abs(a - b) for a, b in zip(reference, other, strict=True)),
        "max_abs_probability_diff": max(
            abs(sigmoid(a) - sigmoid(b)) for a, b in zip(reference, other, strict=True)
        ),
        "pairwise_order_agreement": same / max(pairs, 1),
        "same_top1": max(range(len(other)), key=other.__getitem__) == top,
        "documents": len(reference),
    }


@contextlib.contextmanager
def warnings_logged(name: str = "rerankd"):
    """The messages of the warnings logged under `name` in the block (still printed)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            print(f"{record.levelname} {record.name}: {messages[-1]}", file=sys.stderr)

    handler = Keep(logging.WARNING)
    logging.getLogger(name).addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger(name).removeHandler(handler)


def measure_graphs(engine, requests: dict, pairs, device: torch.device, repeats: dict) -> dict:
    """The engine with and without its CUDA graphs (`engine.graphs`), paired: for each of
    `requests` ({"w_gpu": fn, "1x16": fn}, through the scheduler), one call per arm to warm
    up (and capture) then `repeats[name]` calls in turn. Leaves the engine's graphs as they
    were unless a replay failed (then the engine has turned them off, as a server would)."""
    runner = getattr(engine, "graphs", None)  # not a packed engine: no graphs
    result: dict = {"on": runner is not None}
    if runner is None:
        return result
    result["captures_at_start"] = runner.captures

    def arm(graphs, fn):
        def run():
            engine.graphs = graphs
            out = fn()
            if graphs is not None and engine.graphs is not graphs:
                raise RuntimeError("a replay failed and the engine turned graphs off")
            return out

        return run

    try:
        direct = {
            name: arm(graphs, lambda: raw_scores(engine, pairs))()
            for name, graphs in ((NO_GRAPHS, None), (GRAPHS, runner))
        }
        result["fidelity"] = fidelity(direct[NO_GRAPHS], direct[GRAPHS])
        arms = {
            request: {GRAPHS: arm(runner, fn), NO_GRAPHS: arm(None, fn)}
            for request, fn in requests.items()
        }
        served = {request: {name: fn() for name, fn in a.items()} for request, a in arms.items()}
        scheduler = served["w_gpu"]
        result["max_abs_score_diff"] = result["fidelity"]["max_abs_raw_diff"]
        result["max_abs_scheduler_diff"] = max(
            abs(a - b) for a, b in zip(scheduler[GRAPHS], scheduler[NO_GRAPHS], strict=True)
        )
        warmed = runner.captures
        seconds = {request: paired(a, device, repeats[request]) for request, a in arms.items()}
        result["captures_while_timed"] = runner.captures - warmed
    except Exception as exc:  # a failing replay is a finding: the run goes on without
        result["error"] = f"{type(exc).__name__}: {exc}"[:800]
        engine.graphs = None
        return result
    finally:
        result["captures"] = runner.captures
        result["buckets"] = [dataclasses.asdict(b) for b in runner.buckets()]
    engine.graphs = runner
    median = {r: {k: statistics.median(v) for k, v in t.items()} for r, t in seconds.items()}
    docs = len(pairs)
    result["docs_per_s"] = {k: docs / v for k, v in median["w_gpu"].items()}
    result["over_no_graphs"] = median["w_gpu"][NO_GRAPHS] / median["w_gpu"][GRAPHS]
    result["p50_ms_1x16"] = {k: 1000 * v for k, v in median["1x16"].items()}
    result["seconds"] = seconds
    return result


def report_graphs(graphs: dict) -> None:
    """Print `measure_graphs`' result (or why there is none)."""
    if not graphs["on"]:
        why = "; ".join(graphs["warnings"])
        print(f"CUDA graphs (--cuda-graphs {graphs['mode']}): off{': ' + why if why else ''}")
        return
    captures = (
        f"{graphs['captures']} captures ({graphs['captures_at_start']} at start-up, "
        f"{graphs.get('captures_while_timed', '?')} while timed), "
        f"{len(graphs['buckets'])} buckets kept"
    )
    if "error" in graphs:
        print(f"CUDA graphs failed: {graphs['error']}; {captures}")
        return
    d, p50 = graphs["docs_per_s"], graphs["p50_ms_1x16"]
    print(
        f"CUDA graphs: {d[GRAPHS]:.1f} vs {d[NO_GRAPHS]:.1f} docs/s without = "
        f"{graphs['over_no_graphs']:.2f}x (paired); 1 x 16 p50 {p50[GRAPHS]:.1f} vs "
        f"{p50[NO_GRAPHS]:.1f} ms; max |Δ raw| {graphs['max_abs_score_diff']:.4f} (score), "
        f"{graphs['max_abs_scheduler_diff']:.4f} (scheduler); {captures}"
    )


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
    parser.add_argument(
        "--model", type=Path, default=None, help="an existing checkpoint instead of --size's"
    )
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--latency-repeats", type=int, default=20, help="1 x 16 requests timed")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "fp8"],
        help="fp8: also run rerankd --quantize fp8 (speed and fidelity vs bf16)",
    )
    parser.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="rerankd's --cuda-graphs; where the engine turns graphs on, also time it "
        "without them, paired (docs/s ratio, captures, max |Δ score|)",
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out the transformers peers")
    args = parser.parse_args()
    device = torch.device(args.device)
    model_dir, pairs = request_from_args(args)
    tokens = sum(map(len, pairs))
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{args.size}, {args.docs} docs, {tokens} tokens ({tokens / args.docs:.0f}/pair, {PREFIX_TOKENS} shared)"
    )
    results, seconds, peak_bytes = {}, {}, {}
    with warnings_logged() as warned:
        rerankd_run, rerankd_16, engine = run_rerankd(
            model_dir, pairs, device, args.max_batch_tokens, args.compile, "none", args.cuda_graphs
        )
        graphs = {"mode": args.cuda_graphs} | measure_graphs(
            engine,
            {"w_gpu": rerankd_run, "1x16": rerankd_16},
            pairs,
            device,
            {"w_gpu": args.repeats, "1x16": args.latency_repeats},
        )
    graphs["warnings"] = [m for m in warned if "CUDA graph" in m or "--cuda-graphs" in m]
    report_graphs(graphs)
    kernel = getattr(engine, "kernel", engine.attention)
    if getattr(engine, "graphs", None) is not None:
        kernel += ", CUDA graphs"
    latency = timed(rerankd_16, device, args.latency_repeats)
    p50_ms = 1000 * statistics.median(latency)
    print(f"rerankd 1 x 16 request: p50 {p50_ms:.1f} ms ({args.latency_repeats} requests)")
    # each peer is built only when its turn comes: two copies of the 4B shape at once need
    # twice the memory for nothing
    engines = {
        f"rerankd (packed, {kernel})": lambda: rerankd_run,
    }
    fp8 = {}
    if args.quantize == "fp8":
        try:
            fp8_run, _, fp8_engine = run_rerankd(
                model_dir,
                pairs,
                device,
                args.max_batch_tokens,
                args.compile,
                "fp8",
                args.cuda_graphs,
            )
        except Exception as exc:  # a refused fp8 engine is a finding; bf16 and peers still run
            fp8 = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            print(f"rerankd --quantize fp8 did not load: {fp8['error']}")
    if args.quantize == "fp8" and not fp8:
        fp8["path"] = fp8_path(device)
        if fp8_refusal(device) is None:
            reference = raw_scores(engine, pairs)
        else:
            reference = fp8_stand_in(fp8_engine, pairs)
        fp8["dtype"] = fp8_engine.dtype
        fp8["fidelity"] = fidelity(reference, raw_scores(fp8_engine, pairs))
        f = fp8["fidelity"]
        print(
            f"fp8 fidelity ({f['documents']} documents; {fp8['path']}): "
            f"max |Δ raw| {f['max_abs_raw_diff']:.4f}, max |Δ probability| "
            f"{f['max_abs_probability_diff']:.4f}, document pairs in the same order "
            f"{f['pairwise_order_agreement']:.1%}, same top document {f['same_top1']}"
        )
        engines[FP8_NAME] = lambda: fp8_run
    engines |= (
        {}
        if args.no_peers
        else {
            "transformers model-card": lambda: run_transformers(
                model_dir, pairs, device, args.batch, False
            ),
            "transformers best-effort": lambda: run_transformers(
                model_dir, pairs, device, args.batch, True
            ),
        }
    )
    for name, build in engines.items():
        fn = build()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(fn, device, args.repeats)
        results[name] = args.docs / statistics.median(times)
        seconds[name] = times
        if device.type == "cuda":
            peak_bytes[name] = torch.cuda.max_memory_allocated(device)
        print(f"{name:32s} {results[name]:9.1f} docs/s  (median of {args.repeats})")
        del fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = next(v for k, v in results.items() if k.startswith("rerankd"))
    ratios = {name: ours / value for name, value in results.items() if name.startswith("trans")}
    for name, ratio in ratios.items():
        print(f"rerankd / {name}: {ratio:.2f}x")
    if FP8_NAME in results:
        fp8["over_bf16"] = results[FP8_NAME] / ours
        print(f"rerankd fp8 / rerankd bf16: {fp8['over_bf16']:.2f}x ({fp8['path']})")
    if args.json:
        summary = {
            "size": args.size,
            "model": str(model_dir),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "docs": args.docs,
            "tokens": tokens,
            "repeats": args.repeats,
            "attention": engine.attention,
            "kernel": kernel,
            "batch_tokens": args.max_batch_tokens or engine.default_batch_tokens,
            "docs_per_s": results,
            "rerankd_over": ratios,
            "seconds": seconds,
            "p50_ms_1x16": p50_ms,
            "peak_cuda_bytes": peak_bytes,
            "fp8": fp8,
            "cuda_graphs": graphs,
        }
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
