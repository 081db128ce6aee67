"""`rerankd rerank`: offline JSONL reranking, in process and through --url, resumable.

The server --url reaches is `rerankd serve`'s app in this process: rerankd.client's
AsyncClient, which --url mode opens, is given an in-process transport (tests/in_process.py),
so no server process starts. --url over real TCP: tests/test_eval_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rerankd.client as client_module
from rerankd.cli import main
from tests.in_process import AppTransport, served_real

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


@pytest.fixture(scope="module")
def app(qwen3_dir):
    """The app of `rerankd serve --model <tiny qwen3> --dtype float32 --device cpu`."""
    with served_real(qwen3_dir) as app:
        yield app


@pytest.fixture
def url_of(monkeypatch):
    """`url_of(app)`: a URL that --url mode reaches `app` at, in this process."""

    def route(app) -> str:
        transport = AppTransport(app)

        class ToApp(client_module.AsyncClient):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, transport=transport, **kwargs)

        monkeypatch.setattr(client_module, "AsyncClient", ToApp)
        return "http://rerankd.test"

    return route


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


def test_in_process_output_matches_the_servers_rerank_answer(tmp_path, local_args, app):
    code, out = rerank(tmp_path, [*local_args, "--top-n", "2"])
    assert code == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["france", 2, 7]  # line number when no id
    for row, record in zip(LINES, records, strict=True):
        served = app.post(
            "/v1/rerank", json={"query": row["query"], "documents": row["documents"], "top_n": 2}
        ).json()
        assert record["model"] == served["model"]
        assert record["usage"] == served["usage"]
        assert_same_results(record["results"], served["results"])
    echoed = {r["index"]: r["document"] for r in records[0]["results"]}
    assert echoed.get(2, LINES[0]["documents"][2]) == LINES[0]["documents"][2]  # objects as sent


def test_url_mode_gives_the_same_records_as_in_process(tmp_path, local_args, app, url_of):
    code, local = rerank(tmp_path, [*local_args, "--no-documents"], output="local.jsonl")
    assert code == 0
    url = url_of(app)
    code, remote = rerank(
        tmp_path, ["--url", url, "--no-documents", "--no-progress"], output="remote.jsonl"
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


def test_a_model_the_server_does_not_serve_stops_with_exit_code_2(tmp_path, app, url_of, capsys):
    url = url_of(app)
    code, _ = rerank(tmp_path, ["--url", url, "--model", "no-such-model", "--no-progress"])
    assert code == 2
    assert "'no-such-model' is not served" in capsys.readouterr().err


def test_an_unreachable_server_stops_with_exit_code_2(tmp_path, capsys, monkeypatch):
    async def no_wait(seconds: float) -> None:  # the client's retries, without their backoff
        pass

    monkeypatch.setattr(client_module, "_async_sleep", no_wait)
    code, _ = rerank(tmp_path, ["--url", "http://127.0.0.1:9", "--no-progress"])
    assert code == 2
    assert "cannot use the server" in capsys.readouterr().err


# --- images (issue 19): the forms and checks of POST /v1/rerank ------------------------------


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def vl_lines() -> list:
    """Lines in every image form /v1/rerank takes, and lines it refuses (one per kind)."""
    from tests.fixtures.qwen3_vl import png_data_uri

    png, other = png_data_uri(40, 30, seed=1), png_data_uri(32, 32, seed=2)
    truncated = png[: len(png) // 2].rstrip("=")
    truncated += "=" * (-len(truncated.split(",", 1)[1]) % 4)
    return [
        {"id": "mixed", "query": "a photo",
         "documents": ["plain", {"text": "an object", "id": 7}, {"content": [_image_part(png)]},
                       {"image": other}, {"text": "both", "image": png}]},
        {"id": "object", "query": "a photo",
         "documents": {"content": [_image_part(png), {"type": "text", "text": "plain"}]}},
        {"id": "image-query", "query": {"content": [_image_part(png)]},
         "documents": ["plain", {"image": other}]},
        {"id": "truncated", "query": "q", "documents": ["ok", {"image": truncated}]},
        {"id": "remote", "query": "q", "documents": [{"image": "http://127.0.0.1:9/a.png"}]},
        {"id": "too-many-parts", "query": "q",
         "documents": ["ok", "ok", {"content": [{"type": "text", "text": "x"}] * 65}]},
        {"id": "bad-query", "query": {"image": 3}, "documents": ["ok"]},
        {"id": "after", "query": "still scored", "documents": ["a", {"image": png}]},
    ]  # fmt: skip


def test_image_documents_take_the_server_s_forms_and_bad_ones_fail_their_line_only(
    tmp_path, vl_lines, capsys
):
    from tests.fixtures.qwen3_vl import qwen3_vl_dir

    args = ["--model", str(qwen3_vl_dir()), "--dtype", "float32", "--no-progress"]
    code, out = rerank(tmp_path, args, vl_lines)
    assert code == 1
    records = {r["id"]: r for r in read_jsonl(out)}
    assert list(records) == [line["id"] for line in vl_lines]  # input order
    scores = {
        rid: {r["index"]: r["relevance_score"] for r in records[rid]["results"]}
        for rid in ("mixed", "object", "image-query", "after")
    }
    # the same image (and text) in each form is the same document
    assert scores["mixed"][2] == pytest.approx(scores["object"][0], abs=1e-6)
    assert scores["mixed"][0] == pytest.approx(scores["object"][1], abs=1e-6)
    assert len(scores["image-query"]) == 2 and len(scores["after"]) == 2
    # documents echoed as sent (each part of vLLM's object is one document)
    echoed = {r["index"]: r["document"] for r in records["object"]["results"]}
    assert echoed == {
        0: vl_lines[1]["documents"]["content"][0],
        1: {"type": "text", "text": "plain"},
    }
    assert records["object"]["usage"]["prompt_tokens"] > 0
    errors = {rid: records[rid]["error"] for rid in records if "error" in records[rid]}
    assert set(errors) == {"truncated", "remote", "too-many-parts", "bad-query"}
    assert errors["truncated"]["param"] == "documents[1]"
    assert "decoded" in errors["truncated"]["message"]
    assert errors["remote"]["param"] == "documents[0]"
    assert "--allow-remote-media" in errors["remote"]["message"]
    assert errors["too-many-parts"]["param"] == "documents[2]"  # refused when the line is read
    assert errors["bad-query"]["param"] == "query.image"
    assert all(e["type"] == "BadRequestError" for e in errors.values())
    assert "4 scored, 0 skipped (already in out.jsonl), 4 failed" in capsys.readouterr().err


def test_image_lines_through_a_server_give_the_same_records(tmp_path, vl_lines, url_of):
    """--url sends each line's query and documents as they are (vLLM's documents object
    included): the records match the in-process run's, errors included."""
    from tests.fixtures.qwen3_vl import qwen3_vl_dir

    model = str(qwen3_vl_dir())
    args = ["--model", model, "--dtype", "float32", "--no-progress"]
    _, local = rerank(tmp_path, args, vl_lines, output="local.jsonl")
    with served_real(model) as app:
        url = url_of(app)
        _, remote = rerank(
            tmp_path, ["--url", url, "--no-progress"], vl_lines, output="remote.jsonl"
        )
    for a, b in zip(read_jsonl(local), read_jsonl(remote), strict=True):
        assert a["id"] == b["id"]
        if "error" in a:
            assert b["error"]["param"] == a["error"]["param"], (a, b)
            assert b["error"]["message"] == a["error"]["message"], (a, b)
            continue
        assert a["usage"] == b["usage"]
        assert_same_results(a["results"], b["results"])


