"""`rerankd rerank --ray` (Ray Data) writes what `rerankd rerank` writes, row for row."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
from ray_cluster import cluster_fixture

from rerankd.cli import main
from tests.words import WORDS

pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def make_rows(n: int, seed: int = 7) -> list[str]:
    """`n` JSONL lines: ids of both kinds or none, string and object documents, empty
    document lists, blank lines and a few lines that cannot be served."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 97 == 13:
            lines.append(["{not json", json.dumps({"id": f"bad-{i}", "query": "q"}),
                          json.dumps({"id": f"doc-{i}", "query": "q",
                                      "documents": ["ok", {"title": "no text"}]}),
                          ""][i % 4])  # fmt: skip
            continue
        docs: list = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            for _ in range(rng.randint(0, 4))
        ]
        if docs and i % 5 == 0:
            docs[0] = {"text": docs[0], "source": f"s{i}"}
        row: dict = {"query": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
                     "documents": docs}  # fmt: skip
        if i % 3 == 0:
            row["id"] = f"q{i}"
        elif i % 3 == 1:
            row["id"] = i * 10
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


@pytest.fixture(scope="module")
def cluster(request):
    yield from cluster_fixture(request)


@pytest.fixture(scope="module")
def model_args(qwen3_dir) -> list[str]:
    return ["--model", str(qwen3_dir), "--dtype", "float32", "--no-progress"]


#: scores of the same pair from different engine batches differ in the last float32 bits
#: (two runs of `rerankd rerank` differ the same way): compare them to this tolerance
TOL = 1e-6


def assert_same_output(actual: str, expected: str) -> None:
    """The same records in the same order: same ids, fields, documents, usage and errors;
    scores equal to TOL, and results in the same order wherever scores differ by more."""
    got, want = actual.splitlines(), expected.splitlines()
    assert len(got) == len(want)
    for line_a, line_b in zip(got, want, strict=True):
        a, b = json.loads(line_a), json.loads(line_b)
        assert list(a) == list(b) and a["id"] == b["id"], (line_a, line_b)
        if "results" not in b:
            assert a == b
            continue
        assert {k: v for k, v in a.items() if k != "results"} == {
            k: v for k, v in b.items() if k != "results"
        }
        by_index = {r["index"]: r for r in a["results"]}
        assert sorted(by_index) == sorted(r["index"] for r in b["results"])
        for r in b["results"]:
            mine = by_index[r["index"]]
            assert list(mine) == list(r) and mine.get("document") == r.get("document")
            assert mine["relevance_score"] == pytest.approx(r["relevance_score"], abs=TOL)
        for x, y in zip(a["results"], b["results"], strict=True):
            if x["index"] != y["index"]:  # a near-tie may swap places, nothing else
                assert abs(x["relevance_score"] - y["relevance_score"]) <= 2 * TOL


RAY_ARGS = ["--ray", "--replicas", "2", "--num-cpus-per-replica", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, model_args) -> tuple[Path, Path, str]:
    """1,000 generated rows and what `rerankd rerank` (no Ray) writes for them: (input,
    output, stderr)."""
    folder = tmp_path_factory.mktemp("plain")
    source, plain = folder / "in.jsonl", folder / "plain.jsonl"
    source.write_text("\n".join(make_rows(1000)) + "\n", encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["rerank", "--input", str(source), "--output", str(plain), *model_args])
    assert code == 1, err.getvalue()  # some lines cannot be served, as in every mode
    return source, plain, err.getvalue()


def test_ray_data_job_writes_exactly_what_the_single_process_job_writes(
    tmp_path: Path, cluster, plain_run, model_args, capsys
):
    source, plain, plain_err = plain_run
    on_ray = tmp_path / "ray.jsonl"
    code = main(["rerank", "--input", str(source), "--output", str(on_ray), *model_args, *RAY_ARGS])
    ray_err = capsys.readouterr().err
    assert code == 1, ray_err

    expected = plain.read_text(encoding="utf-8")
    assert_same_output(on_ray.read_text(encoding="utf-8"), expected)
    records = [json.loads(line) for line in expected.splitlines()]
    failed = [r for r in records if "error" in r]
    assert len(records) >= 990 and len(failed) >= 5
    assert {r["error"]["type"] for r in failed} == {"BadRequestError"}
    # failed rows are reported with their line on stderr, as without Ray
    for record in failed:
        assert f"in.jsonl:{record['line']}: " in ray_err
    scored = sum(1 for r in records if "results" in r)
    for err in (plain_err, ray_err):
        assert f"rerankd rerank: {scored} scored, 0 skipped" in err
        assert f", {len(failed)} failed, " in err

    # a second run resumes: answered ids are skipped, failed lines are retried (and fail again)
    before = on_ray.read_text(encoding="utf-8").splitlines()
    code = main(["rerank", "--input", str(source), "--output", str(on_ray), *model_args, *RAY_ARGS])
    assert code == 1
    assert f"rerankd rerank: 0 scored, {scored} skipped" in capsys.readouterr().err
    resumed = on_ray.read_text(encoding="utf-8").splitlines()
    answered = [line for line in before if '"error"' not in line]
    assert resumed[: len(answered)] == answered  # answered ids: kept as they were, not rescored
    assert resumed[len(answered) :] == [json.dumps(r) for r in failed]  # retried, in order


def test_parquet_input_gives_the_records_of_the_same_rows_in_jsonl(
    tmp_path: Path, cluster, plain_run, model_args, capsys
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, plain, _ = plain_run
    # the generated rows a Parquet table can hold: string ids, documents all strings
    rows = []
    for text in source.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        docs = row.get("documents")
        if isinstance(row.get("id"), str) and docs and all(isinstance(d, str) for d in docs):
            rows.append(row)
    rows = rows[:150]
    folder = tmp_path / "parquet"
    folder.mkdir()
    for part in range(2):  # a directory of files, several row groups each
        table = pa.Table.from_pylist(rows[part * 75 : (part + 1) * 75])
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=30)
    by_id = {
        json.loads(line)["id"]: line for line in plain.read_text(encoding="utf-8").splitlines()
    }
    expected = "".join(by_id[row["id"]] + "\n" for row in rows)

    out = tmp_path / "from-parquet.jsonl"
    code = main(["rerank", "--input", str(folder), "--output", str(out), *model_args, *RAY_ARGS])
    assert code == 0, capsys.readouterr().err
    assert_same_output(out.read_text(encoding="utf-8"), expected)
