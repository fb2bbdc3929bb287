"""What a job may do to its output folder, and who may do it.

- A lock: one job at a time per output. An exclusive ``fcntl.flock`` on ``OUT/.lock``, held for the
  whole job (the kernel drops it when the process dies, so a killed job leaves no stale lock); a
  second job is refused naming the running one (host, pid, start time). On one machine this is
  enough; on a Ray cluster only the driver holds it, workers delete nothing but their own
  temporaries, and the driver alone removes what killed writers left.
- What a cache consists of: ``manifest.json``, ``zarr.json``, ``index/``, ``shard-NNNNN/`` folders and the
  job's own temporaries and lock. Anything else in an output folder is the user's: such a folder
  is refused whatever the flags, and ``--overwrite`` removes only a cache's own entries. A shard folder
  is removed whole (by ``--overwrite``, or when damaged) only when it holds nothing the job did not write.
- Where a cache may live: never inside, equal to or around the dataset it is made from.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from .sample_index import INDEX_DIR, index_files
from .schema import MANIFEST, SHARD_META

__all__ = ["CacheConfigError", "OutputBusyError", "OutputLock", "LOCK", "is_cache_entry", "foreign_entries",
           "refuse_foreign", "remove_cache", "check_placement", "shard_foreign_files", "refuse_foreign_in_shards",
           "is_temporary", "unknown_files"]

LOCK = ".lock"
_SHARD = re.compile(r"^shard-\d{5,}$")
# What the stores write in a shard folder, for one whose shard.json (the list of its files) cannot be read:
# zarr's group and array metadata and chunk files, webdataset's per-view tars and entry table, the index.
_SHARD_FILE = re.compile(r"^(?:zarr\.json|entries\.npy|v\d+\.tar|[A-Za-z0-9_.-]+/zarr\.json|[A-Za-z0-9_.-]+/c(?:/\d+)+)$")


class CacheConfigError(ValueError):
    """The output folder holds a cache of another configuration, or is not a cache at all."""


class OutputBusyError(CacheConfigError):
    """Another job holds the output folder's lock."""


class OutputLock:
    """An exclusive lock on ``folder`` for the lifetime of a job (a context manager).

    what: the kind of job, in words ('cache job', 'distill run'), written into the lock file
    with host, pid and start time so that a refused second job can name the running one."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what, self.path, self._fd = Path(folder), what, Path(folder) / LOCK, None

    def acquire(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(f"output {self.folder} is in use by another {holder.get('what', 'job')} "
                                  f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                                  f"{holder.get('started', '?')}); wait for it to end, or choose another "
                                  f"output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def is_cache_entry(path: Path) -> bool:
    """Whether an entry of an output folder is part of a cache this project writes."""
    name = path.name
    if name in (MANIFEST, "zarr.json", LOCK, ".write-test"):
        return True
    if _SHARD.match(name):
        return path.is_dir() and not path.is_symlink()
    if name == INDEX_DIR:  # the consolidated sample index: a folder holding nothing but its columns
        return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= set(index_files())
    return is_temporary(name)


# What a killed job leaves: a half-written shard (.tmp-shard-NNNNN-<8 hex>) or index (.tmp-index-<8 hex>), a
# JSON file caught mid-write (.manifest.json.tmp-PID). Nothing else of a dot-name is the job's.
_TEMPORARY = re.compile(r"^(?:\.tmp-(?:shard-\d{5,}|index)-[0-9a-f]{8}|\.[A-Za-z0-9_.-]+\.json\.tmp-\d+)$")


def is_temporary(name: str) -> bool:
    """Whether an output folder's entry named so is a temporary the cache job writes (and removes)."""
    return _TEMPORARY.match(name) is not None


