"""Fixtures of the end-to-end suite.

`client` is the shared Qwen3 app in this process (tests/in_process.py): the routes, dialects,
errors and references are checked without a server process. The shared Qwen3 server from
tests/conftest.py (`qwen3_server`: the session's one float32 server, which tests/hardening
uses too) serves what needs a real one here: the browser and concurrent connections. The other processes
this suite needs (one server per model family, and the deliberately failing `rerankd serve`
runs) are started by one background thread, one at a time, from the start of the session,
and only those that a collected test uses. Their start-up then overlaps with the tests
running meanwhile (which mostly wait on the shared server), without ever starting more
processes at once than two cores can take.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.in_process import served_real
from tests.ports import free_port

from .helpers import model_info

#: how long a test waits for a background process (it may be queued behind the others)
BACKGROUND_WAIT_S = 600
#: how long a `rerankd serve` that must fail may take to exit
STARTUP_FAILURE_TIMEOUT_S = 180


#: the family servers log warnings and errors only and no access log, so that their log
#: files (tests/harness.py) stay small and quiet; the shared Qwen3 server (tests/conftest.py)
#: keeps its access log, which the hardening suite reads
QUIET = ("--no-access-log", "--log-level", "warning")


@pytest.fixture(scope="session")
def client(qwen3_dir: Path) -> Iterator[httpx.Client]:
    """The app of `rerankd serve --model <tiny qwen3> --dtype float32 --device cpu` in this
    process (tests/in_process.py: rerankd.api.build_app over the real engine). The routes'
    behaviour needs no server process; what does (a browser, concurrent connections) uses
    `qwen3_server`."""
    with served_real(qwen3_dir) as c:
        yield c


@pytest.fixture(scope="session")
def qwen3_model(client: httpx.Client) -> dict[str, Any]:
    """The shared server's /v1/models entry (served name, aliases, max_model_len)."""
    return model_info(client)


@pytest.fixture(scope="session")
def qwen3_max_len(qwen3_model: dict[str, Any]) -> int:
    return qwen3_model["max_model_len"]


# --- background processes -------------------------------------------------------------------


