#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu-speed.sh and bench/gpu-run.sh install on a lent GPU
# machine, which reaches no package index: this venv's versions of the libraries the project needs beside
# torch, numpy and Pillow (the image's own), with everything they require, for CPython 3.11 on x86-64
# Linux (about 25 MB; no Ray, no scikit-image: the demo photos travel in .work/demo-data). Then pass
# carry [".whl", ".work/demo-data"] to the device call.
set -eu
cd "$(dirname "$0")/.."
.venv/bin/python - > .whl.txt <<'PY'
import importlib.metadata as md, re
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {"torch", "torchvision", "numpy", "pillow"}  # the GPU image's own, with what torch requires
stack, seen = ["timm", "safetensors", "zarr", "numcodecs", "webdataset", "typer", "pyyaml", "tqdm", "pydantic",
               "google-crc32c", "huggingface-hub"], {}
while stack:
    name = norm(stack.pop())
    if name in seen or name in image:
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:  # an optional requirement this venv lacks
        continue
    seen[name] = dist.version
    stack += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PY
rm -rf .whl && mkdir .whl
.venv/bin/pip download -q --only-binary=:all: --no-deps --python-version 3.11 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .whl -r .whl.txt 2>&1 \
    | grep -v "is ignored" || true
rm .whl.txt
du -sh .whl && ls .whl | wc -l
