"""One typed Settings object, built from flags and RERANKD_* environment variables.

Every flag `--some-flag` is also `RERANKD_SOME_FLAG`; a flag beats its variable. Lists
(`--api-key`, `--served-model-name`) are repeatable flags or comma-separated variables.
The object is passed down explicitly; no module reads the environment on its own.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"


@dataclass
class Settings:
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Hugging Face hub id or local checkpoint directory to serve."},
    )
    host: str = field(
        default="0.0.0.0",
        metadata={"help": "Address to bind; use 127.0.0.1 to accept local clients only."},
    )
    port: int = field(default=8000, metadata={"help": "TCP port to listen on."})
    served_model_name: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Name clients use for the model (repeatable); default: the model id. "
            "The hub id and its last part are always accepted as aliases."
        },
    )
    api_key: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Require `Authorization: Bearer KEY` on every route but /health and /version "
            "(repeatable; env: comma-separated)."
        },
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "Cap on tokens per query-document pair (default: the recipe's own limit, e.g. "
            "8192 for Qwen3-Reranker, 512 for bge-reranker-v2-gemma's L, the context of "
            "cross-encoders). Longer pairs are cut at the end of the document."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 on CUDA and bf16-capable CPUs, else float32), float32, bfloat16, float16. "
            "float32 gives scores equal to the reference to 1e-4; bf16 is faster, ~1e-2 off."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    recipe: str = field(
        default="auto",
        metadata={
            "help": "Scoring recipe: auto (from the checkpoint's architecture), qwen3-reranker, "
            "qwen3-seq-cls, bge-gemma, cross-encoder."
        },
    )
    engine: str = field(
        default="auto",
        metadata={
            "help": "auto (our packed engine where we have model code, else transformers), packed, "
            "or transformers (generic, padded; for architectures without our own code)."
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) to download."}
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one engine batch (default: 8192 on CPU, 32768 on CUDA). Larger "
            "batches raise throughput and memory use."
        },
    )
    max_queued_tokens: int = field(
        default=2_000_000,
        metadata={
            "help": "Tokens allowed to wait in the queue; beyond it new requests get 429 at once "
            "instead of waiting ever longer."
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error."})


def _parse_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _field_type(f) -> str:
    return str(f.type).replace(" ", "")


def _env_default(f, env: Mapping[str, str]) -> Any:
    raw = env.get(f"RERANKD_{f.name.upper()}")
    if raw is None or raw == "":
        return f.default_factory() if callable(f.default_factory) else f.default
    kind = _field_type(f)
    try:
        if kind.startswith("list"):
            return _parse_list(raw)
        if kind.startswith("int"):
            return int(raw)
    except ValueError as exc:
        raise SystemExit(f"RERANKD_{f.name.upper()}={raw!r} is not a valid integer") from exc
    return raw


def add_settings_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None
) -> None:
    """Add one flag per Settings field, its default taken from RERANKD_* variables."""
    env = os.environ if env is None else env
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        default = _env_default(f, env)
        help_text = f"{f.metadata.get('help', '')} [env RERANKD_{f.name.upper()}]"
        if kind.startswith("list"):
            parser.add_argument(flag, action="append", default=None, help=help_text)
            parser.set_defaults(**{f.name: None})
            parser.set_defaults(**{f"_env_{f.name}": default})
        else:
            convert = int if kind.startswith("int") else str
            parser.add_argument(flag, type=convert, default=default, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {}
    for f in fields(Settings):
        value = getattr(args, f.name)
        if _field_type(f).startswith("list") and value is None:
            value = getattr(args, f"_env_{f.name}")
        values[f.name] = value
    return Settings(**values)


def parse_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Settings from a `serve` argument list (for tests and embedding)."""
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, env)
    return settings_from_args(parser.parse_args(list(argv)))
