"""Shared helpers for the teacher-cache tests: tiny datasets, a tiny teacher checkpoint, specs, replays.

The teacher is a 2-block ViT-Tiny at 64 px (mid = 1 + 4×4 tokens × 192, final = 4×4 × 192,
10 classes, late = its last block) loaded from a safetensors file written here, so every run (in
this process, in a subprocess, in a Ray actor) uses the very same weights and the manifest records
a real checkpoint sha256. With no checkpoint timm's random init would differ from run to run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

TEACHER_NAME = "vit_tiny_patch16_224"
TEACHER_KWARGS = {"depth": 2, "img_size": 64, "num_classes": 10}
LATE_BLOCKS = 1
FINAL_SHAPE = (16, 192)
MID_SHAPE = (17, 192)
LOGITS_SHAPE = (10,)
FP32 = {"final": "fp32", "mid": "fp32", "logits": "fp32"}

# ---------------------------------------------------------------------------------------------- data


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Noise plus a few shapes, so features and crops differ from image to image."""
    base = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(4, width // 2)), y0 + int(rng.integers(4, height // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return image


def make_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3, corrupt: bool = True,
                     seed: int = 0) -> Path:
    """An ImageFolder (root/<class>/<image>) of small PNG and JPEG images; optionally one corrupt .jpg.

    The corrupt file sorts last in its class, so it falls into the last shard.
    """
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = _image(rng, int(rng.integers(40, 96)), int(rng.integers(40, 96)))
            if i % 2:
                image.save(root / c / f"{c}{i:03d}.jpg", quality=92)
            else:
                image.save(root / c / f"{c}{i:03d}.png")
    if corrupt:
        (root / classes[-1] / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    return root


CORRUPT_KEY = "eel/zz_broken"

# ---------------------------------------------------------------------------------------------- teacher


def save_checkpoint(path: Path, seed: int = 0, nan: bool = False) -> Path:
    """A safetensors state dict of the tiny teacher (random weights, seeded). nan: poison a late weight."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(TEACHER_NAME, **TEACHER_KWARGS)
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if nan:
        sd["norm.weight"] = torch.full_like(sd["norm.weight"], float("nan"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def teacher_dict(checkpoint) -> dict:
    return {"name": TEACHER_NAME, "checkpoint": str(checkpoint) if checkpoint else None, "late_blocks": LATE_BLOCKS,
            "kwargs": dict(TEACHER_KWARGS)}


def view_config(per_image: int = 3, seed: int = 1, **kw):
    """The spec's ViewConfig (scale and ratio as tuples, as load_cache_spec makes them from YAML lists)."""
    from pipeline.views import ViewConfig

    kw.setdefault("scale", (0.25, 1.0))
    kw.setdefault("ratio", (3 / 4, 4 / 3))
    return ViewConfig(per_image=per_image, seed=seed, **kw)


def make_spec(data: Path, output: Path, checkpoint, fmt: str = "zarr", roles=None, samples_per_shard: int = 3,
              batch_size: int = 16, per_image: int = 3, views=None, **kw):
    from pipeline.job_spec import CacheSpec

    return CacheSpec(name="t", dataset={"kind": "imagefolder", "root": str(data)}, teacher=teacher_dict(checkpoint),
                     output=str(output), views=views or view_config(per_image), format=fmt,
                     roles=dict(roles or FP32), samples_per_shard=samples_per_shard, batch_size=batch_size, **kw)


def run(spec, **kw) -> dict:
    from pipeline.cache_job import run_cache_job

    kw.setdefault("engine", "local")
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    return run_cache_job(spec, **kw)


def load_split(checkpoint):
    from pipeline.weights import load_teacher

    split, _ = load_teacher(TEACHER_NAME, checkpoint=checkpoint, late_blocks=LATE_BLOCKS, **TEACHER_KWARGS)
    return split


# ---------------------------------------------------------------------------------------------- cache facts


def manifest(root: Path) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def shard_sums(root: Path) -> dict[str, str]:
    """shard name → sha256 digest, as recorded in the manifest."""
    return {s["name"]: s["sha256"] for s in manifest(root)["shards"]}


def file_sums(root: Path) -> dict[str, str]:
    """Every file under the committed shard folders → its sha256 (what is really on disk)."""
    import hashlib

    out = {}
    for p in sorted(Path(root).glob("shard-*/**/*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def all_keys(root: Path) -> list[str]:
    from pipeline.reader import CacheReader

    reader = CacheReader(root)
    return [reader[i]["key"] for i in range(len(reader))]


def replay(split, sample: dict, view: int, views: dict | None = None):
    """(pixels, teacher outputs as numpy) of a stored view, replayed from the stored parameters.
    views: the cache manifest's ``views`` (its columns and augmentations); None: crop and flip only."""
    import torch

    from pipeline.datasets import SampleRef, load_image
    from pipeline.views import Replay

    info = split.info
    replay = Replay.from_manifest(views or {})
    ref = SampleRef(index=sample["index"], key=sample["key"], label=sample["label"], source=sample["source"],
                    member=sample.get("member"))
    params = replay.view(sample["views"][view])
    pixels = replay.pixels(load_image(ref), params, tuple(info.input_size[1:]), info.interpolation)
    with torch.inference_mode():
        out = split.targets(replay.model_input(pixels, params, info.mean, info.std)[None])
    return pixels, {k: v[0].float().numpy() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- a job in a subprocess

_KILLABLE = r"""
import json, sys, time
from pipeline.stores import STORES
fmt = json.loads(sys.argv[1])["format"]
store = STORES[fmt]
original = store.write_shard
def slow_write_shard(*a, **k):
    original(*a, **k)           # the shard's files are in its .tmp-shard-* folder now ...
    time.sleep(float(sys.argv[2]))  # ... and stay there, uncommitted, for a while
store.write_shard = slow_write_shard
from pipeline.cache_job import run_cache_job
from pipeline.job_spec import CacheSpec
from pipeline.views import ViewConfig
d = json.loads(sys.argv[1])
d["views"] = ViewConfig(**d["views"])
run_cache_job(CacheSpec(**d), engine="local", progress=False, log=lambda m: None)
print("FINISHED", flush=True)
"""


def start_job_subprocess(spec, delay: float, env_extra: dict | None = None) -> subprocess.Popen:
    """run_cache_job(spec, engine='local') in `python -c`, each shard held uncommitted for `delay` s."""
    d = spec.to_dict()
    env = os.environ | {"PYTHONPATH": str(ROOT)} | (env_extra or {})
    return subprocess.Popen([PYTHON, "-c", _KILLABLE, json.dumps(d), str(delay)], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed(root: Path) -> list[str]:
    root = Path(root)
    return sorted(p.name for p in root.glob("shard-*") if p.is_dir()) if root.is_dir() else []


def temporaries(root: Path) -> list[str]:
    root = Path(root)
    return sorted(p.name for p in root.glob(".tmp-*")) if root.is_dir() else []


def shard_temporaries(root: Path) -> list[str]:
    """The half-written shards (``.tmp-shard-*``): not the index's or the manifest's own brief temporaries,
    which come and go in milliseconds and would make a kill point meant for a half-written shard a race."""
    root = Path(root)
    return sorted(p.name for p in root.glob(".tmp-shard-*")) if root.is_dir() else []


def wait_for(pred, proc: subprocess.Popen, timeout: float = 90.0, poll: float = 0.005) -> bool:
    """Poll until pred() or the process ends or timeout; True when pred() held with the process alive."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def sigkill_when(pred, proc: subprocess.Popen, what: str, timeout: float = 90.0, jitter: float = 0.0) -> None:
    """SIGKILL `proc` once pred() holds (after `jitter` seconds more); fail the test, naming `what`,
    if the process ends before that. The process is never left running."""
    import signal

    import pytest

    try:
        if not wait_for(pred, proc, timeout=timeout):
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"{what} ended before the kill point (rc {proc.returncode}):\n{out}\n{err[-3000:]}")
        time.sleep(jitter)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
