#!/usr/bin/env bash
# Issue 13's GPU rows, in one device call (prepared, NOT yet run: no GPU was lent when it was written).
# Teacher precision (speed and error of bf16 / fp16 against fp32, Swin-L and EVA-L/14, batch 64) and
# the local engine's steady state with 1 and 4 encoder threads, fp32 and bf16 teacher. Wheels the
# image lacks are carried in .whl/, as for bench/gpu-run.sh. Results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCALEKD_WORK=$PWD/.work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 bench/precision.py --batch 64 --repeats 5 --json "$OUT/results-precision-cuda.json" 2>&1 | grep -E 'teacher|speedup|rel_l2|Error'
for p in fp32 bf16; do
  timeout 200 python3 bench/throughput.py --teacher swin_large_patch4_window7_224 --engine local:4 --encoders 1 4 \
      --batch 64 --precision $p --json "$OUT/results-throughput-encoders-$p-cuda.json" 2>&1 | grep -E '"encoders"|steady_over|Error'
done
