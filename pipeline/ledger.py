"""The cache job's bookkeeping: the committed shards' records, the manifest, the consolidated index.

Built for a job of thousands of shards: the driver keeps each shard's manifest record (a few
numbers) and its skipped inputs, never its samples; the manifest is rewritten every SAVE_EVERY
commits or SAVE_SECONDS and at the end, not on every commit (a rewrite per commit is quadratic in
the job: 2.5 GB written at ImageNet size); the shard folders are the truth a killed run resumes from.
When every shard is in, their columnar indices are streamed into one ``index/`` at the root.
"""
from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from .sample_index import ARRAY_COLUMNS, COLUMNS_DOC, INDEX_DIR, STRING_COLUMNS
from .schema import MANIFEST, write_json_atomic
from .shards import CacheWriteError, committed_shards, shard_record

__all__ = ["Ledger", "consolidate_index", "LAYOUT", "package_versions", "SAVE_EVERY", "SAVE_SECONDS"]

SAVE_EVERY, SAVE_SECONDS = 64, 30.0  # manifest rewrites while the job runs (and always at its end)


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "numpy", "zarr", "numcodecs", "webdataset", "ray", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


LAYOUT = {
    "zarr": {"shard": "shard-NNNNN/ is a zarr v3 group (shard.json and index/ beside its arrays); array <field> has "
                      "shape (samples, views, *field shape) and chunk (1, 1, *field shape): one chunk per view"},
    "webdataset": {"shard": "shard-NNNNN/v<k>.tar holds view k of every sample of the shard: s<index>.json "
                            "(key, label, view, fingerprint) and s<index>.<role>.npy.zst, the role's fields' .npy files "
                            "(in the order of the role's fields), each compressed as its own zstd frame (with its "
                            "content checksum), the frames back to back (one zstd decode gives the .npy files); "
                            "entries.npy (views, samples, roles, 3) int64 holds each .npy.zst entry's data "
                            "offset, size and crc32 of its stored (compressed) bytes (roles in the manifest's order); "
                            "shard.json and index/ beside them"},
    "roles": {
        "final": "teacher tokens (N, C) on teacher.final_hw, row-major, CLS/register tokens dropped; the DC-removed "
                 "view is final minus its mean over tokens (per channel), not stored",
        "mid": "tokens (L, C) on teacher.mid_hw, the late part's input; plain ViTs: num_prefix_tokens prefix tokens first",
        "logits": "teacher logits (classes,)",
        "int8": "codec int8 stores <role>_q (int8) and <role>_scale (float32): value = q * scale",
        "int8dc": "codec int8dc stores <role>_q (int8), <role>_scale and <role>_dc (float32): value = q * scale + dc",
        "view": "view = [top, left, height, width] as fractions of the original image, then flip (0/1); the model's "
                "input is that box resized to its input size with its interpolation, flipped if flip",
        "sample index": "per-sample metadata is columnar: shard-NNNNN/index/ for each shard, and index/ at the root "
                        "(all shards in manifest order, written when the cache is complete; listed under 'index' "
                        "with each file's bytes and sha256); sample i of the cache is row i of every column",
    },
}



