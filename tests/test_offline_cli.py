"""`rerankd rerank`: offline JSONL reranking, in process and through --url, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rerankd.cli import main

LINES = [
    {"id": "france", "query": "What is the capital of France?",
     "documents": ["The capital of Brazil is Brasilia.", "The capital of France is Paris.",
                   {"text": "Paris has the Eiffel Tower.", "source": "wiki"}]},
    {"query": "Why does coffee keep you awake?",
     "documents": ["Caffeine blocks adenosine.", "Tea is popular in Japan."]},
    {"id": 7, "query": "How long is a marathon?",
     "documents": ["42.195 kilometres.", "The 100 metre sprint.", "Runners train for months."]},
]  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def local_args(qwen3_dir):
    return ["--model", str(qwen3_dir), "--dtype", "float32", "--no-progress"]


def rerank(tmp_path: Path, args: list[str], rows=LINES, output="out.jsonl") -> tuple[int, Path]:
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / output
    code = main(["rerank", "--input", str(src), "--output", str(out), *args])
    return code, out


def assert_same_results(mine: list[dict], theirs: list[dict]) -> None:
    assert [r["index"] for r in mine] == [r["index"] for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a.get("document") == b.get("document")
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], abs=1e-5)


def test_in_process_output_matches_the_servers_rerank_answer(tmp_path, local_args, qwen3_server):
    code, out = rerank(tmp_path, [*local_args, "--top-n", "2"])
    assert code == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["france", 2, 7]  # line number when no id
    for row, record in zip(LINES, records, strict=True):
        served = httpx.post(
            f"{qwen3_server}/v1/rerank",
            json={"query": row["query"], "documents": row["documents"], "top_n": 2},
            timeout=60,
        ).json()
        assert record["model"] == served["model"]
        assert record["usage"] == served["usage"]
        assert_same_results(record["results"], served["results"])
    echoed = {r["index"]: r["document"] for r in records[0]["results"]}
    assert echoed.get(2, LINES[0]["documents"][2]) == LINES[0]["documents"][2]  # objects as sent


def test_url_mode_gives_the_same_records_as_in_process(tmp_path, local_args, qwen3_server):
    code, local = rerank(tmp_path, [*local_args, "--no-documents"], output="local.jsonl")
    assert code == 0
    code, remote = rerank(
        tmp_path, ["--url", qwen3_server, "--no-documents", "--no-progress"], output="remote.jsonl"
    )
    assert code == 0
    for a, b in zip(read_jsonl(local), read_jsonl(remote), strict=True):
        assert a["id"] == b["id"] and a["usage"] == b["usage"]
        assert all("document" not in r for r in a["results"] + b["results"])
        assert_same_results(a["results"], b["results"])


def test_bad_lines_are_reported_with_their_line_number_and_the_rest_continues(
    tmp_path, local_args, capsys
):
    rows = [
        LINES[0],
        "{not json",
        {"id": "no-docs", "query": "q"},
        {"id": "bad-doc", "query": "q", "documents": ["ok", {"title": "no text"}]},
        [1, 2],
        LINES[2],
    ]
    code, out = rerank(tmp_path, local_args, rows)
    assert code == 1
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["france", 2, "no-docs", "bad-doc", 5, 7]
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {2, 3, 4, 5}
    assert errors[3]["param"] == "documents"
    assert errors[4]["param"] == "documents[1].text" and errors[4]["type"] == "BadRequestError"
    assert "results" in records[0] and "results" in records[5]
    stderr = capsys.readouterr().err
    for line in (2, 3, 4, 5):
        assert f"in.jsonl:{line}: " in stderr
    assert "2 scored, 0 skipped (already in out.jsonl), 4 failed" in stderr


def test_a_rerun_resumes_skipping_answered_ids_and_retrying_failed_ones(
    tmp_path, local_args, capsys
):
    rows = [*LINES, {"id": "broken", "query": 1, "documents": []}]
    code, out = rerank(tmp_path, local_args, rows)
    assert code == 1
    first = read_jsonl(out)
    # simulate an interrupted run: the last good record lost, a torn half-written line left
    kept = [r for r in first if r["id"] != 7]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": 7, "resu')
    capsys.readouterr()

    rows = [*rows, {"id": "new", "query": "added later", "documents": ["a", "b"]}]
    code, out = rerank(tmp_path, local_args, rows)
    assert code == 1  # "broken" still fails
    stderr = capsys.readouterr().err
    assert "2 scored, 2 skipped (already in out.jsonl), 1 failed" in stderr
    records = read_jsonl(out)  # every line parses: the torn line is gone
    ids = [r["id"] for r in records]
    assert sorted(map(str, ids)) == sorted(["france", "2", "7", "broken", "new"])  # each once
    assert_same_results(
        next(r for r in records if r["id"] == 7)["results"],
        next(r for r in first if r["id"] == 7)["results"],
    )

    # once everything good is in, a run with the failing line removed does nothing
    code, out = rerank(tmp_path, local_args, [*LINES, rows[-1]])
    assert code == 0
    assert "0 scored, 4 skipped" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(out)] == ["france", 2, 7, "new"]  # the error dropped


def test_unreachable_server_or_unknown_model_stops_with_exit_code_2(tmp_path, qwen3_server, capsys):
    code, _ = rerank(tmp_path, ["--url", qwen3_server, "--model", "no-such-model", "--no-progress"])
    assert code == 2
    assert "no-such-model" in capsys.readouterr().err
    code, _ = rerank(tmp_path, ["--url", "http://127.0.0.1:9", "--no-progress"])
    assert code == 2
    assert "cannot use the server" in capsys.readouterr().err
