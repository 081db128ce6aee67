"""Loopback ports for the servers that tests, scripts and benchmarks start: each port handed
out once per process.

Servers are started several at a time and bind their port only after importing torch (tens
of seconds later); until then the OS may offer the same free port again. Two servers given
one port: the second fails to bind, and its health check reaches the first, so a test
talks to the wrong server (seen once in CI: the fault-injected "slow" server answered like
the plain one)."""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A loopback port nothing listens on now and no earlier call of this process returned."""
    with _lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
