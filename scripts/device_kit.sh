#!/usr/bin/env bash
# Fill .device/ (git-ignored, <= 64 MiB) with the cp312 manylinux wheels of what the GPU
# machine lacks: it has torch 2.11, transformers, tokenizers, safetensors, huggingface_hub,
# httpx, prometheus-client, pytest and sentence-transformers, but no fastapi, uvicorn,
# pydantic or orjson, and no package registry. scripts/device_check.sh installs from here
# only (`pip install --no-index --find-links .device`).
#
#   scripts/device_kit.sh          # versions pinned to what this checkout's venv runs
#
# The device tool then carries it: run(carry=[".device"], ...), see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.device
PYTHON=${PYTHON:-python}
LIMIT_BYTES=$((64 * 1024 * 1024))

# the server's stack: these and everything they require (by this venv's metadata, so the
# kit holds the combination tested here; pure-Python ones too, in case the GPU machine's
# copies are missing or too old). fastapi >= 0.16x requires opentelemetry-api.
ROOTS=(fastapi uvicorn pydantic orjson httptools uvloop)
mapfile -t specs < <("$PYTHON" - "${ROOTS[@]}" <<'PY'
import importlib.metadata as md
import sys

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

pins, todo = {}, list(sys.argv[1:])
while todo:
    name = todo.pop()
    key = name.lower().replace("_", "-")
    if key in pins:
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        pins[key] = ""  # not installed here: the latest
        continue
    pins[key] = f"=={dist.version}"
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
            todo.append(req.name)
for key, pin in sorted(pins.items()):
    print(key + pin)
PY
)

rm -rf "$KIT"
mkdir -p "$KIT"
"$PYTHON" -m pip download --quiet --dest "$KIT" --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    "${specs[@]}"

size=$(du -sb "$KIT" | cut -f1)
echo "$KIT: $(ls "$KIT" | wc -l) wheels, $((size / 1024)) KiB"
ls "$KIT"
if ((size > LIMIT_BYTES)); then
    echo "device_kit: $KIT is over the device tool's 64 MiB carry limit" >&2
    exit 1
fi
