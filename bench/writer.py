"""The local engine's writer, alone: views/s it encodes and commits, by encoder threads.

    .venv/bin/python bench/writer.py [--quick] [--encoders 1 2 4] [--repeats R] [--json out.json]

One shard of 64 samples × 4 views (256 views, the demo job's shape) of teacher outputs at the
paper's shapes, default roles (final + logits, fp16 + zstd level 3), through cache_job.write_shard:
the fp32 → fp16 casts, zstd per view, the store's files, the sample index, fsync and sha256 of every
file, the atomic rename. Shapes: Swin-L final 49×1536 (7×7 tokens), EVA-L/14 final 256×1024; logits 1000.
Values: float32 Gaussian tokens around a per-channel offset (a DC component, as real ViT maps have),
seeded; real features compress a little differently (README, Storage), so the rate, not the size, is
the point. Encoder counts run round-robin (a shared machine's slow moment hits each alike), medians.
Also: the per-view zstd of one Swin-L shard in threads against processes (what the choice rests on),
and whether the cast, zstd and sha256 let another thread run while they work (gil_release).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.cache_job import write_shard  # noqa: E402
from pipeline.schema import RoleSpec  # noqa: E402
from step import machine  # noqa: E402

SHAPES = {"swin_large (final 49x1536)": (49, 1536), "eva_large_patch14 (final 256x1024)": (256, 1024)}
SAMPLES, VIEWS, CLASSES = 64, 4, 1000


def shard_row(tokens: int, channels: int, seed: int = 0) -> tuple[dict, dict]:
    """A teacher-output row as TeacherForward hands it to write_shard, and the role specs."""
    rng = np.random.default_rng(seed)
    dc = rng.normal(0, 2, (1, 1, 1, channels)).astype(np.float32)
    final = (rng.standard_normal((SAMPLES, VIEWS, tokens, channels), np.float32) + dc)
    logits = rng.standard_normal((SAMPLES, VIEWS, CLASSES), np.float32) * 3
    samples = [{"index": i, "key": f"img{i:05d}", "label": i % CLASSES, "member": None, "span": None,
                "source": f"train/img{i:05d}.jpg", "views": [[0, 0, 224, 224, 0]] * VIEWS,
                "fingerprints": [f"{i:016x}"] * VIEWS} for i in range(SAMPLES)]
    row = {"shard": 0, "start": 0, "end": SAMPLES, "final": final, "logits": logits,
           "samples": json.dumps(samples), "skipped": "[]"}
    specs = {"final": RoleSpec("final", (tokens, channels), "fp16").to_dict(),
             "logits": RoleSpec("logits", (CLASSES,), "fp16").to_dict()}
    return row, specs


def writer_rates(encoders: list[int], repeats: int, work: Path) -> list[dict]:
    out = []
    for label, (tokens, channels) in SHAPES.items():
        row, specs = shard_row(tokens, channels)
        for fmt in ("zarr", "webdataset"):
            times = {n: [] for n in encoders}
            for r in range(repeats + 1):  # the first round warms the pools and the page cache
                for n in encoders:
                    root = work / f"{fmt}-{n}-{r}"
                    root.mkdir(parents=True)
                    t = time.perf_counter()
                    rec = json.loads(write_shard(dict(row), str(root), fmt, specs, VIEWS, 3, encoders=n)["record"])
                    if r:
                        times[n].append(time.perf_counter() - t)
                    shutil.rmtree(root)
            base = times[encoders[0]]
            for n in encoders:
                s = statistics.median(times[n])
                out.append({"shape": label, "format": fmt, "encoders": n, "seconds_per_shard": round(s, 3),
                            "views_per_s": round(SAMPLES * VIEWS / s, 1), "MB_per_shard": round(rec["bytes"] / 1e6, 1),
                            f"speedup_over_{encoders[0]}": round(statistics.median(a / b for a, b in zip(base, times[n])), 3)})
                print(out[-1], flush=True)
    return out


def _compress(rows: np.ndarray) -> list[bytes]:
    from numcodecs import Zstd

    codec = Zstd(level=3, checksum=True)
    return [codec.encode(r) for r in rows]


def threads_vs_processes(workers: int, repeats: int) -> dict:
    """zstd of one Swin-L shard's 256 fp16 views: serial, `workers` threads, `workers` processes (arrays pickled over)."""
    row, _ = shard_row(*SHAPES["swin_large (final 49x1536)"])
    flat = row["final"].astype(np.float16).reshape(SAMPLES * VIEWS, -1)
    parts = np.array_split(flat, workers * 4)
    times = {"serial": [], "threads": [], "processes": []}
    with ThreadPoolExecutor(workers) as tp, ProcessPoolExecutor(workers) as pp:
        list(pp.map(_compress, parts))  # start the processes
        for _ in range(repeats):
            for kind, fn in (("serial", lambda: _compress(flat)), ("threads", lambda: list(tp.map(_compress, parts))),
                             ("processes", lambda: list(pp.map(_compress, parts)))):
                t = time.perf_counter()
                fn()
                times[kind].append(time.perf_counter() - t)
    return {"workers": workers, "views": len(flat), "MB_in": round(flat.nbytes / 1e6, 1)} | {
        f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()} | {
        f"{k}_speedup": round(statistics.median(a / b for a, b in zip(times["serial"], v)), 3)
        for k, v in times.items() if k != "serial"}


def gil_release() -> dict:
    """Does each writer step let other threads run? A pure-Python thread's progress during one large
    call, over its progress during as long a pause: ~0 when the call holds the GIL (pure Python gets
    a little from the 5 ms switch interval), a share of a core when it releases it (hashlib: known to)."""
    import hashlib
    import threading

    from numcodecs import Zstd

    x = np.random.default_rng(0).standard_normal(64 * 2**20 // 4, np.float32)
    h, codec, out = x.astype(np.float16), Zstd(level=3, checksum=True), {}
    for label, work in (("numpy astype fp32->fp16", lambda: x.astype(np.float16)),
                        ("numcodecs Zstd.encode", lambda: codec.encode(h)),
                        ("hashlib sha256 (releases the GIL)", lambda: hashlib.sha256(h.data).digest()),
                        ("pure Python sum (holds the GIL)", lambda: sum(range(3_000_000)))):
        count, stop = [0], [False]

        def spin():
            while not stop[0]:
                count[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.05)
        c0, t0 = count[0], time.perf_counter()
        work()
        dt, c1 = time.perf_counter() - t0, count[0]
        time.sleep(dt)
        c2 = count[0]
        stop[0] = True
        t.join()
        out[label] = round((c1 - c0) / max(1, c2 - c1), 2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 repeats")
    p.add_argument("--json", default=str(ROOT / "bench/results-writer.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = 2
    (ROOT / ".work").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".work") as work:
        rates = writer_rates(a.encoders, a.repeats, Path(work))
    result = {"machine": machine(), "note": f"{os.cpu_count()} cores, shared with other work while measured",
              "shard": f"{SAMPLES} samples x {VIEWS} views, final + logits fp16, zstd level 3",
              "writer": rates, "zstd_threads_vs_processes": threads_vs_processes(2, a.repeats),
              "python_thread_progress_during_call_over_idle": gil_release()}
    text = json.dumps(result, indent=1)
    Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
