python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCALEKD_WORK=$PWD/.work
timeout 300 python3 bench/throughput.py --teacher swin_large_patch4_window7_224 --engine local:4 local:p4 local:p8 local:p14 local-serial --batch 64 --json "$OUT/results-throughput-cuda.json" 2>&1 | grep -E '"engine"|steady|samples_per_s|Error|error'
