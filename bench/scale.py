"""ImageNet-1K scale: what the cache's metadata, reads and bookkeeping cost at 1,281,167 images × K views.

    .venv/bin/python bench/scale.py [--quick] [--samples N] [--views K] [--json bench/results-scale.json]

It synthesises, under .work/scale/ (kept between runs; several GB at full size):
- an ImageFolder of N empty files in 1,000 class folders (ImageNet's layout and file names);
- a cache of it written by the project's own commit path (``commit_shard``): real metadata (keys,
  labels, relative sources, views sampled by ``sample_views``, fingerprints), 256 samples a shard,
  tiny feature arrays (final (1, 8) + logits (4,), fp16), in the zarr store;
- a small cache with Swin-L's real target shapes (final 49 × 1536 + logits 1000, fp16) in both stores;
- 1,282 input tars of 1,000 members each (an image entry + a .cls + a .json side member), as timm
  and HF write ImageNet;
- 400 JPEGs of 500 × 375 (ImageNet val's typical size) for the validation loader's rate.

and measures, each in a fresh process where memory matters, the rows of docs/benchmarks.md's table:
reader_open, forked_worker_epoch, cached_item_read, input_tar_read, validation_epoch, driver,
listing, webdataset_side_members. Timings are medians; nothing here is a test.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGENET = 1_281_167
CLASSES = 1000
PER_SHARD = 256


# ---------------------------------------------------------------------------------------------- helpers

def rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_mb() -> dict:
    """This process's private memory (MiB): Private_Dirty is what a forked worker has written or
    copied (anonymous copy-on-write pages: the cost per worker); Private_Clean is file pages only
    it has mapped in (the memory-mapped index read through the page cache, which every process
    shares: it costs RAM once per machine, not per worker)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1])
    return {"dirty": fields.get("Private_Dirty", 0) / 1024, "clean": fields.get("Private_Clean", 0) / 1024}


