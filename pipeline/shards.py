"""Committing a shard exactly once, and checking committed shards.

A shard is written into ``.tmp-shard-NNNNN-<random>/`` with its files (the store's arrays or tars
and the columnar sample index, ``index/``) fsynced and its ``shard.json`` (range, sample count,
skipped inputs, per-file sizes and sha256; no per-sample data) written last, then renamed to
``shard-NNNNN/``. The rename is the commit: a folder named ``shard-*`` is complete by
construction, a ``.tmp-*`` folder never counts and is removed on the next run. A second writer of
the same shard (a retried Ray task) finds the shard committed and discards its own copy.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .encoding import map_ordered, slices
from .sample_index import INDEX_DIR, write_index
from .schema import SHARD_META, SHARD_PREFIX, RoleSpec, encode, file_sha256, shard_name, write_json_atomic
from .stores import store_module

__all__ = ["CacheWriteError", "commit_shard", "shard_record", "record_mismatch", "committed_shards", "remove_temporaries",
           "verify_shard", "damaged_shards", "discard_shard"]


class CacheWriteError(RuntimeError):
    """The cache cannot be written (full disk, no permission); committed shards are untouched."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(files: dict) -> str:
    canon = json.dumps({k: files[k]["sha256"] for k in sorted(files)}, sort_keys=True).encode()
    return hashlib.sha256(canon).hexdigest()


def _sync_and_hash(path: Path) -> dict:
    """fsync a written file; its size and sha256 (read back from the file: what shard.json vouches for is on disk)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def shard_record(meta: dict) -> dict:
    """The manifest's line for a committed shard."""
    return {
        "name": meta["name"],
        "start": meta["start"],
        "end": meta["end"],
        "samples": meta["num_samples"],
        "bytes": sum(f["bytes"] for f in meta["files"].values()),
        "sha256": _digest(meta["files"]),
    }


def record_mismatch(meta: dict, record: dict) -> str:
    """'' when the manifest's record is the one shard.json gives, else the differing entries, named."""
    mine = shard_record(meta)
    return "; ".join(f"{k}: manifest has {record.get(k)!r}, shard.json gives {mine.get(k)!r}"
                     for k in sorted(set(mine) | set(record)) if record.get(k) != mine.get(k))


def commit_shard(root: Path, index: int, start: int, end: int, fmt: str, specs: dict[str, RoleSpec],
                 fields: dict[str, np.ndarray], samples: list[dict], skipped: list[dict], num_views: int,
                 level: int = 3, view_width: int = 5, extra: dict | None = None, workers: int = 1) -> dict:
    """Write and atomically commit shard ``index`` (samples [start, end) of the listing); returns its record.

    samples: the shard's sample records (see ``sample_index.write_index``), stored as its columnar index.
    extra: more entries for shard.json (the run's config digest, which a lost manifest is rebuilt against).
    workers: threads compressing views and hashing files (pipeline.encoding); the bytes are the same at any count.
    A shard is committed only with every array of every role present and checksummed."""
    root = Path(root)
    name = shard_name(index)
    final = root / name
    if final.is_dir():
        return shard_record(json.loads((final / SHARD_META).read_text()))
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        store = store_module(fmt)
        store.write_shard(tmp, specs, fields, samples, num_views, level, workers=workers)
        write_index(tmp / INDEX_DIR, samples, num_views, view_width)
        missing = store.missing_entries(tmp, specs, samples, num_views)
        if missing:
            raise CacheWriteError(f"refusing to commit {name} under {root}: {tmp.name} lacks {', '.join(missing[:4])}"
                                  f"{' …' if len(missing) > 4 else ''} after writing (did another process remove "
                                  f"or change it?); nothing was committed, run the job again to redo it")
        paths = sorted(p for p in tmp.rglob("*") if p.is_file())
        files = dict(zip((p.relative_to(tmp).as_posix() for p in paths), map_ordered(_sync_and_hash, paths, workers)))
        meta = {"name": name, "index": index, "start": start, "end": end, "format": fmt, "num_views": num_views,
                "num_samples": len(samples), "skipped": skipped, "files": files} | (extra or {})
        write_json_atomic(tmp / SHARD_META, meta)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():  # another attempt committed first
                shutil.rmtree(tmp, ignore_errors=True)
                return shard_record(json.loads((final / SHARD_META).read_text()))
            raise
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise CacheWriteError(f"cannot write shard {name} under {root}: {reason}; committed shards are intact, "
                              f"free space or fix permissions and run the job again to resume") from e
    except BaseException:  # any other failure (a codec's error, an incomplete shard): no .tmp-shard is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return shard_record(meta)


def committed_shards(root: Path) -> dict[int, dict]:
    """index → shard.json of every committed shard folder (one whose shard.json cannot be read is left
    out: damaged_shards names it)."""
    out = {}
    for path in sorted(Path(root).glob(f"{SHARD_PREFIX}*")):
        if path.is_dir() and (path / SHARD_META).is_file():
            meta = _read_meta(path)
            if meta is not None:
                out[meta["index"]] = meta
    return out


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / SHARD_META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("index"), int) and isinstance(meta.get("files"), dict)
    return meta if ok else None


