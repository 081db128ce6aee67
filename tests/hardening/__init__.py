"""Production-hardening suite: limits, shutdown, security, fuzzing and load.

Every test here talks to real `rerankd serve` processes on 127.0.0.1 (started by
`conftest.launch_servers`, output captured to a file so logs can be inspected), on the
tiny Qwen3-Reranker fixture: signals, the TCP-level stack (slow or huge heads and bodies,
connection caps, disconnects), RSS and /health latency under attack, load. What an
in-process app checks equally well (request limits, timeouts, engine faults, NaN scores,
keys) is tested in tests/api. `scripts/reliability.py` reuses the same scenario functions
for the long dedicated runs that write docs/reliability.md.
"""
