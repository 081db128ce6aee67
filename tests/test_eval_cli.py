"""`rerankd eval` and rerankd.evaluation: metrics against hand-computed values, BEIR loading,
run files, BM25 candidates, and the command end to end on the bundled tiny dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from rerankd.cli import main
from rerankd.evaluation import (
    evaluate,
    load_beir,
    load_run,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
)

DATASET = Path(__file__).parent / "data" / "tiny-beir"
LOG2_3 = math.log2(3)  # discount of rank 2


# --- metrics -----------------------------------------------------------------------------


def test_ndcg_uses_linear_gains_and_the_ideal_order_of_all_judged_documents():
    judged = {"a": 2, "b": 1, "c": 0}
    # ranks: x=1 (unjudged), b=2 (gain 1), a=3 (gain 2), c=4 (gain 0)
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["x", "b", "a", "c"], judged, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "b"], judged, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "b", "a"], judged, 2) == pytest.approx((1 / LOG2_3) / idcg)
    assert ndcg_at_k(["x", "y"], judged, 10) == 0.0
    assert ndcg_at_k([], judged, 10) == 0.0
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0  # no relevant document: 0, not NaN
    # the ideal DCG is cut at k too: with 3 relevant docs and k=2 only the best two count
    three = {"a": 1, "b": 1, "c": 1}
    assert ndcg_at_k(["a", "b"], three, 2) == pytest.approx(1.0)


def test_mrr_and_recall_at_k():
    judged = {"a": 2, "b": 1, "c": 0}
    assert mrr_at_k(["x", "c", "b", "a"], judged, 10) == pytest.approx(1 / 3)  # c is not relevant
    assert mrr_at_k(["x", "c", "b"], judged, 2) == 0.0
    assert mrr_at_k(["a"], judged, 10) == 1.0
    assert recall_at_k(["x", "b", "a"], judged, 2) == pytest.approx(0.5)
    assert recall_at_k(["x", "b", "a"], judged, 3) == pytest.approx(1.0)
    assert recall_at_k(["c"], judged, 10) == 0.0
    assert recall_at_k(["a"], {"c": 0}, 10) == 0.0


def test_evaluate_averages_over_queries_with_a_relevant_document():
    qrels = {
        "q1": {"a": 1},
        "q2": {"b": 1, "c": 1},
        "q3": {"d": 0},  # no relevant document: left out of the mean
        "q4": {"e": 1},  # no candidates: scores 0
    }
    run = {"q1": ["a"], "q2": ["x", "b"], "q3": ["d"]}
    got = evaluate(run, qrels, recall_cutoffs=(1, 10))
    assert got["MRR@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert got["Recall@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert got["Recall@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    q2_ndcg = (1 / LOG2_3) / (1 + 1 / LOG2_3)
    assert got["nDCG@10"] == pytest.approx((1 + q2_ndcg + 0) / 3)


# --- data --------------------------------------------------------------------------------


def test_bundled_dataset_loads():
    data = load_beir(DATASET)
    assert (len(data.corpus), len(data.queries), len(data.qrels)) == (30, 6, 6)
    assert data.corpus["d01"] == "Paris Paris is the capital and largest city of France."
    assert data.qrels["q1"] == {"d01": 2, "d02": 1, "d03": 0, "d04": 0}
    with pytest.raises(ValueError, match="qrels/dev.tsv is missing"):
        load_beir(DATASET, "dev")


def test_run_files_trec_and_tsv_sorted_by_score(tmp_path):
    trec = tmp_path / "run.trec"
    trec.write_text("q1 Q0 d2 2 0.5 bm25\nq1 Q0 d1 1 0.9 bm25\nq2 Q0 d3 1 1.0 bm25\n")
    assert load_run(trec) == {"q1": ["d1", "d2"], "q2": ["d3"]}
    tsv = tmp_path / "run.tsv"
    tsv.write_text("qid\tdocid\tscore\nq1\tb\t1\nq1\ta\t1\nq1\tc\t2\n")
    assert load_run(tsv) == {"q1": ["c", "b", "a"]}  # ties keep file order
    (tmp_path / "bad.tsv").write_text("q1 d1\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        load_run(tmp_path / "bad.tsv")


def test_bm25_puts_a_relevant_document_first_on_the_bundled_dataset():
    pytest.importorskip("rank_bm25", reason="BM25 candidates need the `eval` extra (rank-bm25)")
    from rerankd.evaluation import bm25_run

    data = load_beir(DATASET)
    run = bm25_run(data, 5)
    assert all(len(docs) == 5 for docs in run.values())
    assert evaluate(run, data.qrels, (5,))["MRR@10"] == 1.0


# --- the command -------------------------------------------------------------------------


def _reversed_topic_run(path: Path) -> Path:
    """Per query: its five topic documents in reverse order (relevant ones at ranks 4 and 5)."""
    data = load_beir(DATASET)
    lines = []
    for n, qid in enumerate(sorted(data.queries)):
        docs = [f"d{5 * n + i:02d}" for i in range(5, 0, -1)]
        lines += [f"{qid}\t{doc}\t{10 - rank}" for rank, doc in enumerate(docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_json_first_stage_is_hand_computed_and_reranked_is_the_servers_ranking(
    tmp_path, qwen3_server, capsys
):
    run_file = _reversed_topic_run(tmp_path / "run.tsv")
    code = main(
        ["eval", "--url", qwen3_server, "--dataset", str(DATASET), "--candidates", str(run_file),
         "--top-k", "4", "--json", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["queries"], report["documents"], report["top_k"]) == (6, 30, 4)
    assert report["documents_scored"] == 6 * 4

    # every query looks alike: grade 1 at rank 4, grade 2 at rank 5
    ndcg = (1 / math.log2(5) + 2 / math.log2(6)) / (2 + 1 / LOG2_3)
    before = report["metrics"]["first_stage"]
    assert before == pytest.approx(
        {"nDCG@10": ndcg, "MRR@10": 1 / 4, "Recall@4": 0.5, "Recall@10": 1.0}
    )

    # reranked: the server's order of each query's top 4, then the 5th candidate
    data, run = load_beir(DATASET), load_run(run_file)
    expected = {}
    for qid, docs in run.items():
        answer = httpx.post(
            f"{qwen3_server}/v1/rerank",
            json={"query": data.queries[qid], "documents": [data.corpus[d] for d in docs[:4]]},
            timeout=60,
        ).json()
        expected[qid] = [docs[r["index"]] for r in answer["results"]] + docs[4:]
    want = evaluate(expected, data.qrels, (4, 10))
    assert report["metrics"]["reranked"] == pytest.approx(want, abs=1e-9)
    assert report["metrics"]["reranked"]["Recall@4"] == 0.5  # reranking keeps the same top 4


def test_eval_table_with_bm25_and_the_in_process_engine(qwen3_dir, capsys):
    pytest.importorskip("rank_bm25", reason="BM25 candidates need the `eval` extra (rank-bm25)")
    code = main(
        ["eval", "--model", str(qwen3_dir), "--dtype", "float32", "--dataset", str(DATASET),
         "--bm25", "8", "--top-k", "5", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tiny-beir (test): 6 queries, 30 documents; candidates: BM25 top 8")
    assert out[1].split() == ["metric", "first", "stage", "reranked", "change"]
    assert [line.split()[0] for line in out[2:]] == ["nDCG@10", "MRR@10", "Recall@5", "Recall@10"]
    for line in out[2:]:
        _, before, after, change = line.split()
        assert 0 <= float(before) <= 1 and 0 <= float(after) <= 1
        assert float(change) == pytest.approx(float(after) - float(before), abs=2e-4)
    assert out[3].split()[1] == "1.0000"  # BM25's MRR@10 on this dataset


def test_eval_errors_exit_2(tmp_path, capsys):
    code = main(["eval", "--url", "http://127.0.0.1:9", "--dataset", str(tmp_path)])
    assert code == 2
    assert "not a BEIR dataset" in capsys.readouterr().err
