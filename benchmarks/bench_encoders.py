"""W-ENC benchmark: rerankd vs sentence-transformers (torch, ONNX, OpenVINO) on a cross-encoder.

    python -m benchmarks.bench_encoders                    # every engine whose venv exists
    python -m benchmarks.bench_encoders --layers 24 --rounds 8 --json out.json

The model: the bge-reranker-v2-m3 shape (XLM-R large, `benchmarks/make_encoder.py`), random
seeded weights, `--layers` of its 24 layers. The workload (issue 18, W-ENC): 4 requests, each
1 query × 32 documents of 60–240 words (`benchmarks/workload.py`'s generator; seeds 100..),
``--rounds`` of them (default 4; more rounds draw further seeds).

Engines, each a worker process that loads its model once and then answers requests on
stdin/stdout (JSON lines); the time charged is measured inside the worker, from the texts to
the scores (tokenization included):

- ``rerankd-bf16`` / ``rerankd-int8``: rerankd's own service, in the worker's process, built as
  the server builds it (`Settings` → `runtime.build_service`; ``--dtype bfloat16``, then also
  ``--quantize int8``), scored through `RerankService.rerank`; on request (``--engines``),
  ``rerankd-int8-fp32``: ``--quantize int8 --dtype float32``, int8 linears between float32
  activations as ONNX's dynamic int8 has them, to tell int8's own cost from bf16's;
- ``st-torch-fp32`` / ``st-torch-bf16``: sentence-transformers `CrossEncoder`, torch backend;
- ``st-onnx-fp32`` / ``st-onnx-int8``: the ONNX Runtime backend, exported once by
  sentence-transformers, and its dynamic int8 model from
  `sentence_transformers.backend.export_dynamic_quantized_onnx_model(…, "avx512_vnni")`;
- ``st-openvino``: the OpenVINO backend with its default configuration (the plugin picks
  the inference precision: bf16 on CPUs with AMX/AVX512-BF16; the worker reports it);
- ``infinity``: infinity-emb's `AsyncEmbeddingEngine` (torch engine, default dtype: float32
  on CPU, batch size 32), its `rerank` with raw scores.

The peers run from venvs outside the repository (`benchmarks/peers/setup_encoder_peers.sh`):
sentence-transformers' `[onnx]` and `[openvino]` extras cannot share one environment (nor
this one: they pin other transformers/torch versions), and infinity-emb pins
sentence-transformers 3, so each has its own; an engine whose venv is missing is reported as
skipped.

Interleaving: all workers are loaded first and stay up; every worker but the one measured is
frozen (SIGSTOP: no CPU, spinning thread pools included, warm state kept). Each round gives one
request to every engine, in an order that rotates and reverses from round to round; a warm-up
round (another seed) comes first. docs/s = documents / summed time over the rounds; ratios of
rerankd over each peer are also taken per round (paired, minutes apart at most) and their
median printed.

Fidelity against ``st-torch-fp32`` (the reference), on raw scores (logits, no sigmoid): max
|Δ| over all documents, the fraction of document pairs of a request ordered alike (pairwise
ranking agreement), and the number of requests whose top document is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS_PER_REQUEST = 32
WORDS = (60, 240)
FIRST_SEED = 100  # request r of the run uses seed FIRST_SEED + r; the warm-up uses WARMUP_SEED
WARMUP_SEED = 50
REFERENCE = "st-torch-fp32"
ONNX_INT8_CONFIG = "avx512_vnni"  # ST's preset: the x86 VNNI kernels (what AVX512 CPUs run)

# name -> (venv key, precision class). The venv key "main" is the interpreter running this.
ENGINES: dict[str, tuple[str, str]] = {
    "rerankd-bf16": ("main", "bf16"),
    "rerankd-int8": ("main", "int8"),
    "rerankd-int8-fp32": ("main", "int8"),
    "st-torch-fp32": ("main", "fp32"),
    "st-torch-bf16": ("main", "bf16"),
    "st-onnx-fp32": ("onnx", "fp32"),
    "st-onnx-int8": ("onnx", "int8"),
    "st-openvino": ("openvino", "plugin default"),
    "infinity": ("infinity", "fp32"),
}
#: run unless `--engines` names others: all but the diagnostic rerankd-int8-fp32
DEFAULT_ENGINES = [name for name in ENGINES if name != "rerankd-int8-fp32"]
DEFAULT_VENVS = {
    "onnx": "~/.cache/rerankd-bench/enc-peers-onnx",
    "openvino": "~/.cache/rerankd-bench/enc-peers-ov",
    "infinity": "~/.cache/rerankd-bench/enc-peers-infinity",
}


def _log(msg: str) -> None:
    print(f"[bench_encoders] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Worker side: runs in the engine's venv, so only the standard library at module level
# ---------------------------------------------------------------------------------------------


class _Scorer:
    """`load()` once, then `raw(query, documents) -> list[float]` (logits, no activation)."""

    info: dict

    def raw(self, query: str, documents: list[str]) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Rerankd(_Scorer):
    def __init__(self, model: str, quantize: str, dtype: str) -> None:
        import asyncio

        from rerankd.runtime import build_service
        from rerankd.settings import Settings

        settings = Settings(model=model, dtype=dtype, quantize=quantize)
        self.loop = asyncio.new_event_loop()
        self.service = build_service(settings)
        self.loop.run_until_complete(self.service.start())
        self.model = self.service.resolve(None)
        engine = self.model.scheduler.engine if hasattr(self.model, "scheduler") else None
        self.info = {
            "engine": getattr(engine, "name", "?"),
            "dtype": getattr(engine, "dtype", "?"),
            "attention": getattr(engine, "attention", "?"),
            "compiled": getattr(engine, "compiled", "?"),
        }

    def raw(self, query, documents):
        scored = self.loop.run_until_complete(self.service.rerank(self.model, query, documents))
        return list(scored.raw_scores)

    def close(self) -> None:
        self.loop.run_until_complete(self.service.stop())


class _SentenceTransformers(_Scorer):
    def __init__(self, model: str, backend: str, variant: str, cache: str) -> None:
        import sentence_transformers as st
        import torch
        from sentence_transformers import CrossEncoder

        self.identity = torch.nn.Identity()
        kwargs: dict = {"device": "cpu"}
        self.info = {"sentence_transformers": st.__version__, "torch": torch.__version__}
        if backend == "torch":
            if variant == "bf16":
                kwargs["model_kwargs"] = {"dtype": torch.bfloat16}
            self.ce = CrossEncoder(model, **kwargs)
        elif backend == "onnx":
            self.ce = self._onnx(CrossEncoder, model, variant, Path(cache), kwargs)
        elif backend == "openvino":
            self.ce = self._openvino(CrossEncoder, model, Path(cache), kwargs)
        else:
            raise ValueError(backend)

    def _onnx(self, CrossEncoder, model, variant, cache: Path, kwargs):
        import onnxruntime

        self.info["onnxruntime"] = onnxruntime.__version__
        if not (cache / "onnx" / "model.onnx").is_file():
            _log(f"exporting ONNX to {cache}")
            CrossEncoder(model, backend="onnx", **kwargs).save_pretrained(str(cache))
        if variant == "fp32":
            return CrossEncoder(str(cache), backend="onnx", **kwargs)
        name = f"model_qint8_{ONNX_INT8_CONFIG}.onnx"
        if not (cache / "onnx" / name).is_file():
            from sentence_transformers.backend import export_dynamic_quantized_onnx_model

            _log(f"quantizing ONNX ({ONNX_INT8_CONFIG}) in {cache}")
            export_dynamic_quantized_onnx_model(
                CrossEncoder(str(cache), backend="onnx", **kwargs), ONNX_INT8_CONFIG, str(cache)
            )
        return CrossEncoder(
            str(cache), backend="onnx", model_kwargs={"file_name": f"onnx/{name}"}, **kwargs
        )

    def _openvino(self, CrossEncoder, model, cache: Path, kwargs):
        import openvino

        self.info["openvino"] = openvino.__version__
        if not (cache / "openvino" / "openvino_model.xml").is_file():
            _log(f"exporting OpenVINO IR to {cache}")
            CrossEncoder(model, backend="openvino", **kwargs).save_pretrained(str(cache))
        ce = CrossEncoder(str(cache), backend="openvino", **kwargs)
        self.info["inference_precision"] = _openvino_precision(ce)
        return ce

    def raw(self, query, documents):
        scores = self.ce.predict(
            [(query, d) for d in documents],
            batch_size=DOCS_PER_REQUEST,
            activation_fn=self.identity,
            show_progress_bar=False,
        )
        return [float(s) for s in scores]


class _Infinity(_Scorer):
    """infinity-emb's Python engine (`AsyncEmbeddingEngine`, torch backend, its default
    dtype: float32 on CPU), scored through its `rerank`, as its server's /rerank does."""

    def __init__(self, model: str) -> None:
        import asyncio

        import infinity_emb
        from infinity_emb import AsyncEmbeddingEngine, EngineArgs

        self.loop = asyncio.new_event_loop()
        args = EngineArgs(
            model_name_or_path=model,
            engine="torch",
            device="cpu",
            batch_size=DOCS_PER_REQUEST,
            model_warmup=False,  # its own warm-up runs 2,048-token batches (minutes here)
        )
        self.engine = AsyncEmbeddingEngine.from_args(args)
        self.loop.run_until_complete(self.engine.astart())
        self.info = {"infinity_emb": infinity_emb.__version__, "dtype": str(args.dtype)}

    def raw(self, query, documents):
        results, _ = self.loop.run_until_complete(
            self.engine.rerank(query=query, docs=documents, raw_scores=True)
        )
        raw = [0.0] * len(documents)
        for r in results:  # sorted by score: back to document order
            raw[r.index] = float(r.relevance_score)
        return raw

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.astop())


