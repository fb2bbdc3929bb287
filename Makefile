# Two commands on a fresh machine:  make cache-teacher   and   make test
# Every target sets up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned to the build this project is tested with: an unpinned torch pulled in by
# another package would resolve to a multi-GB download. Override for another platform, e.g.
#   make setup TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
JOB    ?= jobs/demo.yaml
PYTEST_ARGS ?=
export RAY_AUTH_MODE ?= disabled

.PHONY: setup test test-slow cache-teacher distill inspect demo-results bench bench-quick bench-scale clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The caching job (Ray; a local Ray is started when no cluster is given). JOB=jobs/<spec>.yaml for another.
cache-teacher: setup
	$(BIN)/scalekd-pipeline cache-teacher $(JOB)

# The student trainer on the cache that `make cache-teacher` wrote (JOB= for another spec); the job's
# cache is made first when it is missing or unfinished.
distill: setup
	$(BIN)/scalekd-pipeline distill $(JOB) --cache-first

# What the demo cache holds, verified, with its spectrum plot.
inspect: setup
	$(BIN)/scalekd-pipeline inspect-shards cache/demo --verify --plot cache/demo-spectrum.png

# The demo comparison on held-out tiles: student alone, logit KD only, ScaleKD from the cache (K = 4 and
# K = 1 views) and online; same student, epochs and seeds; writes bench/demo-results/results.{json,md}.
# About 13 min on 2 cores. DEMO_ARGS=--quick for a 2-minute smoke (bench/demo-results-quick).
DEMO_ARGS ?=
demo-results: setup
	$(BIN)/python bench/demo_results.py $(DEMO_ARGS)

# The benchmark: training step (online / cached / in memory / plain) at the paper's shapes, caching
# throughput, storage and memory; writes bench/results.json and bench/results.md. Not a test.
bench: setup
	$(BIN)/python bench/step.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/storage.py --json bench/storage-demo.json > /dev/null
	$(BIN)/python bench/memory.py --json bench/memory-swinl.json
	$(BIN)/python bench/precision.py
	$(BIN)/python bench/writer.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/report.py

# ImageNet-1K scale (1,281,167 images × K = 4): the cache's metadata, reads and bookkeeping, on synthetic
# metadata of full size (kept in .work/scale, ~3 GB, and 8.5 GB of webdataset tars); writes bench/results-scale.{json,md}
# and bench/results-tar-listing.json (the input listing: the header scan vs tarfile). SCALE_ARGS=--quick for CI.
SCALE_ARGS ?=
bench-scale: setup
	$(BIN)/python bench/scale.py $(SCALE_ARGS)
	$(BIN)/python bench/tar_listing.py $(SCALE_ARGS)

# A smoke run of the benchmark code (CI-sized; its numbers are not measurements).
bench-quick: setup
	$(BIN)/python bench/step.py --quick --json .work/results-step-quick.json
	$(BIN)/python bench/throughput.py --quick --json .work/results-throughput-quick.json
	$(BIN)/python bench/memory.py --quick --json .work/memory-quick.json
	$(BIN)/python bench/precision.py --quick --json .work/results-precision-quick.json
	$(BIN)/python bench/writer.py --quick --json .work/results-writer-quick.json
	$(BIN)/python bench/loader.py --samples 8 --repeats 1 --json .work/results-loader-quick.json
	$(BIN)/python bench/scale.py --quick
	$(BIN)/python bench/tar_listing.py --quick

clean:
	rm -rf .work cache runs
