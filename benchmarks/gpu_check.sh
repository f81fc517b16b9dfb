#!/usr/bin/env bash
# GPU-only checks of `lorakit train --dtype` (see benchmarks/gpu_check.py for what is checked and measured):
# fused LoRA/DoRA kernels on CUDA vs the plain path, DoRA's cached norm under the fused AdamW, `lorakit train
# --device cuda --dtype bf16|fp16` with an exact resume, and a bf16 step's time and peak memory vs PEFT's on
# SmolLM2-135M. On a machine without a CUDA device it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [--json benchmarks/results/gpu_check.json] [--model SMOLLM2_FOLDER] [--skip-bench]
#
# Python: $PYTHON, else .venv/bin/python, else python3 (lorakit is taken from src/, installed or not).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "no CUDA device, nothing to check"
  exit 0
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" benchmarks/gpu_check.py "$@"
