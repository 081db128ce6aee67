"""Command line: `rerankd serve | rerank | eval`. Builds Settings and hands them on; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from rerankd import __version__
from rerankd.allocator import allocator_in_use, find_tcmalloc, reexec_with_tcmalloc
from rerankd.settings import (
    DEFAULT_MODEL,
    Settings,
    SettingsError,
    add_settings_arguments,
    settings_from_args,
)


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
        from rerankd.http_server import ConnectionLimits

        ConnectionLimits.from_settings(settings)  # and so is a bad connection limit
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
    _log_allocator()  # after the usage checks: a refused start prints its one line only
    if settings.ray:
        return _serve_on_ray(settings)
    from rerankd.server import serve

    try:
        return serve(settings)
    except ModelLoadError as exc:
        print(f"rerankd: cannot start: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unreadable --api-key-file
        print(f"rerankd: cannot start: {exc}", file=sys.stderr)
        return 1


def _log_allocator() -> None:
    """Which malloc serves (rerankd.allocator); where it is the C library's, how to do better."""
    allocator = allocator_in_use()
    log = logging.getLogger("rerankd.allocator")
    if allocator != "system":
        log.info("memory allocator: %s", allocator)
    elif sys.platform.startswith("linux") and find_tcmalloc() is None:
        log.info(
            "memory allocator: the C library's; with tcmalloc installed (Debian/Ubuntu: "
            "libtcmalloc-minimal4) rerankd uses it: faster on CPU, less memory"
        )


# --- Ray (rerankd.ray): `serve --ray` and `rerank --ray` ---------------------------------

#: Settings fields that are Ray's and that `rerank --ray` takes (`serve` takes every field
#: but batch_size)
_RAY_COMMON = (
    "ray",
    "replicas",
    "num_cpus_per_replica",
    "num_gpus_per_replica",
    "min_replicas",
    "max_replicas",
)
_RAY_DATA = (*_RAY_COMMON, "batch_size")


def _serve_on_ray(settings: Settings) -> int:
    from rerankd.ray import RAY_MISSING

    try:
        from rerankd.ray.options import ReplicaOptions
        from rerankd.ray.serve import run
    except ImportError:
        print(f"rerankd: cannot start: {RAY_MISSING}", file=sys.stderr)
        return 1
    options = ReplicaOptions(
        replicas=settings.replicas,
        num_cpus=settings.num_cpus_per_replica,
        num_gpus=settings.num_gpus_per_replica,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        target_ongoing_requests=settings.target_ongoing_requests,
        max_ongoing_requests=settings.max_ongoing_requests,
        ingress_replicas=settings.ingress_replicas,
        ingress_num_cpus=settings.num_cpus_per_ingress,
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
    settings = _local_settings(args)
    options = DataOptions(
        replicas=settings.replicas,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        num_cpus=settings.num_cpus_per_replica,
        num_gpus=settings.num_gpus_per_replica,
        batch_size=settings.batch_size,
    )
    return main(
        args.input,
        Path(args.output),
        settings,
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
    # --api-key: with --url, the first key is sent (the same flag and variable as `serve`'s)
    add_settings_arguments(group, only=["api_key"])
    group.add_argument("--instruction", default=None, help="Task instruction for every query.")
    local = parser.add_argument_group("in-process engine (ignored with --url)")
    add_settings_arguments(local, only=_LOCAL_ENGINE)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="Queries in flight at once (their pairs share engine batches).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


#: Settings fields of the in-process engine that `rerank` and `eval` take
_LOCAL_ENGINE = (
    "dtype",
    "device",
    "recipe",
    "max_model_len",
    "max_batch_tokens",
    "revision",
    "engine",
    "quantize",
    "compile",
    "attention",
    "cuda_graphs",
)


def _backend_factory(args: argparse.Namespace):
    """An awaitable factory of the offline backend the flags ask for."""
    from rerankd.offline import LocalBackend, RemoteBackend

    if args.url:
        keys = args.api_key if args.api_key is not None else args._env_api_key
        key = keys[0] if keys else None
        return lambda: RemoteBackend.open(args.url, key, args.model)
    settings = _local_settings(args)
    return lambda: LocalBackend.open(settings)


def _local_settings(args: argparse.Namespace) -> Settings:
    """Settings of the in-process engine from the `rerank`/`eval` flags."""
    return settings_from_args(
        args, model=args.model or DEFAULT_MODEL, api_key=[], log_level="warning"
    )


def _rerank(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rerankd.offline import FatalError, rerank_file, summary_line

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    if args.top_n is not None and args.top_n < 0:
        print("rerankd rerank: --top-n must be >= 0", file=sys.stderr)
        return 2
    if getattr(args, "ray", False):
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
    add_settings_arguments(serve, only=[f.name for f in fields(Settings) if f.name != "batch_size"])
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
    add_settings_arguments(rerank.add_argument_group("Ray (see docs/scaling.md)"), only=_RAY_DATA)
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
    try:
        parser = build_parser()  # reads RERANKD_* defaults: a bad one is a usage error
    except SettingsError as exc:
        print(f"rerankd: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if argv is None and args.handler in (_serve, _rerank):  # the command itself, not a test
        try:
            reexec_with_tcmalloc()  # returns where it does not re-execute
        except ValueError as exc:
            print(f"rerankd: {exc}", file=sys.stderr)
            return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
