#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu-speed.sh and bench/gpu-run.sh install on a lent GPU
# machine, which reaches no package index: this venv's versions of the project's libraries beside torch,
# for CPython 3.11 on x86-64 Linux (about 24 MB; torch, numpy and Pillow are the image's own; no Ray, no
# scikit-image). Then pass carry=[".whl", ".work/demo-data"] to the device call.
set -eu
cd "$(dirname "$0")/.."
PKGS="timm huggingface_hub hf_xet safetensors zarr numcodecs donfig google-crc32c typing_extensions webdataset braceexpand
pydantic pydantic_core annotated_types typing_inspection typer click shellingham rich markdown-it-py mdurl pygments fsspec
filelock packaging PyYAML tqdm"
pins=$(.venv/bin/pip freeze 2>/dev/null | grep -iE "^($(echo $PKGS | tr ' ' '|'))==" || true)
rm -rf .whl && mkdir .whl
echo "$pins" | .venv/bin/pip download -q --only-binary=:all: --no-deps --python-version 3.11 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .whl -r /dev/stdin
du -sh .whl && ls .whl | wc -l
