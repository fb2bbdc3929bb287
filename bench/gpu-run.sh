#!/usr/bin/env bash
# The benchmark on a lent CUDA machine (device tool), in one call: wheels the image lacks are carried
# in .whl/, the demo photos in .work/demo-data. Results land in $OUT (bench/results-*-cuda.json here).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCALEKD_WORK=$PWD/.work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, zarr; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__)"
nproc
timeout 330 python3 bench/step.py --repeats 5 --workers 12 --json "$OUT/results-step-cuda.json" 2>&1 | grep -v Warning
timeout 200 python3 bench/throughput.py --teacher swin_large_patch4_window7_224 \
    --engine local:4 local:8 local:14 local-serial --batch 64 --json "$OUT/results-throughput-cuda.json" 2>&1 | grep -v Warning
python3 - <<'PY'
import json, os
for f in ("results-step-cuda.json", "results-throughput-cuda.json"):
    p = os.path.join(os.environ["OUT"], f)
    if os.path.exists(p):
        d = json.load(open(p))
        for r in d.get("results", [d]):
            print(f, r.get("teacher"), r.get("seconds_per_step") or r.get("bare_forward"), r.get("ratios") or r.get("jobs"))
PY