class _Task:
    """Something the launcher starts; `start()` returns once it is up (or has failed)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._done = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # handed to the test that waits for this task
            self._error = exc
            self._done.set()

    def _run(self) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        if not self._done.wait(BACKGROUND_WAIT_S):
            raise RuntimeError(f"background task {self.name} did not finish starting in time")
        if self._error is not None:
            raise RuntimeError(f"background task {self.name} failed") from self._error

    def stop(self) -> None:
        pass


class BackgroundServer(_Task):
    """`start_server(*args, env=env)` held open in its own thread until `stop()`."""

    def __init__(self, name: str, start_server: Callable, args: Sequence[str], env: dict):
        super().__init__(name)
        self._start_server, self._args, self._env = start_server, list(args), env
        self._stop = threading.Event()
        self._url: str | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        self._thread = threading.Thread(target=self._hold, daemon=True, name=f"e2e-{self.name}")
        self._thread.start()
        self._done.wait()

    def _hold(self) -> None:
        try:
            with self._start_server(*self._args, env=self._env) as url:
                self._url = url
                self._done.set()
                self._stop.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def url(self) -> str:
        self.wait()
        assert self._url is not None
        return self._url

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


class FailingStart(_Task):
    """`python -m rerankd.cli serve --model MODEL`, expected to exit with an error."""

    def __init__(self, name: str, model: str, env: dict[str, str]) -> None:
        super().__init__(name)
        self.model, self._env = model, env
        self.returncode: int | None = None
        self.output = ""
        self._proc: subprocess.Popen | None = None

    def _run(self) -> None:
        cmd = [
            sys.executable, "-m", "rerankd.cli", "serve", "--host", "127.0.0.1",
            "--port", str(free_port()), "--model", self.model, "--dtype", "float32",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            self.output, _ = self._proc.communicate(timeout=STARTUP_FAILURE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            output, _ = self._proc.communicate()
            self.output = f"TIMED OUT: still running after {STARTUP_FAILURE_TIMEOUT_S} s\n{output}"
        self.returncode = self._proc.returncode
        self._done.set()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()


def _bad_checkpoint(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


class StartupFailures:
    """The failing starts by name: `result(name)` → (model argument, exit code, output)."""

    def __init__(self, tasks: dict[str, FailingStart]) -> None:
        self._tasks = tasks

    def result(self, name: str) -> tuple[str, int | None, str]:
        task = self._tasks[name]
        task.wait()
        return task.model, task.returncode, task.output


def _failing_starts(bert_dir: Path, tmp: Path) -> dict[str, FailingStart]:
    masked_lm = _bad_checkpoint(bert_dir, tmp / "masked-lm", architectures=["BertForMaskedLM"])
    three_labels = _bad_checkpoint(
        bert_dir,
        tmp / "three-labels",
        num_labels=3,
        id2label={"0": "a", "1": "b", "2": "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf-home"),  # an empty cache: nothing to find offline
    }
    models = {
        "hub-id-offline": "nonexistent-org/nonexistent-model",
        "missing-path": str(tmp / "does" / "not" / "exist"),
        "masked-lm": str(masked_lm),
        "three-labels": str(three_labels),
    }
    return {name: FailingStart(name, model, env) for name, model in models.items()}


#: fixture a test uses → the background tasks it needs, in the order the test files run
_NEEDS = {
    "startup_failures": ("hub-id-offline", "missing-path", "masked-lm", "three-labels"),
    "family_servers": ("gemma", "xlmr", "bert"),
}


@pytest.fixture(scope="session", autouse=True)
def _background(request, start_server, tmp_path_factory) -> Iterator[dict[str, _Task]]:
    """Start, one after the other in a background thread, what the collected tests need."""
    used: set[str] = set()
    for item in request.session.items:
        used.update(getattr(item, "fixturenames", ()))
    wanted = [name for fixture, names in _NEEDS.items() if fixture in used for name in names]
    tasks: dict[str, _Task] = {}
    if any(name in wanted for name in _NEEDS["startup_failures"]):
        tasks.update(
            _failing_starts(
                request.getfixturevalue("bert_dir"), tmp_path_factory.mktemp("bad-models")
            )
        )
    f32 = ["--dtype", "float32", *QUIET]
    for name in wanted:
        if name in ("gemma", "xlmr", "bert"):
            model_dir = request.getfixturevalue(f"{name}_dir")
            tasks[name] = BackgroundServer(
                name, start_server, ["--model", str(model_dir), *f32], {}
            )
    ordered = [tasks[name] for name in wanted]

    def launch() -> None:
        for task in ordered:
            task.start()

    launcher = threading.Thread(target=launch, daemon=True, name="e2e-launcher")
    launcher.start()
    yield tasks
    launcher.join(timeout=BACKGROUND_WAIT_S)
    for task in ordered:
        if isinstance(task, BackgroundServer):
            task._stop.set()  # signal every server at once, then wait for each
    for task in ordered:
        task.stop()


def _server(background: dict[str, _Task], name: str) -> BackgroundServer:
    task = background[name]
    assert isinstance(task, BackgroundServer)
    return task


@pytest.fixture(scope="module")
def family_servers(_background) -> Iterator[dict[str, httpx.Client]]:
    """Clients of float32 servers on the gemma, xlmr and bert fixtures."""
    clients = {
        name: httpx.Client(base_url=_server(_background, name).url(), timeout=120)
        for name in ("gemma", "xlmr", "bert")
    }
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(scope="module")
def startup_failures(_background) -> StartupFailures:
    return StartupFailures({k: v for k, v in _background.items() if isinstance(v, FailingStart)})
