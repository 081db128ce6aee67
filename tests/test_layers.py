"""The import rules of rerankd/, checked on the AST of every module.

Every `import` and `from … import` counts, at module level and inside functions (a lazy
import is still a dependency). Layers, top to bottom; a module imports only from its own
layer or from layers below it:

    entry points  cli, server, http_server, runtime, offline, evaluation, ray/ (composition)
    api/          HTTP only: validation, dialects, error statuses
    service       tokenizes through the recipe, admits, awaits the scheduler (with inputs:
                  size estimates, image checks, the long-input options)
    scheduler     one queue, batches closed by a token budget
    engine/       Batch -> raw scores; builds our models (engine/factory.py)
    models/       our model code (decoder, encoder, weights, configs)
    ops/          leaf kernels: batch packing, attention, AMX, oneDNN, prepack, int8, CPU flags
    foundation    types, errors, metrics, settings, client, allocator, the package root

Besides:
- recipes/ (prompts, tokenization) import foundation only. service and the entry points use
  them; engine/ and models/ may import recipe *types* only (`RECIPE_TYPES`); no other layer
  imports them.
- Nothing under models/ or ops/ imports engine/ (the layer order says so; checked apart so
  the message names the rule).
- A model module does not type-check engine or ops classes (`isinstance`): a fused module
  declares what it does through an attribute (e.g. `fuses_activation`).
- api/ never imports torch or transformers, nor engine/, models/ or ops/: the HTTP app runs
  without torch (tests/api/test_imports.py checks the same at run time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rerankd"

ENTRY = ("cli", "server", "http_server", "runtime", "offline", "evaluation", "ray")
FOUNDATION = ("types", "errors", "metrics", "settings", "client", "static", "allocator", "")
#: rank of each layer: a module imports only layers of its rank or lower
RANK = {
    **dict.fromkeys(FOUNDATION, 0),
    "ops": 1,
    "models": 2,
    "engine": 3,
    "scheduler": 4,
    "service": 5,
    "inputs": 5,
    "api": 6,
    **dict.fromkeys(ENTRY, 7),
}
#: the only names engine/ and models/ may import from recipes/
RECIPE_TYPES = frozenset({"ScoreHead", "EncodedTwin"})
#: layers that may import recipes/ whole
RECIPE_USERS = frozenset({"service", "inputs", "recipes", *ENTRY})
#: third-party packages the HTTP layer never imports
API_FORBIDDEN = ("torch", "transformers")


def _layer(module: str) -> str:
    """`rerankd.engine.base` -> `engine`; `rerankd.types` -> `types`; `rerankd` -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_of(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the tree; `from
    rerankd import client` counts as importing the module `rerankd.client`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            if node.module == "rerankd":
                for name in names:
                    submodule = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()
                    yield f"rerankd.{name}" if submodule else "rerankd", [], node.lineno
            else:
                yield node.module, names, node.lineno


def _violations(path: Path, root: Path = PACKAGE) -> Iterator[str]:
    """Every broken rule in the module at `path`, one line each."""
    layer = _layer(_module_of(path, root))
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = f"{path.relative_to(root.parent)}"
    for target, names, line in _imports(tree):
        top = target.split(".")[0]
        if layer == "api" and top in API_FORBIDDEN:
            yield f"{where}:{line}: api/ imports {target} (the HTTP layer runs without torch)"
        if top != "rerankd":
            continue
        to = _layer(target)
        if to == layer or target == "rerankd":
            continue
        if to == "recipes":
            if layer in RECIPE_USERS:
                continue
            if layer in ("engine", "models") and names and set(names) <= RECIPE_TYPES:
                continue
            yield f"{where}:{line}: {layer or 'rerankd'} imports {target} {names or ''} (recipes: service and entry points; engine/models: {sorted(RECIPE_TYPES)} only)"
            continue
        if layer == "recipes":
            if RANK[to] > 0:
                yield f"{where}:{line}: recipes import {target} (recipes use foundation only)"
            continue
        if layer in ("models", "ops") and to == "engine":
            yield f"{where}:{line}: {layer}/ imports engine/ ({target})"
            continue
        if layer == "api" and to in ("engine", "models", "ops"):
            yield f"{where}:{line}: api/ imports {target} (the HTTP layer runs without torch)"
            continue
        if RANK[to] > RANK[layer]:
            yield f"{where}:{line}: {layer or 'rerankd'} (rank {RANK[layer]}) imports {target} (rank {RANK[to]}): imports run one way"
    if layer == "models":
        yield from _type_checks(tree, where)


def _type_checks(tree: ast.AST, where: str) -> Iterator[str]:
    """`isinstance(x, C)` in a model module where C came from engine/ or ops/."""
    foreign = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and _layer(node.module) in ("engine", "ops")
        for alias in node.names
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            classes = node.args[1] if len(node.args) > 1 else None
            named = (
                {n.id for n in ast.walk(classes) if isinstance(n, ast.Name)} if classes else set()
            )
            if named & foreign:
                yield f"{where}:{node.lineno}: a model type-checks {sorted(named & foreign)}; declare an attribute on the module instead"


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_layer_is_known():
    unknown = {_layer(_module_of(p)) for p in MODULES} - set(RANK) - {"recipes"}
    assert not unknown, f"add {sorted(unknown)} to RANK in {__file__}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path):
    assert list(_violations(path)) == []


def test_the_checker_catches_each_rule(tmp_path: Path):
    """The rules above are live: one module breaking each is reported."""
    cases = {
        "models/bad.py": "from rerankd.engine.packed_engine import PackedEngine\n",
        "ops/bad.py": "def f():\n    from rerankd.engine import base\n",
        "api/bad.py": "def f():\n    import torch\n",
        "scheduler.py": "from rerankd.service import RerankService\n",
        "engine/bad.py": "from rerankd.recipes import build_recipe\n",
    }
    for name, source in cases.items():
        path = PACKAGE / name
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        fake = tmp_path / "rerankd" / name
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_text(text + source, encoding="utf-8")
    root = tmp_path / "rerankd"
    found = {name: list(_violations(root / name, root)) for name in cases}
    assert all(found.values()), found
    decoder = (
        "from rerankd.ops.quantize import Int8GatedLinear\nisinstance(x, (Int8GatedLinear,))\n"
    )
    assert list(_type_checks(ast.parse(decoder), "models/decoder.py"))
