"""Command line: `rerankd serve …`. Builds Settings and hands them on; nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rerankd import __version__
from rerankd.settings import add_settings_arguments, settings_from_args


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from rerankd.errors import ModelLoadError
    from rerankd.server import serve

    try:
        return serve(settings)
    except ModelLoadError as exc:
        print(f"rerankd: cannot start: {exc.message}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerankd", description="Fast self-hosted reranking server."
    )
    parser.add_argument("--version", action="version", version=f"rerankd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve a reranker model over HTTP.")
    add_settings_arguments(serve)
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
