"""Caching throughput: the cache job's rate against the bare teacher forward on the same views.

    .venv/bin/python bench/throughput.py [--engine local local-serial ray ray:1] [--teacher NAME] [--rounds N]
                                         [--copies N] [--per-image K] [--json out.json]

The demo job (real EfficientNet-Lite0, 240 photos' tiles × K views, batch 32) is run into a fresh
folder; the bare forward runs the same teacher on the same views, already rendered and in memory,
in the same batches (no decoding, compression or writing). Reported: end to end (teacher load and
Ray start included) and steady state (the spacing of shard commits, read off the shard.json
modification times, against the bare forward's time for one shard).
Engines: local (render threads ahead, a writer thread behind the teacher), local-serial (the three
stages one after another: the before of that change), ray, ray:N (each teacher actor works on N shards
at once, in threads; ray:1 renders, forwards and writes one shard at a time). --teacher swaps in a random-weight timm
teacher (e.g. swin_large_patch4_window7_224, for a GPU run where Lite0 is too small to measure).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache_job import TeacherForward, render_views, resolve_checkpoint, run_cache_job  # noqa: E402
from pipeline.datasets import list_dataset  # noqa: E402
from pipeline.job_spec import load_cache_spec  # noqa: E402
from pipeline.views import normalize  # noqa: E402
from scalekd.targets import teacher_precision  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from step import machine  # noqa: E402


def bare_forward(spec) -> dict:
    """Seconds per shard of the teacher alone on the shard's views, in the job's batches."""
    refs, _, _ = list_dataset(spec.dataset)
    forward = TeacherForward(spec.teacher, resolve_checkpoint(spec.teacher), list(spec.roles), spec.batch_size)
    info = forward.split.info
    per_shard = []
    for start in range(0, len(refs), spec.samples_per_shard):
        task = {"shard": 0, "start": start, "end": start + spec.samples_per_shard,
                "refs": json.dumps([asdict(r) for r in refs[start : start + spec.samples_per_shard]])}
        pixels = render_views(task, spec.views, tuple(info.input_size[1:]), info.interpolation, data_root="/")["pixels"]
        batches = [normalize(pixels[i : i + spec.batch_size], info.mean, info.std)
                   for i in range(0, len(pixels), spec.batch_size)]
        t = time.perf_counter()
        with torch.inference_mode(), teacher_precision(forward.device, forward.precision):
            for x in batches:
                forward.split.targets(x.to(forward.device))
        if forward.device.type == "cuda":
            torch.cuda.synchronize()
        per_shard.append(time.perf_counter() - t)
    return {"seconds_per_shard": per_shard, "total_s": sum(per_shard), "samples": len(refs)}


def copied_dataset(spec, copies: int) -> dict:
    """The demo's training images ``copies`` times over, as an ImageFolder of hard links (each copy its
    own key, so its own views; a symlink out of the dataset's root would be skipped by the listing): a
    longer job made of the same kind of shards."""
    list_dataset(spec.dataset)  # builds the demo's photos if they are not there yet
    source = (ROOT / spec.dataset["root"]) / spec.dataset["split"]
    root = ROOT / ".work" / f"throughput-copies-{copies}"
    for image in sorted(p for p in source.glob("*/*") if p.is_file()):
        for c in range(copies):
            link = root / "train" / image.parent.name / f"{image.stem}_c{c}{image.suffix}"
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(image, link)
    return {"kind": "imagefolder", "root": str(root), "split": "train"}


def job(spec, engine: str, out: Path, encoders: int | None = None) -> dict:
    spec = replace(spec, output=str(out))
    t = time.perf_counter()
    kw = {"engine": engine}
    if engine.startswith("ray:"):  # ray:N = each teacher actor works on N shards at once (ray:1 = in series)
        kw = {"engine": "ray", "ray_calls": int(engine.split(":")[1])}
    if engine.startswith("local"):  # local:N = N render threads, local:pN = N processes, local-serial = in series
        kw = {"engine": "local", "local_threads": 0 if engine == "local-serial" else None}
        if ":" in engine:
            n = engine.split(":")[1]
            kw |= {"local_threads": int(n.lstrip("p")), "local_render": "processes" if n[0] == "p" else "threads"}
        kw |= {"local_encoders": encoders}
    summary = run_cache_job(spec, progress=False, log=lambda m: None, **kw)
    total = time.perf_counter() - t
    commits = sorted(p.stat().st_mtime for p in out.glob("shard-*/shard.json"))
    gaps = [b - a for a, b in zip(commits, commits[1:])]
    return {"engine": engine, "encoders": encoders if engine.startswith("local") else None, "total_s": round(total, 2), "samples": summary["samples"],
            "samples_per_s": round(summary["samples"] / total, 3),
            "steady_seconds_per_shard": round(statistics.median(gaps), 3) if gaps else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", nargs="*", default=["local", "local-serial", "ray"],
                   help="local (default render workers), local:N (N render threads), local:pN (N processes), "
                        "local-serial, ray, ray:N (each teacher actor on N shards at once; 1: in series)")
    p.add_argument("--teacher", default=None, help="a timm teacher with random weights instead of the demo's Lite0")
    p.add_argument("--batch", type=int, default=None, help="teacher batch (default: the demo job's 32)")
    p.add_argument("--encoders", type=int, nargs="*", default=[None],
                   help="the local engine's encoder threads, each count a run of every local engine (default: min(4, cores))")
    p.add_argument("--precision", default=None, help="teacher.precision for the job and the bare forward: fp32, bf16 "
                   "or fp16 (CUDA only); default the job's")
    p.add_argument("--rounds", type=int, default=1, help="run every engine this many times, alternating; "
                   "the medians are reported too")
    p.add_argument("--per-image", type=int, default=None, help="views per image (default: the demo job's 4)")
    p.add_argument("--copies", type=int, default=1, help="the demo's images this many times over (hard links, "
                   "each copy its own views): 4 makes a job of about 2 minutes on a 2-core CPU")
    p.add_argument("--quick", action="store_true", help="the local engine on the 80 held-out tiles, 1 view "
                   "(a smoke run, not a measurement)")
    p.add_argument("--json", default=str(ROOT / "bench/results-throughput.json"))
    a = p.parse_args(argv)
    spec = load_cache_spec(ROOT / "jobs/demo.yaml")
    if a.quick:
        a.engine = ["local"]
        spec = replace(spec, dataset=spec.dataset | {"split": "val"}, views=replace(spec.views, per_image=1))
    if a.copies > 1:
        spec = replace(spec, dataset=copied_dataset(spec, a.copies))
    if a.per_image:
        spec = replace(spec, views=replace(spec.views, per_image=a.per_image))
    if a.teacher:
        spec = replace(spec, teacher={"name": a.teacher, "seed": 0, "late_blocks": 2})
    if a.precision:
        spec = replace(spec, teacher=spec.teacher | {"precision": a.precision})
    if a.batch:
        spec = replace(spec, batch_size=a.batch, samples_per_shard=max(spec.samples_per_shard, a.batch))
    bare = bare_forward(spec)
    bare_shard = statistics.median(bare["seconds_per_shard"])
    result = {"machine": machine(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "teacher": spec.teacher["name"], "precision": spec.teacher.get("precision", "fp32"),
              "views_per_image": spec.views.per_image, "batch": spec.batch_size,
              "bare_forward": {"total_s": round(bare["total_s"], 2), "seconds_per_shard": round(bare_shard, 3),
                               "samples_per_s": round(bare["samples"] / bare["total_s"], 3)}, "jobs": []}
    (ROOT / ".work").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".work") as work:
        runs = [(e, n) for e in a.engine for n in (a.encoders if e.startswith("local") else [None])]
        for round_ in range(a.rounds):
            for engine, encoders in runs:
                r = job(spec, engine, Path(work) / f"{engine}-{encoders}-{round_}", encoders)
                r["round"] = round_
                r["end_to_end_over_bare"] = round(r["samples_per_s"] / result["bare_forward"]["samples_per_s"], 3)
                if r["steady_seconds_per_shard"]:
                    r["steady_over_bare"] = round(bare_shard / r["steady_seconds_per_shard"], 3)
                result["jobs"].append(r)
        if a.rounds > 1:
            result["medians"] = {}
            for engine, encoders in runs:
                mine = [r for r in result["jobs"] if r["engine"] == engine and r["encoders"] == encoders]
                result["medians"][engine if encoders is None else f"{engine} encoders={encoders}"] = {
                    k: round(statistics.median(r[k] for r in mine), 3)
                    for k in ("total_s", "end_to_end_over_bare", "steady_over_bare") if all(k in r for r in mine)}
    text = json.dumps(result, indent=1)
    Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