def foreign_entries(root: Path) -> list[str]:
    """Names of the entries of ``root`` that are not part of a cache, sorted."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if not is_cache_entry(p)) if root.is_dir() else []


def refuse_foreign(root: Path) -> None:
    """Refuse (whatever the flags) an output folder that holds anything a cache does not consist of."""
    foreign = foreign_entries(root)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise CacheConfigError(f"output {root} holds {foreign[0]!r}{more}, which is not part of a cache "
                               f"(expected only {MANIFEST}, zarr.json, index/ and shard-NNNNN folders); refusing to write a "
                               f"cache into it, with or without --overwrite: choose an empty or new folder")


def unknown_files(folder: Path, is_ours) -> list[str]:
    """Paths (relative, sorted) under ``folder`` that ``is_ours(relative path)`` does not claim: each file it
    rejects, each symbolic link (never a job's), each folder the walk cannot list (not known to be a job's)."""
    folder, found = Path(folder), []

    def unreadable(e: OSError):
        found.append(os.path.relpath(e.filename, folder).replace(os.sep, "/"))

    for top, dirs, files in os.walk(folder, onerror=unreadable):  # links to folders are listed, not followed
        for name in files + dirs:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if os.path.islink(path) or (name in files and not is_ours(rel)):
                found.append(rel)
    return sorted(found)


def shard_foreign_files(folder: Path) -> list[str]:
    """Paths (relative, sorted) in a shard-NNNNN folder that the cache job did not write: anything but
    shard.json and the files it records; when shard.json cannot be read, anything outside the stores'
    layout. Symbolic links are never the job's."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / SHARD_META).read_text())
        recorded = set(meta["files"]) if isinstance(meta, dict) and isinstance(meta.get("files"), dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        recorded = None
    if recorded is not None:
        return unknown_files(folder, lambda rel: rel == SHARD_META or rel in recorded)
    index = {f"{INDEX_DIR}/{n}" for n in index_files()}
    return unknown_files(folder, lambda rel: rel == SHARD_META or rel in index or _SHARD_FILE.match(rel) is not None)


def refuse_foreign_in_shards(root: Path, names: list[str], why: str) -> None:
    """Refuse (removing nothing) when a shard folder about to be removed holds what the job did not write."""
    for name in names:
        foreign = shard_foreign_files(Path(root) / name)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise CacheConfigError(f"{Path(root) / name} holds {foreign[0]!r}{more}, which the cache job did not write; "
                                   f"{why}, so nothing was removed: move it out of {Path(root) / name} and run again")


def remove_cache(root: Path) -> list[str]:
    """Remove a cache's own entries from ``root`` (never the lock, never anything else); their names."""
    refuse_foreign(root)  # checked again right before deleting: nothing foreign is ever removed
    refuse_foreign_in_shards(root, sorted(p.name for p in Path(root).iterdir() if _SHARD.match(p.name) and p.is_dir()),
                             "--overwrite removes the cache's shard folders whole")
    gone = []
    for path in sorted(Path(root).iterdir()):
        if path.name == LOCK or not is_cache_entry(path):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        gone.append(path.name)
    return gone


def _dataset_paths(dataset) -> list[tuple[Path, bool]]:
    """(path, is_folder) of what a dataset spec reads: its root, or its tars (a glob's folder)."""
    if not isinstance(dataset, dict):
        return []
    out = []
    if dataset.get("kind") in ("imagefolder", "demo") and isinstance(dataset.get("root"), str):
        out.append((Path(dataset["root"]), True))
    urls = dataset.get("urls") if dataset.get("kind") == "webdataset" else None
    for url in [urls] if isinstance(urls, str) else (urls or []):
        if isinstance(url, str) and "://" not in url:
            globbed = any(c in url for c in "*?[{")
            out.append((Path(url).parent if globbed else Path(url), globbed))
    return [(Path(os.path.abspath(p.expanduser())).resolve(), d) for p, d in out]


def check_placement(output: str | Path, dataset: dict) -> None:
    """Refuse an output inside, equal to or containing what the dataset spec reads (before it is read)."""
    out = Path(os.path.abspath(Path(output).expanduser())).resolve()
    for path, is_folder in _dataset_paths(dataset):
        if out == path:
            where = "is the dataset root" if is_folder else "is the dataset file"
        elif out in path.parents:
            where = "contains the dataset root" if is_folder else "contains the dataset file"
        elif is_folder and path in out.parents:
            where = "is inside the dataset root"
        else:
            continue
        raise CacheConfigError(f"output {out} {where} {path}; a cache must live outside the data it is made from "
                               f"(choose another output)")
