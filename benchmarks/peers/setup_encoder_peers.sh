#!/usr/bin/env bash
# Build the W-ENC peers' virtual environments (benchmarks/bench_encoders.py), outside the
# repository. Usage:
#   bash benchmarks/peers/setup_encoder_peers.sh [ROOT]     (default ~/.cache/rerankd-bench)
# Creates ROOT/enc-peers-onnx, ROOT/enc-peers-ov and ROOT/enc-peers-infinity. Environment: PYTHON (default python3),
# TORCH_VERSION (default 2.13.0, the main venv's).
#
# Why two venvs, neither of them rerankd's: sentence-transformers 6.3's [openvino] extra pulls
# optimum-intel 2.2 (transformers 5.5, and a newer torch unless torch is pinned), and its
# [onnx] extra cannot be installed at all (optimum-onnx 0.1.0 requires transformers < 4.58,
# ST 6 requires >= 5), so the ONNX peer runs sentence-transformers 5.1.2 with transformers
# 4.57. Torch is installed first and pinned in every step, so pip never replaces it.
# infinity-emb 0.0.78 (the newest) resolves to sentence-transformers 3.4.1 and transformers
# 4.57: a third venv.
set -euo pipefail

ROOT="${1:-${RERANKD_BENCH_CACHE:-$HOME/.cache/rerankd-bench}}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==${TORCH_VERSION:-2.13.0}"

mkdir -p "$ROOT"
venv() {
  if [ ! -x "$1/bin/python" ]; then
    "$PYTHON" -m venv "$1"
  fi
  "$1/bin/pip" install -q "$TORCH"
}

# OpenVINO backend: sentence-transformers 6.3.0 + optimum-intel[openvino]
OV="$ROOT/enc-peers-ov"
venv "$OV"
"$OV/bin/pip" install -q "$TORCH" "sentence-transformers[openvino]==6.3.0"
# the extra drags in a torchvision built for another torch: `import transformers` then fails
# with "operator torchvision::nms does not exist"; nothing here needs it
"$OV/bin/pip" uninstall -y -q torchvision || true

# ONNX Runtime backend: sentence-transformers 5.1.2 + optimum-onnx[onnxruntime] 0.1.0
ONNX="$ROOT/enc-peers-onnx"
venv "$ONNX"
"$ONNX/bin/pip" install -q "$TORCH" "sentence-transformers[onnx]==5.1.2" \
  "optimum-onnx[onnxruntime]==0.1.0" "transformers<4.58"

# Infinity: infinity-emb[torch] 0.0.78 (its Python engine; the benchmark needs no server)
INF="$ROOT/enc-peers-infinity"
venv "$INF"
"$INF/bin/pip" install -q "$TORCH" "infinity-emb[torch]==0.0.78"

for v in "$OV" "$ONNX" "$INF"; do
  "$v/bin/python" - <<'PY'
import sys

import sentence_transformers, torch, transformers

extra = []
for name in ("onnxruntime", "openvino", "infinity_emb"):
    try:
        extra.append(f"{name} {__import__(name).__version__}")
    except ImportError:
        pass
print(f"{sys.prefix}: sentence-transformers {sentence_transformers.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}, {', '.join(extra)}")
PY
done
echo "encoder peer venvs ready under $ROOT"
