#!/usr/bin/env bash
# Prepared GPU check (issue 5, item 6): torch CUDA fp16/bf16 fidelity, the compiled Triton kernel vs torch, and
# tokens/s of the torch CUDA backend at B32xL512. Writes OUT_DIR/gpu_check.json; exit 1 if a check fails.
#   scripts/gpu_check.sh OUT_DIR            # on a CUDA machine (< 5 minutes on an H200)
#   scripts/gpu_check.sh OUT_DIR --dry-run  # anywhere: same code paths on CPU, Triton interpreter
set -euo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [--dry-run]}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
if [[ " $* " == *" --dry-run "* ]]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi
mkdir -p "$OUT"
exec timeout 290 "$PY" "$REPO/scripts/gpu_check.py" "$OUT" "$@"