def test_ray_data_s_scorer_writes_the_in_process_records_for_image_lines(tmp_path, vl_lines):
    """`rerankd rerank --ray` scores rows with the same parse_line and LocalBackend (its actor
    class called directly here, without a Ray cluster): the same records, and vLLM's
    documents object counted as its parts."""
    import numpy as np

    from rerankd.ray.data import Scorer
    from rerankd.settings import Settings
    from tests.fixtures.qwen3_vl import qwen3_vl_dir

    model = str(qwen3_vl_dir())
    _, local = rerank(tmp_path, ["--model", model, "--dtype", "float32", "--no-progress"], vl_lines)
    scorer = Scorer(Settings(model=model, dtype="float32", device="cpu"), None, None, True, 4)
    try:
        out = scorer(
            {
                "line": np.arange(1, len(vl_lines) + 1),
                "text": np.asarray([json.dumps(line) for line in vl_lines], dtype=object),
                "skip": np.zeros(len(vl_lines), dtype=bool),
            }
        )
    finally:
        if scorer.backend is not None:
            scorer.loop.run_until_complete(scorer.backend.close())
    expected = read_jsonl(local)
    assert [s == "failed" for s in out["status"]] == ["error" in r for r in expected]
    assert out["documents"][1] == 2  # the "object" line: two parts, two documents
    for a, b in zip(expected, map(json.loads, out["record"]), strict=True):
        assert a["id"] == b["id"]
        if "error" in a:
            assert a["error"] == b["error"]
        else:
            assert a["usage"] == b["usage"]
            assert_same_results(a["results"], b["results"])
