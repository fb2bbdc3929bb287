"""Peak RSS of the trainer with cached vs online targets, each in a fresh process.

    .venv/bin/python bench/memory.py [--teacher swin_large_patch4_window7_224] [--json out.json]

Builds a small cache of a random-weight teacher (seeded; 8 images of the demo, 1 view), then runs
two training steps (batch 2, no loader workers, so the whole trainer lives in one process) with
targets='cache' and with targets='online', and reports each process's peak resident set size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys
from pipeline.job_spec import TrainSpec
from pipeline.trainer import train
spec = TrainSpec(**json.loads(sys.argv[1]))
train(spec, progress=False, log=lambda m: None)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(teacher: str, student: str, work: Path) -> dict:
    from pipeline.cache_job import run_cache_job
    from pipeline.job_spec import CacheSpec
    from pipeline.views import ViewConfig

    cache = work / "cache"
    spec = CacheSpec(name="mem", dataset={"kind": "demo", "root": str(ROOT / ".work/demo-data"), "split": "val"},
                     teacher={"name": teacher, "seed": 0}, output=str(cache),
                     views=ViewConfig(per_image=1, seed=0), roles={"final": "fp16", "logits": "fp16"},
                     samples_per_shard=8, batch_size=4)
    # 8 images are enough: the point is the process's memory, not the numbers
    import pipeline.datasets as ds

    refs, classes, skipped = ds.list_dataset(spec.dataset)
    original = ds.list_dataset
    ds.list_dataset = lambda s: (ds.Listing.from_refs(list(refs)[:: max(1, len(refs) // 8)][:8]), classes, skipped)
    import pipeline.cache_job as cj

    cj.list_dataset = ds.list_dataset
    run_cache_job(spec, engine="local", progress=False, log=lambda m: None)
    ds.list_dataset = cj.list_dataset = original
    out = {}
    for targets in ("cache", "online"):
        train = {"name": "mem", "cache": str(cache), "student": student, "output": str(work / targets),
                 "recipe": "traditional", "epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2, "workers": 0,
                 "device": "cpu", "targets": targets}
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(train)], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        out[targets] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return {"teacher": teacher, "student": student, "peak_rss_mib": out,
            "online_over_cached": round(out["online"] / out["cache"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="swin_large_patch4_window7_224")
    p.add_argument("--student", default="resnet50")
    p.add_argument("--quick", action="store_true", help="Swin-T → ResNet-18 (a smoke run, not a measurement)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.teacher, a.student = "swin_tiny_patch4_window7_224", "resnet18"
    (ROOT / ".work").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".work") as work:
        result = measure(a.teacher, a.student, Path(work))
    text = json.dumps(result, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
