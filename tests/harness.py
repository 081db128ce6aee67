"""One harness for the server subprocesses that tests, scripts and benchmarks start.

- `free_port`: a loopback port handed out once per process (tests/ports.py says why);
- `rerankd_command`: the `rerankd serve` command line on 127.0.0.1;
- `offline_env`: the environment a test server gets (no inherited RERANKD_* settings, hub
  offline);
- `Server`: the process with its output in a file (never an unread pipe: a pipe fills after a
  few hundred access-log lines and blocks the server), health waiting, signals, pause/resume,
  RSS, the access log and /metrics, and a stop that drains (SIGTERM) before it kills;
- `spawn` / `spawn_rerankd` start one; `running_server` is the context-manager form.

tests/conftest.py (`start_server`), tests/hardening/conftest.py (`ServerPool`),
scripts/reliability.py and benchmarks/bench_cpu.py (rerankd and its vLLM peer) all use it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port

__all__ = [
    "REPO_ROOT",
    "Server",
    "free_port",
    "metric_sum",
    "offline_env",
    "rerankd_command",
    "running_server",
    "spawn",
    "spawn_rerankd",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: a server imports torch and loads a model before it is healthy; several start at once
START_TIMEOUT_S = 180
#: SIGTERM drains in-flight requests first; a server still running after this is killed
STOP_TIMEOUT_S = 30

#: servers not yet stopped, stopped at interpreter exit (a documented registry: a crashed
#: test or an interrupted benchmark must not leave servers holding CPU and ports)
_running: set[Server] = set()


def rerankd_command(port: int, *args: str) -> list[str]:
    """`python -m rerankd.cli serve` on 127.0.0.1:`port` with `args`."""
    return [
        sys.executable, "-m", "rerankd.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), *args,
    ]  # fmt: skip


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without RERANKD_* settings (a developer's shell must not
    change what a test serves), the hub offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKD_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples called `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass(eq=False)
class Server:
    """One server child process on 127.0.0.1 (rerankd, or a peer such as vLLM)."""

    name: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen
    log_path: Path
    #: the flags after `serve --host --port` for a rerankd server (what tests assert on)
    args: list[str] = field(default_factory=list)
    #: the process leads its own session: signals reach its workers too (pause/resume)
    own_session: bool = False
    spawned_at: float = field(default_factory=time.monotonic)
    #: seconds from spawn to the first healthy /health
    startup_s: float | None = None
    _log: IO[str] | None = field(default=None, repr=False)

    # --- what it is ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)

    # --- what it said -------------------------------------------------------------------

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def access_records(self) -> list[dict[str, Any]]:
        """The JSON access-log lines (one per request) written so far."""
        records = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "request_id" in record:
                        records.append(record)
        return records

    def access_record(self, request_id: str, wait_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            for record in self.access_records():
                if record["request_id"] == request_id:
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no access-log line for request id {request_id}")
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        """Resident set size of the server process (VmRSS from /proc)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1)) * 1024

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=30)
        assert response.status_code == 200, response.text
        return response.text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        return metric_sum(self.metrics_text(), name, **labels)

    # --- its life -----------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT_S, poll_s: float = 0.1) -> None:
        """Until /health says 200; RuntimeError with the output if it exits or takes longer
        than `timeout` seconds from its spawn."""
        deadline = self.spawned_at + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail(60)}"
                )
            if self.healthy():
                self.startup_s = time.monotonic() - self.spawned_at
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not healthy after {timeout:.0f} s:\n{self.tail(60)}"
                )
            time.sleep(poll_s)

    def signal(self, sig: int) -> None:
        if self.own_session:
            os.killpg(self.proc.pid, sig)  # the server and its workers
        else:
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP; its workers too with `own_session`): no CPU while
        another engine is measured, its memory and warm state kept."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        time.sleep(0.5)  # let every worker get scheduled again before a clock starts

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.flush()
        return code

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the server drains; SIGCONT wakes a paused one) and wait; SIGKILL if it
        does not exit in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGTERM)
                self.signal(signal.SIGCONT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.signal(signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        _running.discard(self)
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(
    name: str,
    cmd: Sequence[str],
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    args: Sequence[str] = (),
    own_session: bool = False,
    cwd: Path = REPO_ROOT,
) -> Server:
    """Start `cmd` (which listens on `port`) with its output in `log_path`; not yet healthy.
    `env` is the whole environment (default: `offline_env()`)."""
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed by Server.stop)
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=offline_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=own_session,
    )
    server = Server(
        name, list(cmd), port, proc, log_path, list(args), own_session, time.monotonic(), _log=log
    )
    _running.add(server)
    return server


def spawn_rerankd(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    base_env: dict[str, str] | None = None,
) -> Server:
    """`rerankd serve ARGS` on a free port; `env` is added to `base_env` (default:
    `offline_env()`)."""
    port = free_port()
    full_env = {**(offline_env() if base_env is None else base_env), **(env or {})}
    return spawn(
        name,
        rerankd_command(port, *args),
        port,
        log_dir / f"{name}-{port}.log",
        full_env,
        args=args,
    )


@contextlib.contextmanager
def running_server(
    *args: str,
    env: dict[str, str] | None = None,
    base_env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[Server]:
    """`rerankd serve ARGS` on a free port, healthy; stopped (drained) on exit."""
    log_dir = Path(tempfile.mkdtemp(prefix="rerankd-server-"))
    try:
        with spawn_rerankd("rerankd", args, log_dir, env, base_env) as server:
            server.wait_healthy(timeout)
            yield server
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


@atexit.register
def _stop_running() -> None:
    for server in list(_running):
        server.stop(timeout=5)
