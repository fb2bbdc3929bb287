"""Listing webdataset input tars at ImageNet-1K size: the header scan against tarfile, side by side.

    .venv/bin/python bench/tar_listing.py [--quick] [--tars N] [--json bench/results-tar-listing.json]

Synthesises (once, kept under .work/scale/) N tars of 1,000 samples written by webdataset's own
TarWriter, as ImageNet's webdataset copies are: per sample a 1 KiB stand-in for the JPEG, a .cls and
a .json side member, each behind the pax header that TarWriter's float mtimes bring (6 headers a
sample). Then, with the tars in the page cache (read through once first), times the whole
``list_dataset`` of them (labels read, sorted, packed) twice each in the order tarfile, scan, tarfile,
scan: ``scan`` is the listing as it is (pipeline.datasets.tar_members reading the headers itself),
``tarfile`` the same listing with every tar handed to Python's tarfile (the listing before the scan).
Both give the same listing (keys, labels, members, offsets and sizes compared here; member by member
in tests/test_datasets.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_tars(root: Path, tars: int, per_tar: int) -> Path:
    import webdataset

    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    payload = bytes(range(256)) * 4  # the listing reads headers only: the payload's content is immaterial
    for t in range(tars):
        with webdataset.TarWriter(str(root / f"imagenet-train-{t:06d}.tar")) as w:
            for i in range(per_tar):
                w.write({"__key__": f"n{i % 1000:08d}_{t * per_tar + i}", "jpg": payload,
                         "cls": str(i % 1000).encode(), "json": b'{"width": 500, "height": 375}'})
    done.write_text("ok")
    return root


def listing_seconds(urls: str, engine: str):
    import pipeline.datasets as ds

    original = ds._scan_headers
    if engine == "tarfile":
        def to_tarfile(fd, path):
            raise ds._NeedsTarfile("benchmark: tarfile")
        ds._scan_headers = to_tarfile
    try:
        t = time.perf_counter()
        refs, _, skipped = ds.list_dataset({"kind": "webdataset", "urls": urls})
        seconds = time.perf_counter() - t
    finally:
        ds._scan_headers = original
    assert not skipped, skipped[:3]
    return seconds, refs


def main(argv=None) -> dict:
    from step import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 tars (a smoke run, not a measurement)")
    ap.add_argument("--tars", type=int, default=None, help="tars of 1,000 samples (default 1,282: ImageNet-1K's train)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "scale", help="where the tars are made (kept)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    tars = args.tars or (32 if args.quick else 1282)
    root = make_tars(args.work / f"wds-tars-{tars}", tars, 1000)
    files = sorted(root.glob("*.tar"))
    for f in files:  # into the page cache: the listing's own work is measured, not the disk's
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    urls = str(root / "imagenet-train-*.tar")
    times: dict[str, list[float]] = {"tarfile": [], "scan": []}
    listed = {}
    for _ in range(args.rounds):
        for engine in times:
            s, refs = listing_seconds(urls, engine)
            times[engine].append(round(s, 2))
            # keys, file names, members, labels, offsets and sizes, as bytes
            listed[engine] = (len(refs), refs._key, refs._name, refs._member, refs.labels.tobytes(), refs.spans.tobytes())
            del refs
            print(f"{engine}: {s:.1f} s", file=sys.stderr)
    same = listed["tarfile"] == listed["scan"]
    assert same, "the header scan and tarfile listed different samples"
    members = 3 * listed["scan"][0]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "tars": tars, "samples": members // 3,
              "members": members, "headers": 2 * members, "tar_bytes": sum(os.path.getsize(f) for f in files),
              "same_listing": same, "seconds": times, "median_s": med,
              "us_per_member": {k: round(1e6 * v / members, 1) for k, v in med.items()},
              "scan_over_tarfile": round(med["scan"] / med["tarfile"], 3)}
    path = args.json or (ROOT / ".work" / "results-tar-listing-quick.json" if args.quick
                         else ROOT / "bench" / "results-tar-listing.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