class Ledger:
    """What a cache job has committed, and its manifest.

    header: the manifest's fixed part (format, teacher, views, dataset, roles, layout, ...);
    expected: the number of shards the job makes; listing_skipped: inputs the listing skipped."""

    def __init__(self, root: Path, header: dict, expected: int, listing_skipped: list[dict], metas: dict | None = None):
        """metas: shard index → shard.json of the shards already committed (default: scanned from root)."""
        self.root, self.header, self.expected, self.listing_skipped = Path(root), header, expected, listing_skipped
        self.records: dict[int, dict] = {}
        self.skipped: dict[int, list] = {}
        for i, meta in (committed_shards(self.root) if metas is None else metas).items():  # a resumed job
            self.records[i], self.skipped[i] = shard_record(meta), meta.get("skipped", [])
        self._saved = (len(self.records), time.monotonic())

    def __contains__(self, shard: int) -> bool:
        return shard in self.records

    def __len__(self) -> int:
        return len(self.records)

    def add(self, shard: int, record: dict, skipped: list[dict]) -> None:
        """A newly committed shard; the manifest is rewritten when enough commits or time have passed."""
        self.records[shard], self.skipped[shard] = record, skipped
        commits, when = self._saved
        if len(self.records) - commits >= SAVE_EVERY or time.monotonic() - when >= SAVE_SECONDS:
            self.save()

    def manifest(self, complete: bool = False, index: dict | None = None) -> dict:
        shards = [self.records[i] for i in sorted(self.records)]
        return self.header | {
            "complete": complete,
            "num_samples": sum(r["samples"] for r in shards),
            "num_shards_expected": self.expected,
            "shards": shards,
            "index": index,
            "skipped": list(self.listing_skipped) + [x for i in sorted(self.skipped) for x in self.skipped[i]],
        }

    def save(self, complete: bool = False, index: dict | None = None) -> None:
        write_json_atomic(self.root / MANIFEST, self.manifest(complete, index))
        self._saved = (len(self.records), time.monotonic())

    def finish(self) -> bool:
        """The final manifest, with the consolidated index when every shard is in; True when complete."""
        complete = len(self.records) == self.expected
        self.save(complete, consolidate_index(self.root, self.records) if complete and self.records else None)
        return complete


def consolidate_index(root: Path, records: dict[int, dict]) -> dict:
    """The shards' indices as one folder ``index/`` at the cache root, streamed column by column
    (a driver never holds a whole column) and renamed into place; returns its manifest entry
    {samples, files: {name: {bytes, sha256}}}."""
    root = Path(root)
    names = [records[i]["name"] for i in sorted(records)]
    tmp = root / f".tmp-index-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    files = {}
    total = sum(records[i]["samples"] for i in records)
    for column in ARRAY_COLUMNS:  # one shard's part in memory at a time
        first = np.load(root / names[0] / INDEX_DIR / f"{column}.npy", mmap_mode="r")
        header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                  "shape": (total, *first.shape[1:])}
        del first
        parts = (np.load(root / n / INDEX_DIR / f"{column}.npy") for n in names)
        files[f"{column}.npy"] = _stream(tmp / f"{column}.npy", parts, header=header)
    for column in STRING_COLUMNS:
        blobs = (np.fromfile(root / n / INDEX_DIR / f"{column}.bin", np.uint8) for n in names)
        files[f"{column}.bin"] = _stream(tmp / f"{column}.bin", blobs)

        def rebased(column=column):  # each shard's (n+1,) offsets past its first, shifted by the bytes before it
            yield np.zeros(1, np.int64)
            base = 0
            for n in names:
                off = np.load(root / n / INDEX_DIR / f"{column}_offsets.npy")
                yield off[1:] + base
                base += int(off[-1])

        files[f"{column}_offsets.npy"] = _stream(tmp / f"{column}_offsets.npy", rebased(),
                                                 header={"descr": "<i8", "fortran_order": False, "shape": (total + 1,)})
    for path in tmp.iterdir():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    final = root / INDEX_DIR
    if final.exists():  # a consolidation the manifest never recorded (a kill in between): redone
        from .output_guard import is_cache_entry

        if not is_cache_entry(final):  # never remove what this project did not write
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheWriteError(f"{final} holds files that are not a sample index ({sorted(p.name for p in final.iterdir())[:3]}"
                                  f"…); move them away and run the job again")
        for column in final.iterdir():
            column.unlink()
        final.rmdir()
    os.rename(tmp, final)
    return {"samples": sum(r["samples"] for r in records.values()), "files": files,
            "columns": COLUMNS_DOC}


def _stream(path: Path, parts, header: dict | None = None) -> dict:
    """Write arrays back to back (after a .npy header) and hash them on the way: {bytes, sha256}."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        if header is not None:
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, header)
            f.write(buf.getvalue())
            h.update(buf.getvalue())
        for part in parts:
            data = np.ascontiguousarray(part).tobytes()
            f.write(data)
            h.update(data)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


