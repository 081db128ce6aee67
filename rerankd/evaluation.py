"""`rerankd eval`: retrieval quality before and after reranking, on a BEIR-format dataset.

A dataset directory holds `corpus.jsonl` (`{"_id", "title", "text"}`), `queries.jsonl`
(`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id, corpus-id, score`, with a header).
First-stage candidates come from a run file (TREC `qid Q0 docid rank score tag`, or
`qid docid score` TSV) or from BM25 (the `rank-bm25` package, extra `eval`). The top `k`
candidates of each query are reranked; nDCG@10, MRR@10 and Recall@{10,k} are reported for
both rankings.

Metrics follow trec_eval (and so BEIR, which calls it through pytrec_eval): a document is
relevant when its qrel is > 0; nDCG uses the qrel as a linear gain and log2(rank + 1) as
the discount, with the ideal ranking built from all of the query's judged documents; a
query without any relevant document is left out; a query with no candidates scores 0.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: qid → ranked docids, best first
Run = dict[str, list[str]]
#: qid → {docid: graded relevance}
Qrels = dict[str, dict[str, int]]

DEFAULT_TOP_K = 100


# --- metrics (one query) -----------------------------------------------------------------


def ndcg_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Normalized DCG at k with linear gains (trec_eval's ndcg_cut)."""
    dcg = sum(
        judged.get(doc, 0) / math.log2(rank + 2)
        for rank, doc in enumerate(ranking[:k])
        if judged.get(doc, 0) > 0
    )
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """1 / rank of the first relevant document within the top k (0 if none)."""
    for rank, doc in enumerate(ranking[:k], start=1):
        if judged.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    relevant = {doc for doc, g in judged.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def evaluate(run: Run, qrels: Qrels, recall_cutoffs: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@k over the queries with a relevant document."""
    names = ["nDCG@10", "MRR@10", *(f"Recall@{k}" for k in recall_cutoffs)]
    totals = dict.fromkeys(names, 0.0)
    evaluated = [q for q, judged in qrels.items() if any(g > 0 for g in judged.values())]
    for qid in evaluated:
        ranking, judged = run.get(qid, []), qrels[qid]
        totals["nDCG@10"] += ndcg_at_k(ranking, judged, 10)
        totals["MRR@10"] += mrr_at_k(ranking, judged, 10)
        for k in recall_cutoffs:
            totals[f"Recall@{k}"] += recall_at_k(ranking, judged, k)
    return {name: total / len(evaluated) if evaluated else 0.0 for name, total in totals.items()}


# --- data --------------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    corpus: dict[str, str]  # docid → "title text"
    queries: dict[str, str]
    qrels: Qrels


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_beir(directory: Path, split: str = "test") -> Dataset:
    directory = Path(directory)
    for needed in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (directory / needed).is_file():
            raise ValueError(f"{directory} is not a BEIR dataset: {needed} is missing")
    corpus = {}
    for doc in _read_jsonl(directory / "corpus.jsonl"):
        title, text = doc.get("title") or "", doc.get("text") or ""
        corpus[str(doc["_id"])] = f"{title} {text}".strip()
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(directory / "queries.jsonl")}
    qrels: Qrels = {}
    with open(directory / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        for row in rows:
            if len(row) < 3 or row[0] == "query-id":
                continue
            qid, docid, score = row[0], row[1], int(row[2])
            if qid in queries:
                qrels.setdefault(qid, {})[docid] = score
    return Dataset(directory.name, corpus, queries, qrels)


def load_run(path: Path) -> Run:
    """A run file: TREC (`qid Q0 docid rank score tag`) or `qid docid score`, any order."""
    scored: dict[str, list[tuple[float, int, str]]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 6:
                qid, docid, score = parts[0], parts[2], parts[4]
            elif len(parts) == 3:
                qid, docid, score = parts
            else:
                raise ValueError(f"{path}:{number}: expected 6 (TREC) or 3 columns")
            try:
                value = float(score)
            except ValueError:
                if number == 1:
                    continue  # a header line
                raise ValueError(f"{path}:{number}: score {score!r} is not a number") from None
            scored.setdefault(qid, []).append((value, number, docid))
    # best score first; ties keep file order
    return {
        q: [d for _, _, d in sorted(rows, key=lambda r: (-r[0], r[1]))]
        for q, rows in scored.items()
    }


_WORD = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_run(dataset: Dataset, k: int) -> Run:
    """The top k documents of each query by BM25 (Okapi; rank-bm25's defaults)."""
    try:
        from rank_bm25 import BM25Okapi
    except ImportError as exc:
        raise RuntimeError(
            "BM25 candidates need the rank-bm25 package: pip install 'rerankd[eval]', "
            "or pass first-stage results with --candidates run.tsv"
        ) from exc
    ids = list(dataset.corpus)
    bm25 = BM25Okapi([_tokens(dataset.corpus[d]) for d in ids])
    run: Run = {}
    for qid in dataset.qrels:
        scores = bm25.get_scores(_tokens(dataset.queries[qid]))
        order = sorted(range(len(ids)), key=lambda i: (-scores[i], i))[:k]
        run[qid] = [ids[i] for i in order]
    return run


# --- reranking ---------------------------------------------------------------------------


async def rerank_run(
    backend: Any,
    dataset: Dataset,
    run: Run,
    top_k: int,
    instruction: str | None = None,
    concurrency: int = 4,
    progress: bool | None = None,
) -> tuple[Run, int]:
    """Rerank each query's top_k candidates (the rest keep their order after them).

    Returns the new run and the number of documents scored."""
    from tqdm import tqdm

    limit = asyncio.Semaphore(max(1, concurrency))
    qids = [q for q in dataset.qrels if run.get(q)]
    bar = tqdm(total=len(qids), unit="query", disable=None if progress is None else not progress)
    reranked: Run = {}
    scored = 0

    async def one(qid: str) -> None:
        nonlocal scored
        head = [d for d in run[qid][:top_k] if d in dataset.corpus]
        texts = [dataset.corpus[d] for d in head]
        async with limit:
            got = await backend.rerank(dataset.queries[qid], texts, None, instruction, False)
        reranked[qid] = [head[r["index"]] for r in got["results"]] + run[qid][top_k:]
        scored += len(texts)
        bar.update(1)

    try:
        await asyncio.gather(*(one(q) for q in qids))
    finally:
        bar.close()
    return reranked, scored


# --- command line ------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="BEIR-format directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).",
    )
    parser.add_argument("--split", default="test", help="Qrels split to evaluate (default test).")
    first = parser.add_mutually_exclusive_group()
    first.add_argument(
        "--candidates",
        default=None,
        help="First-stage run file: TREC `qid Q0 docid rank score tag` or `qid docid score`.",
    )
    first.add_argument(
        "--bm25",
        type=int,
        default=None,
        metavar="K",
        help="Retrieve K candidates per query with BM25 (default, with K = --top-k).",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"Rerank each query's best k candidates (default {DEFAULT_TOP_K}); "
        "Recall is reported at 10 and k.",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def format_table(report: Mapping[str, Any]) -> str:
    before, after = report["metrics"]["first_stage"], report["metrics"]["reranked"]
    lines = [
        f"{report['dataset']} ({report['split']}): {report['queries']} queries, "
        f"{report['documents']} documents; candidates: {report['candidates']}; "
        f"reranked top {report['top_k']} with {report['model']} "
        f"({report['docs_per_s']:.1f} docs/s)",
        f"{'metric':<12}{'first stage':>12}{'reranked':>12}{'change':>10}",
    ]
    for name in before:
        change = after[name] - before[name]
        lines.append(f"{name:<12}{before[name]:>12.4f}{after[name]:>12.4f}{change:>+10.4f}")
    return "\n".join(lines)


async def _evaluate(args: argparse.Namespace, open_backend: Callable) -> dict[str, Any]:
    dataset = load_beir(Path(args.dataset), args.split)
    if args.candidates:
        run, source = load_run(Path(args.candidates)), Path(args.candidates).name
    else:
        depth = args.bm25 or args.top_k
        run, source = bm25_run(dataset, depth), f"BM25 top {depth}"
    cutoffs = sorted({10, args.top_k})
    backend = await open_backend()
    try:
        started = time.perf_counter()
        reranked, scored = await rerank_run(
            backend,
            dataset,
            run,
            args.top_k,
            args.instruction,
            args.concurrency,
            progress=False if args.no_progress else None,
        )
        seconds = time.perf_counter() - started
    finally:
        await backend.close()
    evaluated = [q for q, judged in dataset.qrels.items() if any(g > 0 for g in judged.values())]
    return {
        "dataset": dataset.name,
        "split": args.split,
        "queries": len(evaluated),
        "documents": len(dataset.corpus),
        "candidates": source,
        "top_k": args.top_k,
        "model": backend.model,
        "documents_scored": scored,
        "docs_per_s": scored / max(seconds, 1e-9),
        "metrics": {
            "first_stage": evaluate(run, dataset.qrels, cutoffs),
            "reranked": evaluate(reranked, dataset.qrels, cutoffs),
        },
    }


def main(args: argparse.Namespace, open_backend: Callable) -> int:
    from rerankd.offline import FatalError, LineError

    if args.top_k <= 0 or (args.bm25 is not None and args.bm25 <= 0):
        print("rerankd eval: --top-k and --bm25 must be > 0", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_evaluate(args, open_backend))
    except (ValueError, RuntimeError, FatalError, OSError) as exc:
        print(f"rerankd eval: {exc}", file=sys.stderr)
        return 2
    except LineError as exc:
        print(f"rerankd eval: a rerank request failed: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
