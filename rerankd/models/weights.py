"""Reading safetensors checkpoints lazily (memory-mapped), single-file or sharded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open


class Checkpoint:
    """Name → tensor access over all safetensors files of a directory, loaded on demand."""

    def __init__(self, files: dict[str, object]) -> None:
        self._files = files  # tensor name → open safe_open handle

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._files[name].get_tensor(name)

    def rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Only the given rows of a 2-D tensor (e.g. two rows of a 150k-row LM head)."""
        if name not in self._files:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        view = self._files[name].get_slice(name)
        return torch.cat([view[row : row + 1] for row in rows])


@contextmanager
def open_checkpoint(model_dir: Path) -> Iterator[Checkpoint]:
    """Open every *.safetensors file of `model_dir` (following a sharded index if present)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [model_dir / name for name in shard_names]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    with ExitStack() as stack:
        files = {}
        for path in paths:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                files[name] = handle
        yield Checkpoint(files)


def strip_prefix(checkpoint: Checkpoint, name: str, prefixes: tuple[str, ...]) -> str:
    """The checkpoint's name for `name` under the first of `prefixes` that has it."""
    for prefix in prefixes:
        if prefix + name in checkpoint:
            return prefix + name
    raise KeyError(f"checkpoint has no tensor {name!r} under any of {prefixes}")
