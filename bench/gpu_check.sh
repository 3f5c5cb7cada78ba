#!/usr/bin/env bash
# One prepared GPU session (run from the repo root on a machine with a GPU and PyTorch, no network):
# darknet_cfg importable without installing, the cuda-marked tests, then bench/gpu.py.
#   DARKNET_CFG_SHARED=/path/to/shared OUT=/tmp/gpu bash bench/gpu_check.sh
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/darknet-cfg-gpu}"
mkdir -p "$OUT"
export DARKNET_CFG_SHARED="${DARKNET_CFG_SHARED:-$REPO/../shared}"
export PYTHONUNBUFFERED=1
# the installed layout (darknet_cfg.layers = layers/, ...) as a folder on PYTHONPATH
PKG="$(mktemp -d)"
cp -r "$REPO/darknet_cfg" "$PKG/darknet_cfg"
for sub in layers converters cfg; do ln -s "$REPO/$sub" "$PKG/darknet_cfg/$sub"; done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
cd "$PKG"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
  "import torch, darknet_cfg; print(torch.__version__, torch.cuda.is_available(), darknet_cfg.__file__)"; } \
  2>&1 | tee "$OUT/env.txt"
export DARKNET_CFG_REPORT="$OUT/low_precision.jsonl"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -s -p no:cacheprovider -m cuda -rfE \
  ${TEST_SELECT:+-k "$TEST_SELECT"} "$REPO/tests/test_cuda.py" > "$OUT/cuda_tests.log" 2>&1
tail -n 30 "$OUT/cuda_tests.log"
[ -n "${SKIP_INFER:-}" ] || timeout "${INFER_TIMEOUT:-150}" python3 "$REPO/bench/gpu.py" --only infer \
  --json "$OUT/infer.json" 2>&1 | tee "$OUT/bench_infer.log"
timeout "${E2E_TIMEOUT:-90}" python3 "$REPO/bench/gpu.py" --only e2e --quick --json "$OUT/e2e.json" \
  2>&1 | tee "$OUT/bench_e2e.log"
timeout "${TRAIN_TIMEOUT:-150}" python3 "$REPO/bench/gpu.py" --only train --quick \
  --json "$OUT/train.json" 2>&1 | tee "$OUT/bench_train.log"