def in_subprocess(measure: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter (its memory is its own); returns its JSON."""
    cmd = [sys.executable, __file__, "--measure", measure, "--samples", str(args.samples), "--views", str(args.views),
           "--work", str(args.work), "--tars", str(args.tars)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{measure} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def class_name(c: int) -> str:
    return f"n{1440764 + c * 977:08d}"  # ImageNet-like synset ids (not the real ones)


def per_class(n: int) -> list[int]:
    base, extra = divmod(n, CLASSES)
    return [base + (c < extra) for c in range(CLASSES)]


# ---------------------------------------------------------------------------------------------- synthesis

def make_imagefolder(root: Path, n: int) -> Path:
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return root
    for c, count in enumerate(per_class(n)):
        folder = root / "train" / class_name(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            os.close(os.open(folder / f"{class_name(c)}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    done.write_text(str(n))
    return root


def make_scale_cache(work: Path, n: int, k: int, log) -> Path:
    """A cache of the synthetic ImageFolder with real metadata and tiny arrays, through commit_shard."""
    from pipeline.datasets import list_dataset
    from pipeline.job_spec import CacheSpec
    from pipeline.ledger import Ledger
    from pipeline.cache_job import _manifest_header, _config
    from pipeline.schema import RoleSpec, encode
    from pipeline.shards import commit_shard
    from pipeline.views import ViewConfig, sample_views
    from scalekd.teacher import TeacherInfo

    out = work / f"cache-{n}-k{k}"
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return out
    data = make_imagefolder(work / f"imagenet-{n}", n)
    spec = CacheSpec(name="scale", dataset={"kind": "imagefolder", "root": str(data), "split": "train"},
                     teacher={"name": "synthetic", "seed": 0}, output=str(out), views=ViewConfig(per_image=k),
                     roles={"final": "fp16", "logits": "fp16"}, samples_per_shard=PER_SHARD)
    refs, classes, skipped = list_dataset(spec.dataset)
    specs = {"final": RoleSpec("final", (1, 8), "fp16"), "logits": RoleSpec("logits", (4,), "fp16")}
    info = TeacherInfo(name="synthetic", family="-", split_point="-", late_modules=[], input_size=(3, 224, 224),
                       mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875, num_classes=4,
                       num_prefix_tokens=0, mid_hw=(1, 1), mid_channels=8, final_hw=(1, 1), final_channels=8)
    n_shards = -(-len(refs) // PER_SHARD)
    out.mkdir(parents=True, exist_ok=True)
    header = _manifest_header(spec, info, None, None, specs, _config(spec, None, refs), len(refs), classes, data)
    ledger = Ledger(out, header, n_shards, skipped)
    rng = np.random.default_rng(0)
    real_fsync, os.fsync = os.fsync, lambda fd: None  # synthesis only: durability is not what is measured
    t0 = time.perf_counter()
    try:
        for s in range(n_shards):
            if s in ledger:
                continue
            chunk = refs[s * PER_SHARD : (s + 1) * PER_SHARD]
            samples = [{"index": r.index, "key": r.key, "label": r.label, "member": None, "span": None,
                        "source": os.path.relpath(r.source, data),
                        "views": [v.as_array().tolist() for v in sample_views(r.key, (500, 375), spec.views)],
                        "fingerprints": [rng.bytes(8).hex() for _ in range(k)]} for r in chunk]
            fields = {}
            for name, rs in specs.items():
                fields |= encode(rs, rng.standard_normal((len(chunk), k, *rs.shape), dtype=np.float32))
            record = commit_shard(out, s, s * PER_SHARD, s * PER_SHARD + len(chunk), "zarr", specs, fields, samples,
                                  [], k, 3)
            ledger.add(s, record, [])
            if s % 500 == 0:
                log(f"  synthesised {s + 1}/{n_shards} shards ({time.perf_counter() - t0:.0f} s)")
        ledger.finish()
    finally:
        os.fsync = real_fsync
    return out


def make_swinl_caches(work: Path) -> dict[str, Path]:
    """2 shards × 64 samples × K = 4 views at Swin-L's target shapes, fp16, both stores."""
    from pipeline.schema import RoleSpec, encode
    from pipeline.shards import commit_shard

    specs = {"final": RoleSpec("final", (49, 1536), "fp16"), "logits": RoleSpec("logits", (1000,), "fp16")}
    from pipeline.ledger import Ledger
    from pipeline.schema import SCHEMA_VERSION
    from pipeline.views import VIEW_FIELDS

    out = {}
    rng = np.random.default_rng(1)
    for fmt in ("zarr", "webdataset"):
        root = work / f"swinl-{fmt}"
        out[fmt] = root
        if (root / "manifest.json").is_file():
            continue
        root.mkdir(parents=True, exist_ok=True)
        header = {"format": fmt, "schema_version": SCHEMA_VERSION, "name": "swinl-shapes", "config": {}, "teacher": {},
                  "views": {"fields": list(VIEW_FIELDS)}, "dataset": {"root": "/"}, "num_views": 4,
                  "roles": {k: v.to_dict() for k, v in specs.items()}, "samples_per_shard": 64}
        ledger = Ledger(root, header, 2, [])
        for s in range(2):
            n = 64
            samples = [{"index": s * n + i, "key": f"k{s * n + i}", "label": 0, "source": "x", "member": None,
                        "span": None, "views": [[0, 0, 1, 1, 0]] * 4, "fingerprints": ["00" * 8] * 4} for i in range(n)]
            fields = {}
            for name, rs in specs.items():
                fields |= encode(rs, rng.standard_normal((n, 4, *rs.shape), dtype=np.float32))
            ledger.add(s, commit_shard(root, s, s * n, (s + 1) * n, fmt, specs, fields, samples, [], 4, 3), [])
        ledger.finish()
    return out


def make_input_tars(work: Path, tars: int, per_tar: int = 1000) -> Path:
    root = work / f"input-tars-{tars}"
    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    payload = bytes(range(256)) * 4  # 1 KiB stands in for a JPEG: the read is measured, not the decode
    for t in range(tars):
        with tarfile.open(root / f"imagenet-train-{t:06d}.tar", "w") as tar:
            for i in range(per_tar):
                key = f"{class_name(i % CLASSES)}_{t * per_tar + i}"
                for ext, data in (("jpg", payload), ("cls", str(i % CLASSES).encode()), ("json", b'{"w": 500}')):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    done.write_text("ok")
    return root


# ---------------------------------------------------------------------------------------------- measurements

def measure_reader_open(args) -> dict:
    cache = make_paths(args)["cache"]
    import pipeline.reader  # noqa: F401 - imports are not the reader's cost

    before = rss_mb()
    t = time.perf_counter()
    from pipeline.reader import CacheReader

    reader = CacheReader(cache)
    seconds = time.perf_counter() - t
    s = reader[len(reader) - 1]  # one record, built on demand
    return {"samples": len(reader), "views": reader.num_views, "seconds": round(seconds, 3),
            "rss_added_mb": round(rss_mb() - before, 1), "last_key": s["key"]}


def measure_forked_worker(args) -> dict:
    """A worker forked from the process that opened the reader, reading an epoch's share (1/8 of
    the samples, random order): each item's record and its stored view, as the trainer's dataset does."""
    from pipeline.reader import CacheReader

    reader = CacheReader(make_paths(args)["cache"])
    items = min(len(reader), max(1, len(reader) // 8))
    order = np.random.default_rng(0).permutation(len(reader))[:items]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        start = memory_mb()
        t = time.perf_counter()
        for n, i in enumerate(order):
            reader[int(i)]
            reader.read(int(i), n % reader.num_views)
        seconds = time.perf_counter() - t
        end = memory_mb()
        os.write(w, json.dumps({"private_mb_start": round(start["dirty"], 1), "private_mb_end": round(end["dirty"], 1),
                                "file_pages_mb_end": round(end["clean"], 1), "seconds": round(seconds, 1)}).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks))
    return {"items": int(items), **out, "growth_mb": round(out["private_mb_end"] - out["private_mb_start"], 1),
            "ms_per_item": round(1000 * out["seconds"] / items, 3)}


def measure_item_read(args) -> dict:
    """One cached item (final + logits, fp16, Swin-L shapes), warm page cache: median ms, both stores;
    and zarr's own reader (an open zarr.Array per field) for comparison."""
    import zarr

    from pipeline.reader import CacheReader

    caches = make_swinl_caches(args.work)
    out, rng = {}, np.random.default_rng(0)
    picks = [(int(rng.integers(0, 128)), int(rng.integers(0, 4))) for _ in range(600)]
    for fmt, root in caches.items():
        reader = CacheReader(root)
        for i in range(len(reader)):  # warm the page cache and the open-shard table
            reader.read(i, 0)
        times = []
        for i, v in picks:
            t = time.perf_counter()
            reader.read(i, v, ["final", "logits"])
            times.append(time.perf_counter() - t)
        out[f"{fmt}_ms"] = round(1000 * float(np.median(times)), 3)
    arrays = {(s, f): zarr.open_array(str(caches["zarr"] / f"shard-{s:05d}" / f), mode="r")
              for s in range(2) for f in ("final", "logits")}
    times = []
    for i, v in picks:
        t = time.perf_counter()
        for f in ("final", "logits"):
            arrays[(i // 64, f)][i % 64, v]
        times.append(time.perf_counter() - t)
    out["zarr_own_reader_ms"] = round(1000 * float(np.median(times)), 3)
    out["shape"] = "final (49, 1536) + logits (1000,), fp16"
    return out


def measure_input_tars(args) -> dict:
    """Random reads of input images from the tars: by recorded offset (now) vs a name → member table
    built per open tar (before; an LRU of 16 open tars)."""
    from pipeline.datasets import _OpenFiles, _OpenTars, list_dataset

    root = make_input_tars(args.work, args.tars)
    t = time.perf_counter()
    refs, _, skipped = list_dataset({"kind": "webdataset", "urls": str(root / "imagenet-train-*.tar")})
    listing = time.perf_counter() - t
    rng = random.Random(0)
    picks = [refs[rng.randrange(len(refs))] for _ in range(3000)]
    old, new = _OpenTars(limit=16), _OpenFiles()
    t = time.perf_counter()
    for ref in picks:
        new.read(ref.source, *ref.span)
    by_offset = (time.perf_counter() - t) / len(picks)
    t = time.perf_counter()
    for ref in picks[:600]:
        old.read(ref.source, ref.member)
    by_table = (time.perf_counter() - t) / 600
    return {"tars": args.tars, "samples": len(refs), "by_offset_ms": round(1000 * by_offset, 3),
            "by_member_table_ms": round(1000 * by_table, 3), "listing_s": round(listing, 1),
            "skipped": len(skipped), "side_members": 2 * len(refs)}


def measure_validation(args) -> dict:
    """Images per second through the trainer's evaluate(): 0 loader workers (decoding in the training
    process, as before) and 2; seconds for ImageNet val's 50,000 images at that rate."""
    import timm
    import torch
    from PIL import Image

    from pipeline.trainer import evaluate

    root = args.work / "val-jpegs"
    n = 400 if not args.quick else 64
    if not (root / ".complete").is_file():
        rng = np.random.default_rng(0)
        for c in range(4):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{i % 4}" / f"{i}.JPEG", quality=90)
        (root / ".complete").write_text("ok")
    torch.set_num_threads(1)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    out = {}
    for workers in (0, 2):
        best = []
        for _ in range(2):
            t = time.perf_counter()
            evaluate(model, {"kind": "imagefolder", "root": str(root)}, torch.device("cpu"), (3, 224, 224),
                     batch_size=32, workers=workers)
            best.append(time.perf_counter() - t)
        rate = n / min(best)
        out[f"workers{workers}_images_per_s"] = round(rate, 1)
        out[f"workers{workers}_seconds_50k"] = round(50_000 / rate, 1)
    out["images"] = n
    return out


def measure_driver(args) -> dict:
    """The cache job's driver on a finished ImageNet-sized job: listing, tasks, a resume scan of every
    committed shard, the manifest rewrites a full run makes, the consolidated index; peak memory."""
    from pipeline.cache_job import shard_tasks
    from pipeline.datasets import list_dataset
    from pipeline.ledger import SAVE_EVERY, Ledger
    from pipeline.schema import MANIFEST

    import pipeline.cache_job  # noqa: F401 - the driver's libraries (torch, timm, Ray's client side) are its baseline

    paths = make_paths(args)
    cache = paths["cache"]
    m = json.loads((cache / MANIFEST).read_text())
    start_rss = rss_mb()
    t = time.perf_counter()
    refs, _, skipped = list_dataset(m["dataset"]["spec"])
    listing = time.perf_counter() - t
    listing_rss = rss_mb()
    t = time.perf_counter()
    ledger = Ledger(cache, {k: v for k, v in m.items() if k not in ("complete", "num_samples", "num_shards_expected",
                                                                  "shards", "index", "skipped")},
                    m["num_shards_expected"], skipped)
    scan = time.perf_counter() - t
    ledger_rss = rss_mb()
    tasks = shard_tasks(refs, m["samples_per_shard"])  # a fresh job's tasks (every shard pending)
    tasks_rss = rss_mb()
    n_tasks = len(tasks)
    del refs, tasks
    saves = -(-len(ledger) // SAVE_EVERY)
    t = time.perf_counter()
    for _ in range(saves):  # what a full run writes while it runs
        ledger.save()
    save_s = time.perf_counter() - t
    manifest_bytes = (cache / MANIFEST).stat().st_size
    t = time.perf_counter()
    ledger.finish()
    consolidate = time.perf_counter() - t
    return {"shards": len(ledger), "tasks": n_tasks, "listing_s": round(listing, 1),
            "baseline_rss_mb": round(start_rss, 1), "ledger_rss_mb": round(ledger_rss - listing_rss, 1),
            "tasks_rss_mb": round(tasks_rss - ledger_rss, 1),
            "resume_scan_s": round(scan, 1), "manifest_saves": saves, "manifest_saves_s": round(save_s, 1),
            "manifest_bytes_written": saves * manifest_bytes, "consolidate_index_s": round(consolidate, 1),
            "bookkeeping_s": round(scan + save_s + consolidate, 1),
            "listing_rss_mb": round(listing_rss - start_rss, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def make_paths(args) -> dict:
    return {"cache": make_scale_cache(args.work, args.samples, args.views, lambda m: print(m, file=sys.stderr))}


MEASURES = {"reader_open": measure_reader_open, "forked_worker_epoch": measure_forked_worker,
            "cached_item_read": measure_item_read, "input_tar_read": measure_input_tars,
            "validation_epoch": measure_validation, "driver": measure_driver}


def markdown(results: dict) -> str:
    r = results["rows"]
    o, w, c, i, v, d = (r[k] for k in ("reader_open", "forked_worker_epoch", "cached_item_read", "input_tar_read",
                                       "validation_epoch", "driver"))
    rows = [
        ("`CacheReader(cache)`", f"{o['seconds']} s, +{o['rss_added_mb']} MB RSS ({o['samples']:,} samples × K = {o['views']})"),
        ("a forked worker over an epoch's share", f"{w['items']:,} items in random order: private (copied) memory "
         f"{w['private_mb_start']} → {w['private_mb_end']} MB (+{w['growth_mb']} MB); index pages read through the "
         f"shared page cache {w['file_pages_mb_end']} MB; {w['ms_per_item']} ms an item"),
        ("one cached item, Swin-L final + logits, fp16, warm", f"zarr {c['zarr_ms']} ms (zarr's own reader: "
         f"{c['zarr_own_reader_ms']} ms), webdataset {c['webdataset_ms']} ms, crc32 checked"),
        ("an input image from webdataset tars, random order", f"{i['by_offset_ms']} ms by recorded offset "
         f"(a member table per open tar: {i['by_member_table_ms']} ms) over {i['tars']:,} tars"),
        ("validation, 50 k images (decode + eval transform)", f"{v['workers0_seconds_50k']} s with no loader "
         f"workers, {v['workers2_seconds_50k']} s with 2 (rate over {v['images']} JPEGs of 500 × 375)"),
        ("cache-job driver, full run's bookkeeping", f"{d['bookkeeping_s']} s: resume scan {d['resume_scan_s']} s, "
         f"{d['manifest_saves']} manifest writes {d['manifest_saves_s']} s ({d['manifest_bytes_written'] / 1e6:.0f} MB), "
         f"consolidated index {d['consolidate_index_s']} s"),
        ("cache-job driver, memory", f"libraries {d['baseline_rss_mb']} MB, then the listing +{d['listing_rss_mb']} MB, "
         f"the shard records +{d['ledger_rss_mb']} MB, a fresh job's {d['tasks']:,} shard tasks +{d['tasks_rss_mb']} MB; "
         f"peak {d['peak_rss_mb']} MB ({d['peak_rss_mb'] - d['baseline_rss_mb']:.0f} MB above the libraries, while listing)"),
        ("listing the files", f"{d['listing_s']} s for {o['samples']:,} files"),
        ("webdataset inputs with .json side members", f"{i['side_members']:,} side members, {i['skipped']} skipped; "
         f"listing {i['samples']:,} samples in {i['listing_s']} s"),
    ]
    head = (f"Measured by `bench/scale.py` on {results['machine']} ({results['date']}), "
            f"{results['samples']:,} samples × K = {results['views']}, 256 a shard:\n\n| what | measured |\n|---|---|\n")
    return head + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 samples and 32 tars (a smoke run, minutes less)")
    ap.add_argument("--samples", type=int, default=None, help=f"images (default {IMAGENET:,})")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--tars", type=int, default=None, help="input tars of 1,000 samples (default 1,282)")
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "scale")
    ap.add_argument("--json", type=Path, default=None, help="results file (default bench/results-scale.json)")
    ap.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.samples = args.samples or (20_000 if args.quick else IMAGENET)
    args.tars = args.tars or (32 if args.quick else 1282)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.measure:
        print(json.dumps(MEASURES[args.measure](args)))
        return
    t0 = time.perf_counter()
    print(f"synthesising under {args.work} (kept for the next run) ...", file=sys.stderr)
    make_paths(args)
    rows = {}
    for name in MEASURES:
        print(f"measuring {name} ...", file=sys.stderr)
        rows[name] = in_subprocess(name, args)
        print(f"  {rows[name]}", file=sys.stderr)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    results = {"machine": f"{os.cpu_count()} cores of {cpu}, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
               "samples": args.samples, "views": args.views, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    path = args.json or (ROOT / ".work" / "results-scale-quick.json" if args.quick else ROOT / "bench" / "results-scale.json")
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')} in {results['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
