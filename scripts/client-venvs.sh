#!/usr/bin/env bash
# Make the client matrix's venvs (tests/clients/.venvs/NAME) from their locked requirements
# (tests/clients/requirements-NAME.txt). Their libraries pin each other out, so they live
# apart from rerankd's venv and from each other; see tests/clients/README.md.
#
#   bash scripts/client-venvs.sh             # make or refresh the venvs (no-op when current)
#   bash scripts/client-venvs.sh --upgrade   # re-resolve the locks from requirements-NAME.in
#
# Uses uv (installed into the current Python environment when missing). A venv is remade
# only when its lock changed; uv's cache (~/.cache/uv) makes a remake take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

clients=tests/clients
names=(latest legacy)
python=${PYTHON:-python3}

if command -v uv >/dev/null; then
    uv=(uv)
elif "$python" -m uv --version >/dev/null 2>&1; then
    uv=("$python" -m uv)
else
    "$python" -m pip install --quiet uv
    uv=("$python" -m uv)
fi

if [ "${1:-}" = "--upgrade" ]; then
    for name in "${names[@]}"; do
        "${uv[@]}" pip compile --quiet --upgrade --python "$python" \
            "$clients/requirements-$name.in" -o "$clients/requirements-$name.txt"
    done
fi

for name in "${names[@]}"; do
    lock="$clients/requirements-$name.txt"
    venv="$clients/.venvs/$name"
    want=$(sha256sum "$lock" | cut -d' ' -f1)
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/lock.sha256" 2>/dev/null)" = "$want" ]; then
        echo "client venv $name: current"
        continue
    fi
    start=$SECONDS
    rm -rf "$venv"
    "${uv[@]}" venv --quiet --python "$python" "$venv"
    "${uv[@]}" pip sync --quiet --python "$venv/bin/python" "$lock"
    echo "$want" >"$venv/lock.sha256"
    echo "client venv $name: made in $((SECONDS - start)) s"
done