def _openvino_precision(ce) -> str:
    """INFERENCE_PRECISION_HINT of the compiled OpenVINO model inside `ce` (optimum-intel
    keeps it as the model's `request`, an `openvino.CompiledModel`)."""
    for module in ce.modules():
        for attr in ("auto_model", "model"):
            request = getattr(getattr(module, attr, None), "request", None)
            if request is not None and hasattr(request, "get_property"):
                try:
                    hint = str(request.get_property("INFERENCE_PRECISION_HINT"))
                    return hint.removeprefix("<Type: '").removesuffix("'>")
                except Exception as exc:  # property missing in this OpenVINO
                    return f"unknown ({exc})"
    return "unknown"


def worker(name: str, model: str, cache: str) -> None:
    """Load engine `name`, print {"ready": info}, then answer one JSON line per request."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    started = time.perf_counter()
    if name.startswith("rerankd-"):
        quantize = "int8" if "-int8" in name else "none"
        dtype = "float32" if name.endswith("fp32") else "bfloat16"
        scorer: _Scorer = _Rerankd(model, quantize, dtype)
    elif name == "infinity":
        scorer = _Infinity(model)
    else:
        _, backend, *variant = name.split("-", 2)  # st-openvino has no variant
        variant = variant[0] if variant else "default"
        scorer = _SentenceTransformers(model, backend, variant, cache)
    scorer.info["load_s"] = round(time.perf_counter() - started, 1)
    out.write(json.dumps({"ready": scorer.info}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        begun = time.perf_counter()
        raw = scorer.raw(req["query"], req["documents"])
        elapsed = time.perf_counter() - begun
        out.write(json.dumps({"raw": raw, "seconds": elapsed}) + "\n")
        out.flush()
    scorer.close()


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the forked worker: SIGKILL when the harness dies, however it dies. A frozen
    (SIGSTOPped) worker cannot act on anything else, and was left holding gigabytes."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Worker:
    """A worker process kept frozen (SIGSTOP) except while it is being measured."""

    def __init__(self, name: str, python: str, model: Path, cache: Path):
        self.name = name
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
        env["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"  # infinity-emb's telemetry
        cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--model", str(model)]
        cmd += ["--cache", str(cache)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            cwd=REPO,
            preexec_fn=_die_with_parent,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{name}: worker exited while loading (rc {self.proc.wait()})")
        self.info = json.loads(line)["ready"]
        self.freeze()

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def score(self, query: str, documents: list[str]) -> tuple[list[float], float]:
        self.thaw()
        try:
            self.proc.stdin.write(json.dumps({"query": query, "documents": documents}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        finally:
            self.freeze()
        if not line:
            raise RuntimeError(f"{self.name}: worker died (rc {self.proc.poll()})")
        reply = json.loads(line)
        return reply["raw"], reply["seconds"]

    def close(self) -> None:
        self.thaw()
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def requests_for(rounds: int):
    from benchmarks.workload import sweep_request

    kw = dict(n_docs=DOCS_PER_REQUEST)
    return sweep_request(seed=WARMUP_SEED, **kw), [
        sweep_request(seed=FIRST_SEED + r, **kw) for r in range(rounds)
    ]


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's engine order: rotated by r, reversed on odd rounds."""
    k = r % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if r % 2 else order


