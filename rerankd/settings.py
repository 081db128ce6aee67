"""One typed Settings object, built from flags and RERANKD_* environment variables.

Every flag `--some-flag` is also `RERANKD_SOME_FLAG`; a flag beats its variable. Lists
(`--api-key`, `--served-model-name`, `--cors-origin`, `--models`) are repeatable flags or
comma-separated variables; booleans are `--flag/--no-flag` or `true/false`. The object is
passed down explicitly; no other module reads the environment for a server setting. What
others read is not one: `RERANKD_CPU_FLAGS` (ops/cpu.py, a CPU-class override for tests and
benchmarks), the allocator preload (allocator.py, before Settings exist), and other tools'
own variables (HF_HUB_OFFLINE, TORCH_EXTENSIONS_DIR, RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    # --- model ---------------------------------------------------------------------------
    model: str = _opt(DEFAULT_MODEL, "Hugging Face hub id or local checkpoint directory to serve.")
    served_model_name: list[str] = _opt(
        [],
        "Name clients use for the model (repeatable); default: the model id. The hub id and "
        "its last part are always accepted as aliases.",
    )
    models: list[str] = _opt(
        [],
        "Serve several models: SOURCE or NAME=SOURCE (a hub id or directory; repeatable; env: "
        "comma-separated). Replaces --model and --served-model-name; a request picks one with "
        "its `model` field, the first is the default. With --ray: one Serve deployment each.",
    )
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) to download.")
    recipe: str = _opt(
        "auto",
        "Scoring recipe: auto (from the checkpoint's architecture), qwen3-reranker, "
        "qwen3-seq-cls, qwen3-vl-reranker (text and images), bge-gemma, bge-layerwise, "
        "bge-lightweight, "
        "cross-encoder, bi-encoder, mxbai-rerank-v2, st-causal-lm.",
    )
    max_model_len: int | None = _opt(
        None,
        "Cap on tokens per query-document pair (default: the recipe's own limit: 8192 for "
        "Qwen3-Reranker as in its card, L=512 for bge-reranker-v2-gemma, the context of "
        "cross-encoders). Longer pairs are cut at the end of the document.",
    )
    cutoff_layers: int | None = _opt(
        None,
        "Layerwise rerankers (bge-reranker-v2-minicpm-layerwise): the layer whose score head "
        "answers requests that do not send `cutoff_layers` (default: the last layer, as "
        "FlagEmbedding). An earlier layer is faster (no layer past it runs) but its head sits on "
        "a shallower model; the model card's example uses 28 of 40. Ignored by other models.",
    )
    compress_ratio: int | None = _opt(
        None,
        "Token-compressing rerankers (bge-reranker-v2.5-gemma2-lightweight): passage tokens "
        "pooled into one for requests that do not send `compress_ratio` (default: the model "
        "card's 2; 1: no compression, slower, scores as the uncompressed model). Ignored by "
        "other models.",
    )
    compress_layers: list[str] = _opt(
        [],
        "Token-compressing rerankers: the layers before which the passage is pooled, for "
        "requests that do not send `compress_layers` (repeatable or comma-separated; "
        "default: the model card's 24,40). Ignored by other models.",
    )
    # --- engine --------------------------------------------------------------------------
    engine: str = _opt(
        "auto",
        "auto (our packed engine where we have model code, else transformers), packed, or "
        "transformers (generic, padded; for architectures without our own code).",
    )
    dtype: str = _opt(
        "auto",
        "auto (bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32), float32, "
        "bfloat16, float16. float32 matches the reference to 1e-4; bf16 is faster, ~1e-2 off.",
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    quantize: str = _opt(
        "none",
        "none, or int8: int8 linear layers on CPU, activations quantized on the fly, the "
        "rest of the model in --dtype (faster; scores move slightly, see "
        "docs/benchmarks.md for the measured fidelity); or fp8: float8 e4m3 linear layers "
        "on CUDA GPUs of compute capability 8.9+ (Ada, Hopper; weights per output channel, "
        "activations per token; fewer bytes and fp8 tensor cores, scores move slightly: "
        "benchmarks/bench_gpu.py --quantize fp8 prints max |delta| and ranking agreement vs "
        "bf16; refused on CPU and older GPUs). Needs --engine packed/auto.",
    )
    compile: str = _opt(
        "auto",
        "torch.compile the packed models' per-token work (norms, RoPE, residuals, "
        "activations, int8 input quantization): on, off, or auto (= where "
        "benchmarks/bench_compile.py measured it faster for this CPU class (AMX, "
        "AVX512-BF16 such as EPYC Zen 4, AVX512-VNNI such as Ice Lake, AVX2), model family and "
        "precision, the table in "
        "docs/benchmarks.md, e.g. the 0.6B decoder in bf16 on AMX: 22% faster; on CUDA the "
        "bf16 decoders (measured 1.17x on an H200), other CUDA models eager; eager wherever "
        "unmeasured). Compiling happens during "
        "warm-up, before /health turns ready, and falls back to eager if the compiler fails.",
    )
    attention: str = _opt(
        "auto",
        "auto (the fastest attention kernel that agrees with per-sequence SDPA on a probe "
        "batch at start-up: varlen flash attention on CUDA; for bf16 on CPU rerankd's own "
        "AMX kernel, else its AVX512-BF16 one, each kept only if also timed faster than "
        "SDPA on the model's shape (~0.2 s at start-up); SDPA elsewhere), sdpa, or amx / "
        "avx512 (that kernel whatever its speed, if it loads and agrees; SDPA otherwise).",
    )
    cuda_graphs: str = _opt(
        "auto",
        "CUDA graphs for the packed decoders (Qwen3, Qwen2, Gemma) and BERT/XLM-R "
        "cross-encoders on CUDA: each batch is "
        "laid out in one of a few bucketed shapes and replayed from a graph captured on "
        "its bucket's first batch: one launch per forward instead of one per kernel (434 in "
        "a compiled W-GPU request); a bucket pads up to ~6 % more rows. on: capture, "
        "checked against the uncaptured "
        "forward at start-up (off with a warning if they disagree or cannot run); off; auto "
        "(= off until a device run measures them faster, benchmarks/bench_gpu.py "
        "--cuda-graphs). Ignored on CPU.",
    )
    max_batch_tokens: int | None = _opt(
        None,
        "Token budget of one engine batch (default: 8192 on CPU; on CUDA 65536 for the "
        "packed engine, 32768 for engines that compute padding). Larger "
        "batches raise throughput and memory use.",
    )
    # --- HTTP ----------------------------------------------------------------------------
    host: str = _opt("0.0.0.0", "Address to bind; 127.0.0.1 accepts local clients only.")
    port: int = _opt(8000, "TCP port to listen on.")
    api_key: list[str] = _opt(
        [],
        "Require `Authorization: Bearer KEY` on every route but /health and /version "
        "(repeatable; env: comma-separated).",
    )
    api_key_file: str | None = _opt(None, "File with one API key per line (# comments allowed).")
    cors_origin: list[str] = _opt(
        [], "Allow browser calls from this origin (repeatable; `*` for any). Off by default."
    )
    rerank_document_format: str = _opt(
        "object",
        'Shape of results[].document when the request does not say: object ({"text": ...}, '
        "as vLLM, Cohere and Jina answer) or string (as Infinity answers; for litellm's "
        "infinity/ provider). A request with Infinity's `raw_scores` field always gets strings.",
    )
    access_log: bool = _opt(True, "Log one JSON line per request (never the document text).")
    log_level: str = _opt("info", "debug, info, warning or error.")
    # --- limits --------------------------------------------------------------------------
    max_request_bytes: int = _opt(64 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    max_documents: int = _opt(10_000, "Most documents (or pairs) per request (400 beyond).")
    max_query_tokens: int | None = _opt(
        None, "Most tokens in a query (400 beyond); default: whatever fits the model's limit."
    )
    max_queued_tokens: int = _opt(
        2_000_000,
        "Tokens allowed to wait in the queue; beyond it new requests get 429 at once "
        "instead of waiting ever longer.",
    )
    max_concurrent_requests: int = _opt(
        512, "Requests being served at once; beyond it new requests get 429 at once."
    )
    request_timeout: float = _opt(
        300.0, "Seconds a request may take before it is cancelled with a 504."
    )
    # --- images (multimodal rerankers) ------------------------------------------------------
    allow_remote_media: bool = _opt(
        False,
        "Fetch http(s) image URLs sent in requests. Off by default: a request could make the "
        "server reach hosts only it can reach (SSRF); data: URIs are always accepted. When on, "
        "each fetch is bounded by --media-timeout and --max-image-bytes and must answer an "
        "image content type; it blocks one tokenizer thread while it runs.",
    )
    media_timeout: float = _opt(
        10.0, "Seconds one remote image fetch may take (with --allow-remote-media); 400 beyond."
    )
    max_image_bytes: int = _opt(
        20 * 1024 * 1024,
        "Largest encoded image accepted (a data: URI's payload or a download); 400 beyond.",
    )
    max_image_pixels: int = _opt(
        40_000_000,
        "Largest image accepted, in pixels, read from its header before decoding (a few KB "
        "of PNG can claim gigapixels); 400 beyond. Accepted images are then resized to "
        "--image-pixel-budget.",
    )
    max_request_image_pixels: int = _opt(
        400_000_000,
        "Most pixels of all the distinct images of one request together (each is held "
        "decoded, ~3 bytes a pixel, until the request is encoded); 400 beyond.",
    )
    image_pixel_budget: int | None = _opt(
        None,
        "Multimodal rerankers: most pixels an image is resized to before the vision tower "
        "(default: the official code's, 1800 x 32 x 32 for Qwen3-VL-Reranker, each 32x32 "
        "block one token; 768 x 28 x 28 for jina-reranker-m0, each 28x28 block one token). "
        "Lower is faster and sees less detail; scores then differ from the official code's.",
    )
    fault_injection: str | None = _opt(
        None, "Testing only: inject engine faults (raise-on:TEXT, oom-above:N, delay:SECONDS)."
    )
    drain_timeout: float = _opt(
        30.0,
        "On SIGTERM/SIGINT, seconds to let in-flight requests finish before exiting; "
        "requests still running then get a 503.",
    )
    # --- connections ---------------------------------------------------------------------
    max_header_bytes: int = _opt(
        16_384, "Largest request head (request line plus headers) accepted; 431 beyond."
    )
    header_timeout: float = _opt(
        10.0,
        "Seconds a client has to send a complete request head; the connection is closed after.",
    )
    body_timeout: float = _opt(
        30.0,
        "Seconds a client has to send a complete request body; the connection is closed after.",
    )
    keep_alive_timeout: float = _opt(5.0, "Seconds an idle keep-alive connection stays open.")
    max_connections: int = _opt(
        1024, "Open client connections at most; beyond, new ones are refused with a 503."
    )

    # --- Ray (with --ray; see docs/scaling.md) --------------------------------------------
    ray: bool = _opt(
        False,
        "Run on Ray (needs `pip install rerankd[ray]`): the cluster in RAY_ADDRESS, else a "
        "local one started for this run. `serve`: Ray Serve runs the same HTTP app in each "
        "replica behind Serve's proxy on --host/--port; `rerank`: a Ray Data job over a "
        "JSONL or Parquet file or directory, with the same output as without --ray.",
    )
    replicas: int = _opt(1, "Ray: number of Serve replicas (serve) or model actors (rerank).")
    num_cpus_per_replica: float = _opt(1.0, "Ray: CPUs reserved for each replica or actor.")
    num_gpus_per_replica: float = _opt(
        0.0, "Ray: GPUs reserved for each replica or actor (e.g. 1, or 0.5 for two per GPU)."
    )
    min_replicas: int | None = _opt(
        None, "Ray: autoscale replicas between --min-replicas and --max-replicas."
    )
    max_replicas: int | None = _opt(None, "Ray: see --min-replicas.")
    target_ongoing_requests: float = _opt(
        8.0, "Ray Serve autoscaling target: requests in flight per replica."
    )
    max_ongoing_requests: int = _opt(
        32, "Ray Serve: most requests sent to one replica at once; the rest wait in Serve's queue."
    )
    ingress_replicas: int = _opt(
        1,
        "Ray Serve with several --models: replicas of the HTTP ingress, which tokenizes and "
        "routes to one engine deployment per model.",
    )
    num_cpus_per_ingress: float = _opt(
        1.0, "Ray Serve with several --models: CPUs reserved for each ingress replica."
    )
    batch_size: int = _opt(16, "Ray Data (rerank --ray): input rows per actor call.")

    def per_model(self) -> list[Settings]:
        """One Settings per served model: `models` split into `model` + `served_model_name`
        (every other setting shared), or just this one when `models` is empty."""
        if not self.models:
            return [self]
        if self.served_model_name:
            raise ValueError(
                "--served-model-name names the single --model; with --models give each "
                "model its name as NAME=SOURCE"
            )
        specs = []
        for spec in self.models:
            name, sep, source = spec.partition("=")
            if not (sep and name and "/" not in name):  # a path or hub id, unnamed
                name, source = "", spec
            if not source.strip():
                raise ValueError(f"--models {spec!r}: no model after '='")
            specs.append(
                replace(
                    self,
                    model=source.strip(),
                    served_model_name=[name.strip()] if name.strip() else [],
                    models=[],
                )
            )
        names = [s.served_model_name[0] if s.served_model_name else s.model for s in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"--models: each model needs its own name; repeated: {repeated}")
        return specs

    def all_api_keys(self) -> list[str]:
        """Keys from --api-key plus those in --api-key-file.

        Raises ValueError when keys were asked for but none results (an empty or
        comment-only file, `--api-key ""`, `RERANKD_API_KEY=","`): serving without
        authentication because a file came out empty would be a silent security hole.
        """
        keys = [key.strip() for key in self.api_key]
        if any(not key for key in keys):
            raise ValueError("--api-key is empty; give a non-empty key or leave the flag out")
        if self.api_key_file:
            text = Path(self.api_key_file).expanduser().read_text(encoding="utf-8")
            stripped = (line.strip() for line in text.splitlines())
            from_file = [line for line in stripped if line and not line.startswith("#")]
            if not from_file:
                raise ValueError(
                    f"--api-key-file {self.api_key_file!r} holds no key (only blank or # lines); "
                    "refusing to start without authentication"
                )
            keys += from_file
        return keys


# --- flags and environment -----------------------------------------------------------------

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A RERANKD_* variable that cannot be read as its setting's type (the CLI prints it as
    one line and exits 2; a library caller gets an exception, not a SystemExit)."""


