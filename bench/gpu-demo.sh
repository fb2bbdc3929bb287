#!/usr/bin/env bash
# The demo's two jobs on a lent CUDA machine (device tool; carry .whl, .work/demo-data, .work/weights):
# cache-teacher with the local engine on the GPU, then distill from the cache and online (bf16
# student steps, channels-last), 6 epochs each. Metrics land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCALEKD_WORK=$PWD/.work
nvidia-smi --query-gpu=name --format=csv,noheader
SECONDS=0
python3 -m pipeline.cli cache-teacher jobs/demo.yaml --engine local -o /tmp/cache 2>&1 | grep -v Warning | tail -4
echo "cache-teacher seconds: $SECONDS"
for targets in cache online; do
  SECONDS=0
  python3 -m pipeline.cli distill jobs/demo.yaml --cache /tmp/cache --targets $targets -o /tmp/run-$targets \
      --workers 8 2>&1 | grep -E "epoch|error" | tail -7
  echo "distill $targets seconds: $SECONDS"
  cp /tmp/run-$targets/metrics.jsonl "$OUT/metrics-$targets.jsonl"
done
