"""The trainer's loader, one sample at a time: CPU milliseconds per sample, split by stage.

    .venv/bin/python bench/loader.py [--samples N] [--repeats R] [--json out.json]

What a DataLoader worker does for one cached sample (pipeline/train_data.py), timed stage by stage in
one process with one torch thread (as a worker runs): the image file read and JPEG decode, the view
rendered at the student's input size (crop, resize, flip, and for S views RandAugment), the worker's
part of the model's input, the cache read of the view's Swin-L-sized targets (final 49×1536 and logits
1000, fp16 + zstd), and the batch collation (per sample, batches of 64). Also the whole
``ViewDataset.__getitem__`` + collate, which the worker's stages should add up to.

Three variants side by side in one run, the same model input in each (tested bit for bit):
``now`` (the loader as it is: uint8 pixels and the erasing's boxes and fills handed on, normalised and
erased on the trainer's device, ``on_device``, timed here on this CPU and kept apart from the worker's
stages; targets as stored, fp16), ``float`` (the float32 input made in the worker, contiguous uint8 made
float in place; targets as stored) and ``before`` (targets decoded to float32 in the worker, and the
normalisation on the permuted pixels, two temporaries).

The images are 500×375 JPEGs (quality 90, ImageNet's typical size) cut from scikit-image's sample
photos. The targets come from a Swin-L-shaped teacher with one block per stage and random weights
(final 49×1536, as Swin-L's): the loader's cost depends on the targets' shape, not on their values.
Views: plain (crop + flip) and S (+ RandAugment rand-m9-mstd0.5-inc1 + erasing .25). Medians over
repeats of the per-sample means.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from step import machine  # noqa: E402

VIEWS = {"plain": {}, "S": {"rand_augment": "rand-m9-mstd0.5-inc1", "erasing": 0.25}}
BATCH = 64
VARIANTS = ("before", "float", "now")


def make_images(root: Path, n: int) -> Path:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        w, h = photo.size
        s = max(500 / w, 375 / h) * rng.uniform(1.0, 1.3)
        photo = photo.resize((round(w * s), round(h * s)), Image.BICUBIC)
        left, top = int(rng.integers(0, photo.size[0] - 500 + 1)), int(rng.integers(0, photo.size[1] - 375 + 1))
        folder = root / "train" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((left, top, left + 500, top + 375)).save(folder / f"img{i:04d}.jpg", quality=90)
    return root


def make_cache(data: Path, out: Path, views: dict) -> Path:
    from pipeline.cache_job import run_cache_job
    from pipeline.job_spec import CacheSpec
    from pipeline.views import ViewConfig

    spec = CacheSpec(name="loader", dataset={"kind": "imagefolder", "root": str(data), "split": "train"},
                     teacher={"name": "swin_large_patch4_window7_224", "seed": 0, "kwargs": {"depths": [1, 1, 1, 1]}},
                     output=str(out), views=ViewConfig(per_image=1, **views), roles={"final": "fp16", "logits": "fp16"},
                     samples_per_shard=64, batch_size=16, device="cpu")
    run_cache_job(spec, engine="local", progress=False, log=lambda m: None)
    return out


def _normalize_before(pixels, mean, std):
    """pipeline.views.normalize as it was: the float conversion and arithmetic on the permuted pixels."""
    x = torch.as_tensor(np.array(pixels, copy=True)).permute(2, 0, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x.float().div_(255) - mean) / std


def stages(cache: Path, variant: str, student_size=(224, 224)) -> dict[str, float]:
    """Seconds per sample of each stage over every sample of the cache, view 0."""
    from pipeline.augment import apply_erasing
    from pipeline.datasets import SampleRef, load_image
    from pipeline.reader import CacheReader
    from pipeline.train_data import ModelInput, ViewDataset, collate_skipping
    from pipeline.views import Erasing, Replay, to_model_input

    reader = CacheReader(cache)
    replay = Replay.from_manifest(reader.manifest["views"])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = {k: 0.0 for k in ("decode", "render", "to_input", "cache_read", "collate", "on_device", "getitem+collate")}
    items = []
    n = len(reader)
    for i in range(n):
        s = reader[i]
        a = time.perf_counter()
        image = load_image(SampleRef.from_sample(s))
        b = time.perf_counter()
        view = replay.view(s["views"][0])
        pixels = replay.pixels(image, view, student_size, "bicubic")
        c = time.perf_counter()
        if variant == "now":  # uint8 as rendered, and the erasing's boxes and fills (drawn from the view's seed)
            x = {"image": torch.from_numpy(pixels)}
            if replay.config.erasing:
                x["image_erasing"] = Erasing.of_view(view, student_size, replay.config.erasing_mode)
        elif variant == "float":
            x = {"image": replay.model_input(pixels, view, mean, std)}
        else:
            x = {"image": _normalize_before(pixels, mean, std)}
            if view.erase:
                x["image"] = apply_erasing(x["image"], view.erase, view.erase_seed, replay.config.erasing_mode)
        d = time.perf_counter()
        stored = reader.read(i, 0, ["final", "logits"], dtype=np.float32 if variant == "before" else None)
        item = x | {"label": torch.tensor(s["label"]), "final": torch.from_numpy(stored["final"]),
                    "logits": torch.from_numpy(stored["logits"])}
        e = time.perf_counter()
        t["decode"] += b - a
        t["render"] += c - b
        t["to_input"] += d - c
        t["cache_read"] += e - d
        items.append(item)
    for k in range(0, n, BATCH):
        a = time.perf_counter()
        batch = collate_skipping(items[k:k + BATCH])
        t["collate"] += time.perf_counter() - a
        if variant == "now":  # what the trainer does with the batch on its device: here the CPU, one thread
            a = time.perf_counter()
            to_model_input(batch["image"], batch.get("image_erasing"), mean, std)
            t["on_device"] += time.perf_counter() - a
    if variant == "now":
        student = ModelInput(student_size, "bicubic", mean, std)
        data = ViewDataset(reader, student, ModelInput((224, 224), "bicubic", mean, std))
        a = time.perf_counter()
        for k in range(0, n, BATCH):
            collate_skipping([data[i] for i in range(k, min(n, k + BATCH))])
        t["getitem+collate"] = time.perf_counter() - a
    else:
        t.pop("getitem+collate")
        t.pop("on_device")
    return {k: v / n for k, v in t.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results-loader.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as a DataLoader worker runs
    (ROOT / ".work").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".work") as tmp:
        work = Path(tmp)
        data = make_images(work / "data", args.samples)
        caches = {name: make_cache(data, work / f"cache-{name}", v) for name, v in VIEWS.items()}
        runs = {f"{name} {variant}": [] for name in VIEWS for variant in VARIANTS}
        for _ in range(args.repeats):  # round robin: a slow moment of a shared machine hits each alike
            for name, cache in caches.items():
                for variant in VARIANTS:
                    runs[f"{name} {variant}"].append(stages(cache, variant))
    result = {"machine": machine(), "samples": args.samples, "repeats": args.repeats, "student_input": [224, 224],
              "targets": {"final": [49, 1536], "logits": [1000], "codec": "fp16"},
              "ms_per_sample": {name: {k: round(1e3 * statistics.median(r[k] for r in rs), 3) for k in rs[0]}
                                for name, rs in runs.items()}}
    for name, ms in result["ms_per_sample"].items():
        worker = {k: v for k, v in ms.items() if k not in ("getitem+collate", "on_device")}
        ms["sum_of_stages"] = round(sum(worker.values()), 3)  # a worker's, the device's share apart
        ms["non_decode"] = round(sum(v for k, v in worker.items() if k != "decode"), 3)
    for name in VIEWS:
        before = result["ms_per_sample"][f"{name} before"]
        for variant in VARIANTS[1:]:
            now = result["ms_per_sample"][f"{name} {variant}"]
            result.setdefault(f"{variant}_over_before", {})[name] = {
                k: round(now[k] / before[k], 3) for k in ("to_input", "cache_read", "collate", "non_decode", "sum_of_stages")}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k == "ms_per_sample" or k.endswith("_over_before")}, indent=2))
    return result


if __name__ == "__main__":
    main()
