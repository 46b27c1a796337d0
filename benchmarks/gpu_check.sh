#!/usr/bin/env bash
# Issue 6's one command for a session with a GPU (run from anywhere): GPU tests, the device's
# matmul rate and copy bandwidth, and the issue's figures, written under $OUT (default
# ./gpu_check_out). Extra arguments go to gpu_check.py (--quick, --skip-tests, --skip-hf).
# Nothing is installed: the device image's python3 has torch, triton and transformers, and the
# repo runs from its checkout (PYTHONPATH), not from a pip install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="$(command -v python3 || command -v python)"
{ nvidia-smi; "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } >"$OUT/env.txt" 2>&1
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
