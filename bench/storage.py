"""Storage study on REAL features: bytes per view for each codec, and the lossy codecs' error on
both F and φ(F). The demo teacher (ImageNet EfficientNet-Lite0) on the demo's real photos.

    .venv/bin/python bench/storage.py [--views 64] [--json out.json]

Each view is compressed on its own (as one zarr chunk is), with numcodecs' Zstd and Blosc.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np
from numcodecs import Blosc, Zstd

from pipeline.cache_job import TeacherForward, render_views, resolve_checkpoint, teacher_info_for
from pipeline.datasets import list_dataset
from pipeline.job_spec import load_cache_spec
from pipeline.schema import RoleSpec, decode, encode


def real_features(n_views: int) -> dict[str, np.ndarray]:
    spec = load_cache_spec("jobs/demo.yaml")
    refs, _, _ = list_dataset(spec.dataset)
    info = teacher_info_for(spec.teacher)
    step = max(1, len(refs) * spec.views.per_image // n_views)
    picked = refs[:: step][: -(-n_views // spec.views.per_image)]
    task = {"shard": 0, "start": 0, "end": len(picked), "refs": json.dumps([asdict(r) for r in picked])}
    row = render_views(task, spec.views, tuple(info.input_size[1:]), info.interpolation, data_root="/")
    row = TeacherForward(spec.teacher, resolve_checkpoint(spec.teacher), ["final", "mid", "logits"], 32)(row)
    return {r: row[r].reshape(-1, *row[r].shape[2:])[:n_views] for r in ("final", "mid", "logits")}


def _size(arrays: list[np.ndarray], codec) -> int:
    return sum(len(codec.encode(np.ascontiguousarray(a))) if codec else a.nbytes for a in arrays)


def _errors(ref: np.ndarray, approx: np.ndarray) -> dict:
    def stats(a, b):
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
        return {"rel_l2": round(rel, 6), "worst_token_cosine": round(float(cos.min()), 6)}

    phi = lambda x: x - x.mean(axis=1, keepdims=True)  # noqa: E731  (per view, over tokens)
    return {"F": stats(ref, approx), "phi(F)": stats(phi(ref), phi(approx))}


def study(features: dict[str, np.ndarray]) -> dict:
    zstd = Zstd(level=3)
    variants = {
        "fp32+zstd": ("fp32", zstd),
        "fp16 (no compression)": ("fp16", None),
        "fp16+zstd": ("fp16", zstd),
        "fp16+blosc-zstd byteshuffle": ("fp16", Blosc("zstd", 3, Blosc.SHUFFLE)),
        "fp16+blosc-zstd bitshuffle": ("fp16", Blosc("zstd", 3, Blosc.BITSHUFFLE)),
        "int8 per-channel+zstd": ("int8", zstd),
        "int8dc (DC-split)+zstd": ("int8dc", zstd),
    }
    out = {}
    for role, x in features.items():
        raw = x[0].nbytes
        spec_shape = x.shape[1:]
        rows = {}
        for name, (codec, compressor) in variants.items():
            spec = RoleSpec(role, spec_shape, codec)
            fields = [encode(spec, v) for v in x]
            size = sum(_size([f[k] for k in f], compressor) for f in fields) / len(x)
            row = {"bytes_per_view": round(size, 1), "ratio_to_fp32": round(raw / size, 2)}
            if codec != "fp32" and role != "logits":
                approx = np.stack([decode(spec, f) for f in fields])
                row["error"] = _errors(x, approx)
            rows[name] = row
        sparsity = float((x == 0).mean())
        out[role] = {"shape": list(spec_shape), "raw_fp32_bytes_per_view": raw, "zero_fraction": round(sparsity, 3),
                     "variants": rows}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--json")
    a = p.parse_args(argv)
    result = study(real_features(a.views)) | {"views": a.views}
    text = json.dumps(result, indent=1)
    if a.json:
        open(a.json, "w").write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
