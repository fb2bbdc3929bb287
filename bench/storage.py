"""Storage study on REAL features: bytes per view for each codec, and the lossy codecs' error on
both F and φ(F). The demo teacher (ImageNet EfficientNet-Lite0) on the demo's real photos.

    .venv/bin/python bench/storage.py [--views 64] [--json out.json]     (bench/storage-demo.json: 64 views)
    .venv/bin/python bench/storage.py --swin-l-shaped --json bench/storage-swinl-shaped.json

--swin-l-shaped: the paper's Swin-L shapes instead (final 49×1536, mid 196×768, logits 1000) from a
Swin-L with one block per stage and random weights on the same photos (no pretrained Swin-L here):
its features compress differently from a trained one's, but tar's framing is fixed bytes, so the
stores' relative difference at this size is what it measures.

Each view is compressed on its own (as one zarr chunk is), with numcodecs' Zstd and Blosc.
Then the two stores themselves: the same features written as a zarr and as a webdataset shard for
every codec (roles final + logits, the default, and with mid), bytes per view of each store's files
and the cost of reading one view back (one pread + one zstd decode per entry, crc32 checked).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from pipeline.cache_job import TeacherForward, render_views, resolve_checkpoint, teacher_info_for
from pipeline.datasets import list_dataset
from pipeline.job_spec import load_cache_spec
from pipeline.schema import CODECS, RoleSpec, decode, encode
from pipeline.stores import STORES


SWIN_L_SHAPED = {"name": "swin_large_patch4_window7_224", "seed": 0, "kwargs": {"depths": [1, 1, 1, 1]}}


def real_features(n_views: int, teacher: dict | None = None) -> dict[str, np.ndarray]:
    spec = load_cache_spec("jobs/demo.yaml")
    if teacher is not None:
        spec.teacher = teacher
    refs, _, _ = list_dataset(spec.dataset)
    info = teacher_info_for(spec.teacher)
    step = max(1, len(refs) * spec.views.per_image // n_views)
    picked = refs[:: step][: -(-n_views // spec.views.per_image)]
    task = {"shard": 0, "start": 0, "end": len(picked), "refs": json.dumps([asdict(r) for r in picked])}
    row = render_views(task, spec.views, tuple(info.input_size[1:]), info.interpolation, data_root="/")
    ckpt = resolve_checkpoint(spec.teacher) if teacher is None else None
    row = TeacherForward(spec.teacher, ckpt, ["final", "mid", "logits"], 32)(row)
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


def _store_files(folder: Path) -> int:
    # the store's own files; shard.json and index/ are written alike for both formats (not here)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def stores(features: dict[str, np.ndarray], per_image: int = 4, level: int = 3, repeats: int = 3) -> dict:
    """Both stores on the same views, for every codec: bytes per view and the cost of reading a view.

    features: {role: (n_views, *shape)} with n_views a multiple of per_image (views of one sample adjacent)."""
    n = len(next(iter(features.values()))) // per_image
    samples = [{"key": f"n{i:08d}/n{i:08d}_{i}", "label": i % 1000, "index": i,
                "views": [[0.1, 0.2, 0.5, 0.6, float(v % 2)] for v in range(per_image)],
                "fingerprints": [f"{i * per_image + v:016x}" for v in range(per_image)]} for i in range(n)]
    out = {}
    for roles in (("final", "logits"), ("final", "mid", "logits")):
        for codec in CODECS:
            specs = {r: RoleSpec(r, features[r].shape[1:], codec) for r in roles}
            fields = {}
            for r in roles:
                x = features[r][: n * per_image].reshape(n, per_image, *specs[r].shape)
                fields |= encode(specs[r], x)
            row = {}
            for fmt, store in STORES.items():
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp) / "shard"
                    t0 = time.perf_counter()
                    store.write_shard(folder, specs, fields, samples, per_image, level)
                    write_s = time.perf_counter() - t0
                    size = _store_files(folder)
                    shard = store.open_shard(folder, specs)
                    shard.read(0, 0)  # open the files (a reader keeps them open)
                    best = float("inf")
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for i in range(n):
                            for v in range(per_image):
                                shard.read(i, v)
                        best = min(best, time.perf_counter() - t0)
                    shard.close()
                entries = sum(len(s.fields()) for s in specs.values())
                row[fmt] = {"bytes_per_view": round(size / (n * per_image), 1),
                            "read_us_per_view": round(best / (n * per_image) * 1e6, 1),
                            "read_us_per_entry": round(best / (n * per_image * entries) * 1e6, 1),
                            "write_ms_per_view": round(write_s / (n * per_image) * 1e3, 3)}
            row["webdataset_over_zarr"] = round(row["webdataset"]["bytes_per_view"] / row["zarr"]["bytes_per_view"] - 1, 4)
            out[f"{'+'.join(roles)} {codec}"] = row
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--json")
    p.add_argument("--swin-l-shaped", action="store_true", help="the paper's Swin-L shapes (random weights)")
    a = p.parse_args(argv)
    features = real_features(a.views, SWIN_L_SHAPED if a.swin_l_shaped else None)
    result = study(features) | {"stores": stores(features)} | {"views": a.views}
    if a.swin_l_shaped:
        result["teacher"] = SWIN_L_SHAPED
    text = json.dumps(result, indent=1)
    if a.json:
        open(a.json, "w").write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
