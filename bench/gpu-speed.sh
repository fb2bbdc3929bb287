#!/usr/bin/env bash
# The GPU rows, in one device call of at most 8 minutes (prepared and smoke-run on CPU, not yet run on
# a GPU). Teacher precision (speed and error of bf16 / fp16 against fp32, Swin-L and EVA-L/14, batch 64);
# the local engine's steady state with 1 and 4 encoder threads, fp32 and bf16 teacher; the cached
# Swin-L → ResNet-50 step back to back with 12, 8 and 4 loader workers (uint8 pixels normalised on the GPU). Wheels the
# image lacks are carried in .whl/, as for bench/gpu-run.sh. Results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCALEKD_WORK=$PWD/.work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 100 python3 bench/precision.py --batch 64 --repeats 5 --json "$OUT/results-precision-cuda.json" 2>&1 | grep -E 'teacher|speedup|rel_l2|Error'
for p in fp32 bf16; do
  timeout 140 python3 bench/throughput.py --teacher swin_large_patch4_window7_224 --engine local:4 --encoders 1 4 \
      --batch 64 --precision $p --json "$OUT/results-throughput-encoders-$p-cuda.json" 2>&1 | grep -E '"encoders"|steady_over|Error'
done
timeout 150 python3 bench/step.py --teachers swin_large_patch4_window7_224 --repeats 5 --workers 12 --sweep-workers 8 4 \
    --json "$OUT/results-step-workers-cuda.json" 2>&1 | grep -E 'cached_back_to_back_s|"s"|Error'