def pair_agreement(a: list[float], b: list[float]) -> float:
    """Fraction of document pairs (i < j) that `a` and `b` order alike (ties count as alike
    only when both tie)."""
    same = total = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            total += 1
            sa, sb = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            same += sa == sb
    return same / total if total else 1.0


def cpu_description() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(
                    f
                    for f in (
                        "avx2",
                        "avx512f",
                        "avx512_vnni",
                        "avx512_bf16",
                        "amx_bf16",
                        "amx_int8",
                    )
                    if f in flags
                )
                break
    except OSError:
        pass
    info["loadavg"] = os.getloadavg()
    return info


def token_stats(model: Path, reqs) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lens, words, doc_tokens = [], 0, 0
    for req in reqs:
        enc = tok([req.query] * len(req.documents), list(req.documents))["input_ids"]
        lens += [len(ids) for ids in enc]
        for d in req.documents:
            words += len(d.split())
            doc_tokens += len(tok(d, add_special_tokens=False)["input_ids"])
    return {
        "tokens_per_pair": statistics.fmean(lens),
        "min_pair_tokens": min(lens),
        "max_pair_tokens": max(lens),
        "total_tokens": sum(lens),
        "tokens_per_word": doc_tokens / words,
    }


def run(args) -> dict:
    from benchmarks.make_encoder import ensure_encoder, non_embedding_params

    model = ensure_encoder(args.layers)
    _log(f"checkpoint: {model}")
    warmup, reqs = requests_for(args.rounds)
    stats = token_stats(model, reqs)
    _log(
        f"W-ENC: {len(reqs)} requests x {DOCS_PER_REQUEST} docs, "
        f"{stats['tokens_per_pair']:.0f} tokens/pair ({stats['min_pair_tokens']}-"
        f"{stats['max_pair_tokens']}), {stats['tokens_per_word']:.2f} tokens/word"
    )
    venvs = {"main": sys.executable}
    for key, default in DEFAULT_VENVS.items():
        venv = Path(getattr(args, f"{key}_venv") or default).expanduser()
        venvs[key] = str(venv / "bin" / "python")
    workers: dict[str, Worker] = {}
    skipped: dict[str, str] = {}
    names = [n for n in args.engines.split(",") if n]
    if REFERENCE not in names:
        names.insert(0, REFERENCE)  # fidelity needs it
    try:
        for name in names:
            if name not in ENGINES:
                raise SystemExit(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
            python = venvs[ENGINES[name][0]]
            if not Path(python).is_file():
                skipped[name] = f"no venv ({python}): run benchmarks/peers/setup_encoder_peers.sh"
                _log(f"{name}: skipped, {skipped[name]}")
                continue
            cache = Path(f"{model}-{ENGINES[name][0]}")
            _log(f"{name}: loading")
            try:
                workers[name] = Worker(name, python, model, cache)
            except (RuntimeError, json.JSONDecodeError) as exc:
                skipped[name] = str(exc)
                _log(f"{name}: failed to load: {exc}")
                continue
            _log(f"{name}: ready {workers[name].info}")
        live = list(workers)
        for w in range(args.warmup):
            for name in round_order(live, w):
                _, sec = workers[name].score(warmup.query, list(warmup.documents))
                _log(f"warm-up {w}: {name} {sec:.2f}s")
        seconds: dict[str, list[float]] = {n: [] for n in live}
        raws: dict[str, list[list[float]]] = {n: [] for n in live}
        for r, req in enumerate(reqs):
            load = os.getloadavg()[0]
            for name in round_order(live, r):
                raw, sec = workers[name].score(req.query, list(req.documents))
                seconds[name].append(sec)
                raws[name].append(raw)
            line = "  ".join(f"{n} {DOCS_PER_REQUEST / seconds[n][-1]:.1f}" for n in live)
            _log(f"round {r} (load {load:.1f}) docs/s: {line}")
    finally:
        for w in workers.values():
            w.close()
    n_docs = DOCS_PER_REQUEST * len(reqs)
    flops = 2 * non_embedding_params(args.layers) * stats["total_tokens"]
    results = {}
    for name in live:
        ref = raws.get(REFERENCE)
        fid = {}
        if ref and name != REFERENCE:
            fid = {
                "max_abs_diff": max(
                    abs(a - b)
                    for ra, rb in zip(raws[name], ref, strict=True)
                    for a, b in zip(ra, rb, strict=True)
                ),
                "pair_agreement": statistics.fmean(
                    pair_agreement(ra, rb) for ra, rb in zip(raws[name], ref, strict=True)
                ),
                "same_top": sum(
                    max(range(len(ra)), key=ra.__getitem__)
                    == max(range(len(rb)), key=rb.__getitem__)
                    for ra, rb in zip(raws[name], ref, strict=True)
                ),
            }
        total = sum(seconds[name])
        results[name] = {
            "precision": ENGINES[name][1],
            "docs_per_s": n_docs / total,
            "seconds": seconds[name],
            "linear_tflops": flops / total / 1e12,
            "info": workers[name].info,
            **fid,
        }
    ratios = {}
    for ours in (n for n in live if n.startswith("rerankd-")):
        for peer in (n for n in live if not n.startswith("rerankd-")):
            per_round = [p / o for o, p in zip(seconds[ours], seconds[peer], strict=True)]
            ratios[f"{ours}/{peer}"] = {
                "total": results[ours]["docs_per_s"] / results[peer]["docs_per_s"],
                "median_paired": statistics.median(per_round),
            }
    return {
        "cpu": cpu_description(),
        "layers": args.layers,
        "model": str(model),
        "workload": {"requests": len(reqs), "docs_per_request": DOCS_PER_REQUEST, **stats},
        "results": results,
        "ratios": ratios,
        "skipped": skipped,
        "command": " ".join(
            [Path(sys.executable).name, "-m", "benchmarks.bench_encoders", *sys.argv[1:]]
        ),
    }


def report(out: dict) -> None:
    cpu = out["cpu"]
    print(f"\nW-ENC, bge-reranker-v2-m3 shape, {out['layers']} of 24 layers, random weights")
    print(
        f"CPU: {cpu.get('model', '?')}, {cpu['cores']} cores, flags {' '.join(cpu.get('flags', []))}"
        f"; load average at the end {cpu['loadavg'][0]:.2f}"
    )
    w = out["workload"]
    print(
        f"workload: {w['requests']} x 1 query x {w['docs_per_request']} docs, "
        f"{w['tokens_per_pair']:.0f} tokens/pair ({w['min_pair_tokens']}-{w['max_pair_tokens']}), "
        f"{w['tokens_per_word']:.2f} tokens/word\n"
    )
    res = out["results"]
    print(
        f"{'engine':<18} {'precision':<15} {'docs/s':>7} {'TFLOP/s':>8} "
        f"{'max|Δ| vs fp32':>15} {'pair agree':>10} {'same top':>8}"
    )
    for name, r in res.items():
        fid = (
            f"{r['max_abs_diff']:>15.4f} {r['pair_agreement']:>10.3f} "
            f"{r['same_top']:>4}/{len(r['seconds'])}"
            if "max_abs_diff" in r
            else f"{'(reference)':>15}"
        )
        prec = r["precision"]
        if "inference_precision" in r["info"]:
            prec = f"{r['info']['inference_precision']}"
        print(f"{name:<18} {prec:<15} {r['docs_per_s']:>7.2f} {r['linear_tflops']:>8.2f} {fid}")
    print("\nratios (rerankd over peer: total docs/s; median of per-round ratios)")
    for key, r in out["ratios"].items():
        print(f"  {key:<32} {r['total']:>5.2f}x  {r['median_paired']:>5.2f}x")
    for name, why in out["skipped"].items():
        print(f"skipped {name}: {why}")
    floats = [
        n for n, r in res.items() if not n.startswith("rerankd-") and r["precision"] != "int8"
    ]
    if "rerankd-bf16" in res and floats:
        best = max(floats, key=lambda n: res[n]["docs_per_s"])
        ratio = res["rerankd-bf16"]["docs_per_s"] / res[best]["docs_per_s"]
        print(f"\ntarget rerankd bf16 >= 1.5x best float peer ({best}): {ratio:.2f}x "
              f"{'met' if ratio >= 1.5 else 'MISSED'}")  # fmt: skip
    if "rerankd-int8" in res and "st-onnx-int8" in res:
        ratio = res["rerankd-int8"]["docs_per_s"] / res["st-onnx-int8"]["docs_per_s"]
        print(f"target rerankd int8 >= 1.3x ONNX int8: {ratio:.2f}x "
              f"{'met' if ratio >= 1.3 else 'MISSED'}")  # fmt: skip
    print(f"\ncommand: {out['command']}")


#: bar colours by precision (rerankd's bars are outlined)
_COLOURS = {"fp32": "#9e9e9e", "bf16": "#4c72b0", "int8": "#dd8452"}


def plot(out: dict, path: Path) -> None:
    """docs/s per engine, rerankd first, coloured by precision, with each bar's max |Δ|
    against torch fp32: the W-ENC figure of docs/benchmarks.md."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib missing (pip install matplotlib): no plot")
        return
    res = out["results"]
    names = sorted(res, key=lambda n: (not n.startswith("rerankd-"), -res[n]["docs_per_s"]))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, name in enumerate(names):
        r = res[name]
        precision = r["info"].get("inference_precision", r["precision"])  # OpenVINO's pick
        precision = {"bfloat16": "bf16", "float32": "fp32"}.get(precision, precision)
        ax.bar(
            i, r["docs_per_s"], color=_COLOURS.get(precision, "#55a868"),
            edgecolor="black" if name.startswith("rerankd-") else "none", linewidth=1.5,
        )  # fmt: skip
        fid = f"Δ {r['max_abs_diff']:.3f}" if "max_abs_diff" in r else "reference"
        ax.annotate(f"{r['docs_per_s']:.1f}\n{fid}", (i, r["docs_per_s"]), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("documents / s (higher is better)")
    cpu = out["cpu"]
    ax.set_title(
        f"W-ENC: bge-reranker-v2-m3 shape, {out['layers']} of 24 layers, "
        f"{out['workload']['requests']} x 32 docs; {cpu['cores']}-core {cpu.get('model', '?')}",
        fontsize=9,
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    ax.legend(handles, list(_COLOURS), title="precision", fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _log(f"plot written: {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=24, help="layers of the 24 to build (default 24)")
    p.add_argument("--rounds", type=int, default=4, help="measured requests per engine (4)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests per engine (1)")
    p.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help="comma-separated engine names (default: all but rerankd-int8-fp32)",
    )
    p.add_argument("--onnx-venv", help=f"default {DEFAULT_VENVS['onnx']}")
    p.add_argument("--openvino-venv", help=f"default {DEFAULT_VENVS['openvino']}")
    p.add_argument("--infinity-venv", help=f"default {DEFAULT_VENVS['infinity']}")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write docs/s per engine as a PNG here")
    p.add_argument("--replot", metavar="JSON", help="only re-print and plot a saved --json file")
    # internal: a worker process
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.cache)
        return 0
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    out = json.loads(Path(args.replot).read_text()) if args.replot else run(args)
    report(out)
    if args.plot:
        plot(out, Path(args.plot))
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
