"""Command line: `rerankd serve | rerank | eval`. Builds Settings and hands them on; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from rerankd import __version__
from rerankd.settings import DEFAULT_MODEL, Settings, add_settings_arguments, settings_from_args


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from rerankd.errors import ModelLoadError

    try:
        settings.per_model()  # a bad --models is a usage error, before any loading
        settings.all_api_keys()  # so is an empty key set: never serve unauthenticated by accident
        if settings.rerank_document_format not in ("object", "string"):
            raise ValueError(
                f"--rerank-document-format {settings.rerank_document_format!r}: "
                "use object or string"
            )
    except OSError as exc:  # e.g. an unreadable --api-key-file
        print(f"rerankd: cannot start: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"rerankd: cannot start: {exc}", file=sys.stderr)
        return 2
    if args.ray:
        return _serve_on_ray(args, settings)
    from rerankd.server import serve

    try:
        return serve(settings)
    except ModelLoadError as exc:
        print(f"rerankd: cannot start: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unreadable --api-key-file
        print(f"rerankd: cannot start: {exc}", file=sys.stderr)
        return 1


# --- Ray (rerankd.ray): `serve --ray` and `rerank --ray` ---------------------------------


def _add_ray_arguments(parser: argparse.ArgumentParser, serving: bool) -> None:
    what = "Serve replicas" if serving else "model actors (Ray Data)"
    group = parser.add_argument_group(
        "Ray (with --ray; needs `pip install rerankd[ray]`; see docs/scaling.md)"
    )
    group.add_argument(
        "--ray",
        action="store_true",
        help="Run on Ray: the cluster in RAY_ADDRESS, else a local one started for this run. "
        + (
            "Ray Serve runs the same HTTP app in each replica, behind Serve's proxy on "
            "--host/--port."
            if serving
            else "A Ray Data job over a JSONL or Parquet file/directory (local or a URI "
            "pyarrow opens); the output is the same JSONL as without --ray."
        ),
    )
    group.add_argument("--replicas", type=int, default=1, help=f"Number of {what} (default 1).")
    group.add_argument(
        "--num-cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves for each."
    )
    group.add_argument(
        "--num-gpus-per-replica",
        type=float,
        default=0.0,
        help="GPUs Ray reserves for each (e.g. 1, or 0.5 for two replicas per GPU).",
    )
    group.add_argument(
        "--min-replicas",
        type=int,
        default=None,
        help=f"Autoscale the {what} between --min-replicas and --max-replicas.",
    )
    group.add_argument("--max-replicas", type=int, default=None, help="See --min-replicas.")
    if serving:
        group.add_argument(
            "--target-ongoing-requests",
            type=float,
            default=8.0,
            help="Autoscaling target: requests in flight per replica (default 8).",
        )
        group.add_argument(
            "--max-ongoing-requests",
            type=int,
            default=32,
            help="Most requests Serve sends to one replica at once (default 32); the rest "
            "wait in Serve's queue.",
        )
        group.add_argument(
            "--ingress-replicas",
            type=int,
            default=1,
            help="With several --models: replicas of the HTTP ingress, which tokenizes and "
            "routes to one engine deployment per model (the flags above size each of those; "
            "default 1).",
        )
        group.add_argument(
            "--num-cpus-per-ingress",
            type=float,
            default=1.0,
            help="With several --models: CPUs Ray reserves for each ingress replica (its "
            "tokenization threads; default 1).",
        )
    else:
        group.add_argument(
            "--batch-size",
            type=int,
            default=16,
            help="Input rows per actor call (scored concurrently; default 16).",
        )


def _serve_on_ray(args: argparse.Namespace, settings: Settings) -> int:
    from rerankd.ray import RAY_MISSING

    try:
        from rerankd.ray.serve import ReplicaOptions, run
    except ImportError:
        print(f"rerankd: cannot start: {RAY_MISSING}", file=sys.stderr)
        return 1
    options = ReplicaOptions(
        replicas=args.replicas,
        num_cpus=args.num_cpus_per_replica,
        num_gpus=args.num_gpus_per_replica,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        ingress_replicas=args.ingress_replicas,
        ingress_num_cpus=args.num_cpus_per_ingress,
    )
    try:
        options.validate()
        return run(settings, options)
    except ImportError:
        print(f"rerankd: cannot start: {RAY_MISSING}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"rerankd: cannot start: {exc}", file=sys.stderr)
        return 2


def _rerank_on_ray(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rerankd.ray import RAY_MISSING

    if args.url:
        print("rerankd rerank: --ray and --url cannot be used together", file=sys.stderr)
        return 2
    try:
        from rerankd.ray.data import DataOptions, main
    except ImportError:
        print(f"rerankd rerank: {RAY_MISSING}", file=sys.stderr)
        return 2
    options = DataOptions(
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        num_cpus=args.num_cpus_per_replica,
        num_gpus=args.num_gpus_per_replica,
        batch_size=args.batch_size,
    )
    return main(
        args.input,
        Path(args.output),
        _local_settings(args),
        options,
        top_n=args.top_n or None,
        instruction=args.instruction,
        return_documents=not args.no_documents,
        concurrency=args.concurrency,
        progress=False if args.no_progress else None,
    )


# --- rerank / eval: the engine in this process, or a server (--url) -----------------------


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where to score")
    group.add_argument(
        "--model",
        default=None,
        help="Hub id or local checkpoint directory to load in this process (default: "
        f"{DEFAULT_MODEL}); with --url, the served model name (default: the server's).",
    )
    group.add_argument(
        "--url",
        default=None,
        help="Score on a running rerankd server instead, e.g. http://host:8000.",
    )
    group.add_argument(
        "--api-key",
        default=None,
        help="API key for --url (default: the first of RERANKD_API_KEY, if set).",
    )
    group.add_argument("--instruction", default=None, help="Task instruction for every query.")
    local = parser.add_argument_group("in-process engine (ignored with --url)")
    local.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16.")
    local.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    local.add_argument("--recipe", default="auto", help="Force a scoring recipe (see `serve`).")
    local.add_argument("--max-model-len", type=int, default=None, help="Cap on tokens per pair.")
    local.add_argument(
        "--max-batch-tokens", type=int, default=None, help="Token budget of one engine batch."
    )
    local.add_argument("--revision", default=None, help="Hub revision to download.")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="Queries in flight at once (their pairs share engine batches).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


def _backend_factory(args: argparse.Namespace):
    """An awaitable factory of the offline backend the flags ask for."""
    from rerankd.offline import LocalBackend, RemoteBackend

    if args.url:
        key = args.api_key
        if key is None:
            env_keys = [k for k in os.environ.get("RERANKD_API_KEY", "").split(",") if k.strip()]
            key = env_keys[0].strip() if env_keys else None
        return lambda: RemoteBackend.open(args.url, key, args.model)
    settings = _local_settings(args)
    return lambda: LocalBackend.open(settings)


def _local_settings(args: argparse.Namespace) -> Settings:
    """Settings of the in-process engine from the `rerank`/`eval` flags."""
    return Settings(
        model=args.model or DEFAULT_MODEL,
        dtype=args.dtype,
        device=args.device,
        recipe=args.recipe,
        max_model_len=args.max_model_len,
        max_batch_tokens=args.max_batch_tokens,
        revision=args.revision,
        log_level="warning",
    )


def _rerank(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rerankd.offline import FatalError, rerank_file, summary_line

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    if args.top_n is not None and args.top_n < 0:
        print("rerankd rerank: --top-n must be >= 0", file=sys.stderr)
        return 2
    if args.ray:
        return _rerank_on_ray(args)
    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        print(f"rerankd rerank: no input file {str(input_path)!r}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(
            rerank_file(
                _backend_factory(args),
                input_path,
                output_path,
                top_n=args.top_n or None,
                instruction=args.instruction,
                return_documents=not args.no_documents,
                concurrency=args.concurrency,
                progress=False if args.no_progress else None,
            )
        )
    except FatalError as exc:
        print(f"rerankd rerank: {exc}", file=sys.stderr)
        return 2
    print(summary_line(summary, output_path), file=sys.stderr)
    return 1 if summary.failed else 0


def _eval(args: argparse.Namespace) -> int:
    from rerankd.evaluation import main as eval_main

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    return eval_main(args, _backend_factory(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerankd", description="Fast self-hosted reranking server."
    )
    parser.add_argument("--version", action="version", version=f"rerankd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve a reranker model over HTTP.")
    add_settings_arguments(serve)
    _add_ray_arguments(serve, serving=True)
    serve.set_defaults(handler=_serve)

    rerank = commands.add_parser(
        "rerank",
        help="Rerank a JSONL file offline (resumable).",
        description='Each input line: {"query": str, "documents": [str | {"text": ...}], '
        '"id": optional}. Each output line: {"id", "model", "results", "usage"} as '
        '/v1/rerank answers, or {"id", "line", "error"}. Ids already in the output are '
        "skipped. Exit code 1 if any line failed.",
    )
    rerank.add_argument("--input", required=True, help="JSONL file of queries and documents.")
    rerank.add_argument("--output", required=True, help="JSONL file to append results to.")
    rerank.add_argument("--top-n", type=int, default=None, help="Keep the best N per query.")
    rerank.add_argument(
        "--no-documents", action="store_true", help="Leave `document` out of the results."
    )
    _add_backend_arguments(rerank)
    _add_ray_arguments(rerank, serving=False)
    rerank.set_defaults(handler=_rerank)

    evaluate = commands.add_parser(
        "eval",
        help="Measure nDCG@10, MRR@10 and recall before/after reranking on a BEIR dataset.",
    )
    from rerankd.evaluation import add_eval_arguments

    add_eval_arguments(evaluate)
    _add_backend_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
