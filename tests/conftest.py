"""Shared fixtures: tiny checkpoints built at test time, and a real server in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers the tests start run eager: `--compile auto` compiles bf16 on AMX CPUs, which costs
# each server start tens of seconds; the compiled path has its own parity tests.
os.environ.setdefault("RERANKD_COMPILE", "off")

from tests.fixtures.paths import fixture_dir  # noqa: E402
from tests.ports import free_port  # noqa: E402

SERVER_START_TIMEOUT_S = 120


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
    """Start `rerankd serve ARGS` on a free loopback port; yield its base URL; stop it.

    The server's output goes to a temporary file, never an unread pipe: a pipe fills up
    after a few hundred access-log lines and would block the server.
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "rerankd.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    proc_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=proc_env, stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"

        def output() -> str:
            log.flush()
            log.seek(0)
            return log.read()

        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rerankd exited with {proc.returncode}:\n{output()}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rerankd did not become healthy in time:\n{output()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def start_server() -> Callable:
    """The `running_server` context manager, for tests that need custom flags."""
    return running_server


@pytest.fixture(scope="session")
def qwen3_server(qwen3_dir: Path) -> Iterator[str]:
    """A float32 server on the tiny Qwen3-Reranker fixture, shared by the session."""
    with running_server("--model", str(qwen3_dir), "--dtype", "float32") as url:
        yield url
