#!/usr/bin/env bash
# The GPU rows, in one device call of at most 8 minutes (prepared and smoke-run on CPU, not yet run on
# a GPU; the timeouts add up to 455 s). First the correctness checks only a GPU can show
# (bench/cuda_checks.py: the device-made model input against the CPU's bits, an fp32 teacher's
# convolutions without TF32, the GPU's random stream in a checkpoint). Then teacher precision (speed
# and error of bf16 / fp16 against fp32, Swin-L and EVA-L/14, batch 64); the local engine's steady
# state with 1 and 4 encoder threads, fp32 and bf16 teacher; the cached Swin-L → ResNet-50 step back
# to back with 12, 8 and 4 loader workers (uint8 pixels normalised on the GPU). Wheels the image lacks:
# bench/gpu-prepare.sh fills .whl/, carried with .work/demo-data (run: carry [".whl", ".work/demo-data"],
# timeout_s 560). Results land in $OUT.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCALEKD_WORK=$PWD/.work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, zarr, pydantic; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__)"
timeout 45 python3 bench/cuda_checks.py --json "$OUT/results-cuda-checks.json" 2>&1 | grep -E '^(ok|FAIL)|all_ok|Error'
timeout 90 python3 bench/precision.py --batch 64 --repeats 5 --json "$OUT/results-precision-cuda.json" 2>&1 | grep -E 'teacher|speedup|rel_l2|Error'
for p in fp32 bf16; do
  timeout 95 python3 bench/throughput.py --teacher swin_large_patch4_window7_224 --engine local:4 --encoders 1 4 \
      --batch 64 --precision $p --json "$OUT/results-throughput-encoders-$p-cuda.json" 2>&1 | grep -E '"encoders"|steady_over|Error'
done
timeout 130 python3 bench/step.py --teachers swin_large_patch4_window7_224 --repeats 5 --workers 12 --sweep-workers 8 4 \
    --json "$OUT/results-step-workers-cuda.json" 2>&1 | grep -E 'cached_back_to_back_s|"s"|Error'
