"""Production-hardening suite: limits, shutdown, faults, security, fuzzing and load.

Every test here talks to real `rerankd serve` processes on 127.0.0.1 (started by
`conftest.launch_servers`, output captured to a file so logs can be inspected), on the
tiny Qwen3-Reranker fixture. `scripts/reliability.py` reuses the same scenario functions
for the long dedicated runs that write docs/reliability.md.
"""
