"""Shared fixtures: tiny checkpoints built at test time, and a real server in a subprocess."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers the tests start run eager: `--compile auto` compiles bf16 on AMX CPUs, which costs
# each server start tens of seconds; the compiled path has its own parity tests.
os.environ.setdefault("RERANKD_COMPILE", "off")

from tests import harness  # noqa: E402
from tests.fixtures.paths import fixture_dir  # noqa: E402

SERVER_START_TIMEOUT_S = 120
GPU_TESTS = Path(__file__).parent / "gpu"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`pytest -m gpu` looks in tests/gpu only: every GPU test lives there, and the GPU
    machine lacks what other modules import at collection (hypothesis, ray, client
    libraries)."""
    if config.getoption("markexpr") != "gpu":
        return None
    inside = collection_path == GPU_TESTS or GPU_TESTS in collection_path.parents
    return None if inside or collection_path in GPU_TESTS.parents else True


@pytest.fixture(scope="session")
def qwen3_dir() -> Path:
    return fixture_dir("qwen3")


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    return fixture_dir("gemma")


@pytest.fixture(scope="session")
def xlmr_dir() -> Path:
    return fixture_dir("xlmr")


@pytest.fixture(scope="session")
def bert_dir() -> Path:
    return fixture_dir("bert")


@pytest.fixture(scope="session")
def qwen3_seq_cls_dir() -> Path:
    return fixture_dir("qwen3-seq-cls")


@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `rerankd serve ARGS` on a free loopback port; yield its base URL; stop it
    (tests/harness.py: its output goes to a file, never an unread pipe). The server inherits
    this process's environment (RERANKD_COMPILE=off above included), plus `env`."""
    with harness.running_server(
        *args, env=env, base_env=dict(os.environ), timeout=SERVER_START_TIMEOUT_S
    ) as server:
        yield server.url


@pytest.fixture(scope="session")
def start_server() -> Callable:
    """The `running_server` context manager, for tests that need custom flags."""
    return running_server


#: the flags of the session's shared server (after `--model <tiny qwen3>`)
SHARED_QWEN3_FLAGS = ("--dtype", "float32", "--device", "cpu")


@pytest.fixture(scope="session")
def qwen3_float32(qwen3_dir: Path, tmp_path_factory) -> Iterator[harness.Server]:
    """One float32 CPU server on the tiny Qwen3-Reranker fixture, every other setting at its
    default (access log on), shared by the whole session: tests/hardening (its `plain`
    server), the e2e tests that need real connections (concurrency, the playground in a
    browser) and `eval --url`; the other HTTP tests run in-process (tests/in_process.py). They
    only send requests and read answers, logs and metrics (as deltas), so one process serves
    them all instead of one per suite. Its
    environment drops the shell's RERANKD_* settings (a developer's RERANKD_API_KEY must not
    change what the tests see) except RERANKD_COMPILE (off above)."""
    env = harness.offline_env({"RERANKD_COMPILE": os.environ["RERANKD_COMPILE"]})
    args = ["--model", str(qwen3_dir), *SHARED_QWEN3_FLAGS]
    log_dir = tmp_path_factory.mktemp("shared-server")
    with harness.spawn_rerankd("plain", args, log_dir, base_env=env) as server:
        server.wait_healthy(SERVER_START_TIMEOUT_S)
        yield server


@pytest.fixture(scope="session")
def qwen3_server(qwen3_float32: harness.Server) -> str:
    """The base URL of the shared float32 server (`qwen3_float32`)."""
    return qwen3_float32.url
