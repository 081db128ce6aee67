"""Raw scores of every tiny fixture, served by the rerankd of a given source tree: the check
that a refactor changed no score (issue 16: "scores are bit-identical before and after").

    git worktree add /tmp/old <commit>
    python scripts/score_snapshot.py snapshot /tmp/old old.json
    python scripts/score_snapshot.py snapshot . new.json
    python scripts/score_snapshot.py compare old.json new.json

Each fixture (built by this checkout's tests/fixtures, so both trees score the same weights)
is served in float32 and bfloat16 by `python -m rerankd.cli serve` run from the tree, and
three queries are scored against eight documents (a long one, an empty one, CJK) with
`use_activation: false`. Scores travel as JSON numbers (shortest round-trip repr), so equal
JSON means bit-identical floats. The attention kernel is pinned (`--attention`, default
sdpa, through RERANKD_ATTENTION): `auto` picks a kernel by a speed race at start-up, which
may go either way between two runs and move scores by ~1e-6.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.fixtures.paths import FIXTURE_NAMES, fixture_dir  # noqa: E402
from tests.harness import free_port, offline_env, spawn  # noqa: E402

QUERIES = ("what is the capital of China?", "how does gravity work", "机器学习")
DOCUMENTS = (
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "Paris is the capital of France.",
    "北京是中国的首都。",
    "word " * 300,
    "",
    "Tokyo",
    "a b c d e f g",
)
DTYPES = ("float32", "bfloat16")


def snapshot(tree: Path, attention: str = "sdpa") -> dict[str, list[list[float]]]:
    """{"fixture/dtype/query": [[index, raw score], ...] by index}."""
    scores: dict[str, list[list[float]]] = {}
    env = offline_env(
        {"RERANKD_COMPILE": "off", "RERANKD_ATTENTION": attention, "PYTHONPATH": str(tree)}
    )
    with tempfile.TemporaryDirectory(prefix="rerankd-snapshot-") as logs:
        for name in FIXTURE_NAMES:
            for dtype in DTYPES:
                port = free_port()
                cmd = [
                    sys.executable, "-m", "rerankd.cli", "serve", "--host", "127.0.0.1",
                    "--port", str(port), "--model", str(fixture_dir(name)), "--dtype", dtype,
                    "--log-level", "warning",
                ]  # fmt: skip
                # run from the tree, so that `-m rerankd.cli` imports the tree's package
                with spawn(
                    name, cmd, port, Path(logs) / f"{name}-{dtype}.log", env, cwd=tree
                ) as server:
                    server.wait_healthy()
                    for query in QUERIES:
                        body = {
                            "query": query,
                            "documents": list(DOCUMENTS),
                            "use_activation": False,
                        }
                        results = httpx.post(
                            f"{server.url}/v1/rerank", json=body, timeout=120
                        ).json()
                        scores[f"{name}/{dtype}/{query}"] = sorted(
                            [r["index"], r["relevance_score"]] for r in results["results"]
                        )
                print(f"{name} {dtype}: scored", flush=True)
    return scores


def compare(old: dict, new: dict) -> int:
    """Print every differing score; 0 when all are bit-identical."""
    differing = 0
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            differing += 1
            print(f"DIFFERS {key}: {old.get(key)} vs {new.get(key)}")
    total = sum(len(v) for v in old.values())
    print(f"{len(old)} requests, {total} scores: {differing} requests differ")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="score every fixture with the rerankd of TREE")
    snap.add_argument("tree", type=Path)
    snap.add_argument("output", type=Path)
    snap.add_argument(
        "--attention", default="sdpa", help="the attention kernel every server runs (sdpa)"
    )
    cmp_ = sub.add_parser("compare", help="compare two snapshots")
    cmp_.add_argument("old", type=Path)
    cmp_.add_argument("new", type=Path)
    args = parser.parse_args()
    if args.command == "snapshot":
        args.output.write_text(
            json.dumps(snapshot(args.tree.resolve(), args.attention), ensure_ascii=False)
        )
        return 0
    return compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()))


if __name__ == "__main__":
    raise SystemExit(main())