def _kind(f) -> str:
    """'list', 'int', 'float', 'bool' or 'str' from the field's annotation string."""
    annotation = str(f.type).replace(" ", "")
    return next((k for k in ("list", "int", "float", "bool") if annotation.startswith(k)), "str")


def _convert(kind: str, raw: str, name: str) -> Any:
    try:
        if kind == "list":
            items = [item.strip() for item in raw.split(",") if item.strip()]
            if not items:  # "," or " , ": set, yet naming nothing (an empty key list!)
                raise ValueError(raw)
            return items
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind}") from exc
    return raw


def _default(f, env: Mapping[str, str]) -> Any:
    name = f"RERANKD_{f.name.upper()}"
    raw = env.get(name)
    if raw is None or raw == "":
        return f.default_factory() if callable(f.default_factory) else f.default
    return _convert(_kind(f), raw, name)


def add_settings_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    env: Mapping[str, str] | None = None,
    only: Sequence[str] | None = None,
) -> None:
    """One flag per Settings field (or per field named in `only`), its default taken from
    RERANKD_* variables: every flag of every subcommand is declared here, once."""
    env = os.environ if env is None else env
    for f in fields(Settings):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        default = _default(f, env)
        # argparse %-formats help strings: a bare % in a help text crashed `serve --help`
        help_text = f"{f.metadata['help']} [env RERANKD_{f.name.upper()}]".replace("%", "%%")
        if kind == "list":
            # flags replace the environment's list rather than extending it
            parser.add_argument(flag, action="append", default=None, help=help_text)
            parser.set_defaults(**{f"_env_{f.name}": default})
        elif kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            convert = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(flag, type=convert, default=default, help=help_text)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from parsed flags; fields a subcommand does not declare keep their defaults
    (or take `overrides`)."""
    values = dict(overrides)
    for f in fields(Settings):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if _kind(f) == "list" and value is None:
            value = getattr(args, f"_env_{f.name}")
        values[f.name] = value
    return Settings(**values)


def parse_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Settings from a `serve` argument list (for tests and embedding)."""
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, env)
    return settings_from_args(parser.parse_args(list(argv)))