def damaged_shards(root: Path, records: dict[int, dict]) -> dict[str, str]:
    """Committed shards a re-run must not resume from: shard name → what is wrong.

    Cheap (no checksums): every file shard.json records must exist with its recorded size, and
    every shard folder must have a readable shard.json. records: committed_shards(root)."""
    root, out = Path(root), {}
    for meta in records.values():
        folder = root / meta["name"]
        for rel, f in sorted(meta["files"].items()):
            path = folder / rel
            if not path.is_file():
                out[meta["name"]] = f"{rel} is missing"
                break
            if path.stat().st_size != f.get("bytes"):
                out[meta["name"]] = f"{rel} has {path.stat().st_size} bytes, {SHARD_META} records {f.get('bytes')}"
                break
    known = {meta["name"] for meta in records.values()}
    for folder in sorted(root.glob(f"{SHARD_PREFIX}*")):
        if folder.is_dir() and folder.name not in known:
            out[folder.name] = f"{SHARD_META} is missing or unreadable"
    return out


def discard_shard(root: Path, name: str) -> None:
    """Remove a damaged committed shard, so that the job writes it again; refused (CacheConfigError,
    nothing removed) when the folder holds anything the job did not write."""
    from .output_guard import refuse_foreign_in_shards

    refuse_foreign_in_shards(root, [name], f"{name} is damaged and would be removed to be cached again")
    shutil.rmtree(Path(root) / name)


def remove_temporaries(root: Path) -> list[str]:
    """Delete half-written shards left by a killed run; returns their names."""
    gone = []
    root = Path(root)
    from .output_guard import is_temporary

    for path in sorted(p for p in root.glob(".*") if is_temporary(p.name)):  # shards, an index, a JSON mid-write
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        gone.append(path.name)
    return gone


def file_problems(folder: Path, files: dict, label: str) -> list[str]:
    """Each recorded file ({relative path: {bytes, sha256}}) that is missing, of another size or
    checksum, named as label/path."""
    problems = []
    for rel, f in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{label}/{rel}: missing")
        elif path.stat().st_size != f["bytes"]:
            problems.append(f"{label}/{rel}: {path.stat().st_size} bytes, expected {f['bytes']}")
        elif file_sha256(path) != f["sha256"]:
            problems.append(f"{label}/{rel}: checksum mismatch")
    return problems


def verify_shard(root: Path, record: dict) -> list[str]:
    """Problems with one committed shard against its manifest record (empty when intact)."""
    folder = Path(root) / record["name"]
    if not (folder / SHARD_META).is_file():
        return [f"{record['name']}: missing (no {SHARD_META})"]
    try:
        meta = json.loads((folder / SHARD_META).read_text())
    except json.JSONDecodeError as e:
        return [f"{record['name']}/{SHARD_META}: not valid JSON ({e})"]
    problems = file_problems(folder, meta["files"], record["name"])
    extra = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(meta["files"]) - {SHARD_META}
    problems += [f"{record['name']}/{rel}: unexpected file" for rel in sorted(extra)]
    mismatch = record_mismatch(meta, record)
    if mismatch:
        problems.append(f"{record['name']}: shard.json does not match the manifest's record ({mismatch})")
    return problems


def write_shard(row: dict, root: str, fmt: str, specs: dict, num_views: int, level: int,
                config_sha256: str | None = None, encoders: int = 1, view_width: int = 5) -> dict:
    """The cache job's last stage (pipeline.cache_job: in the local engine's writer thread, in a Ray
    teacher actor after its forward): encode a shard's teacher outputs and commit it; returns
    {'record': JSON of the shard's record, 'node': the node whose teacher computed it}. Needs no torch.
    config_sha256: the run's config digest, kept in
    shard.json (a lost manifest is rebuilt only from shards of the same configuration). encoders:
    threads casting, compressing and hashing the shard (pipeline.encoding); the same bytes at any count.
    view_width: the columns of a view row (``views.view_fields``)."""
    specs = {k: RoleSpec.from_dict(v) if isinstance(v, dict) else v for k, v in specs.items()}
    samples = json.loads(row["samples"])
    fields: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        data = np.asarray(row[name], dtype=np.float32)
        if not samples:
            data = np.zeros((0, num_views, *spec.shape), np.float32)
        fields.update(_encode_role(spec, data, encoders))
    record = commit_shard(Path(root), int(row["shard"]), int(row["start"]), int(row["end"]), fmt, specs, fields,
                          samples, json.loads(row["skipped"]), num_views, level, view_width=view_width,
                          extra={"config_sha256": config_sha256} if config_sha256 else None, workers=encoders)
    return {"record": json.dumps(record), "node": row.get("node", "local")}


def _encode_role(spec: RoleSpec, data: np.ndarray, encoders: int) -> dict[str, np.ndarray]:
    """schema.encode of (n, K, *spec.shape) float32 in ``encoders`` threads, cut by samples (a codec's
    statistics are per view, so each part encodes to exactly the whole's rows), each part written into
    the preallocated fields (no second copy of the shard)."""
    if encoders <= 1 or spec.codec == "fp32":  # fp32 stores the array as it is: nothing to cast
        return encode(spec, data)
    lead = data.shape[: data.ndim - len(spec.shape)]
    out = {f: np.empty((*lead, *shape), dtype) for f, (shape, dtype) in spec.fields().items()}

    def part(s: slice) -> None:
        for f, a in encode(spec, data[s]).items():
            out[f][s] = a

    map_ordered(part, slices(len(data), encoders), encoders)
    return out
