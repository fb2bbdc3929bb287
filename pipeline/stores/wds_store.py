"""webdataset store: a shard folder holds one tar per view index, v0.tar … v{K-1}.tar.

An epoch that uses view k reads only the v{k}.tar files, streamed in order by plain webdataset
(``webdataset.WebDataset("cache/shard-{00000..00099}/v0.tar")``) or by index, as our reader does.
Each sample of a tar: ``s<index>.json`` (key, label, view parameters, fingerprint) and one
``s<index>.<field>.npy.zst`` per stored field: the field's .npy file compressed by zstd (numcodecs'
Zstd, zarr's codec, at the job's ``compression_level``, with zstd's content checksum), one
self-contained zstd frame per entry, so the same cache is about as large here as in zarr. Only
.npy.zst and .json entries exist; nothing is pickled. Plain webdataset streams a view's tars with
one decoder handler for the .npy.zst entries (``npy_zst`` below; docs/cache-format.md).
``entries.npy`` beside the tars records every .npy.zst entry's data offset, size and crc32 (of the
stored, compressed bytes) at commit time, so a read is one pread and one zstd decode per field with
no tar header parsed, and every read is checked.

Written with the standard tarfile module rather than webdataset's TarWriter: headers are stamped
with mtime 0 and a fixed owner, so re-running a shard gives byte-identical files and checksums.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from ..encoding import map_ordered, slices
from ..schema import RoleSpec

__all__ = ["write_shard", "open_shard", "member_name", "missing_entries", "ENTRIES", "EXTENSION", "field_order",
           "npy_zst"]

EXTENSION = "npy.zst"


def member_name(index: int, field: str) -> str:
    return f"s{index:08d}.{field}.{EXTENSION}"


ENTRIES = "entries.npy"  # int64 (K, n, fields, 3): data offset, size and crc32 of every .npy.zst entry
_ZSTD = Zstd()  # decoding needs no level


def npy_zst(data: bytes) -> np.ndarray:
    """One .npy.zst entry's bytes → its array (what a plain-webdataset user's handler does)."""
    return np.load(io.BytesIO(_ZSTD.decode(data)), allow_pickle=False)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> int:
    """Append one member; returns the offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, "scalekd", "scalekd"
    header = tar.offset
    tar.addfile(info, io.BytesIO(payload))
    return header + tarfile.BLOCKSIZE  # a USTAR header is one block (names here are short)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def field_order(specs: dict[str, RoleSpec]) -> list[tuple[str, tuple[int, ...], str]]:
    """(field, shape, dtype) in the order of the entries table's third axis."""
    return [(f, shape, dtype) for spec in specs.values() for f, (shape, dtype) in spec.fields().items()]


def write_shard(folder: Path, specs: dict[str, RoleSpec], fields: dict[str, np.ndarray], samples: list[dict],
                num_views: int, level: int = 3, workers: int = 1) -> None:
    """workers: threads compressing the entries (pipeline.encoding); the tars are the same at any count."""
    folder.mkdir(parents=True, exist_ok=True)
    codec = Zstd(level=level, checksum=True)
    order = field_order(specs)
    entries = np.zeros((num_views, len(samples), len(order), 3), np.int64)
    for view in range(num_views):  # one view's entries compressed at a time: memory holds one tar's worth

        def compress(rows: slice, view: int = view) -> list[bytes]:  # every field of each row, in the tar's order
            return [bytes(codec.encode(_npy(fields[field][row, view]))) for row in range(len(samples))[rows]
                    for field, _, _ in order]

        payloads = iter([p for part in map_ordered(compress, slices(len(samples), workers), workers) for p in part])
        with tarfile.open(folder / f"v{view}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row, s in enumerate(samples):
                meta = {"key": s["key"], "label": s["label"], "index": s["index"], "view_index": view,
                        "view": s["views"][view], "fingerprint": s["fingerprints"][view]}
                _add(tar, f"s{s['index']:08d}.json", json.dumps(meta).encode())
                for j, (field, _, _) in enumerate(order):
                    payload = next(payloads)
                    offset = _add(tar, member_name(s["index"], field), payload)
                    entries[view, row, j] = (offset, len(payload), zlib.crc32(payload))
    np.save(folder / ENTRIES, entries, allow_pickle=False)


def missing_entries(folder: Path, specs: dict[str, RoleSpec], samples: list[dict], num_views: int) -> list[str]:
    """What a written shard folder lacks (empty when whole): a view's tar, or an entry of one, or its entries table."""
    missing = [] if (folder / ENTRIES).is_file() else [ENTRIES]
    for view in range(num_views):
        try:
            with tarfile.open(folder / f"v{view}.tar") as tar:
                names = set(tar.getnames())
        except (OSError, tarfile.TarError):
            missing.append(f"v{view}.tar")
            continue
        wanted = [f"s{s['index']:08d}.json" for s in samples]
        wanted += [member_name(s["index"], f) for s in samples for spec in specs.values() for f in spec.fields()]
        missing += [f"v{view}.tar:{n}" for n in wanted if n not in names]
    return missing


class TarShard:
    """A committed shard's tars, read by the offsets recorded at commit: one pread and one zstd
    decode per field, its crc32 checked on every read (a flipped byte is an error, not a wrong
    target; zstd's own checksum then guards the decoded bytes)."""

    def __init__(self, folder: Path, specs: dict[str, RoleSpec], meta: dict | None = None):
        self.folder, self.specs = Path(folder), specs
        self.order = field_order(specs)
        self.column = {f: j for j, (f, _, _) in enumerate(self.order)}
        self.entries = np.load(self.folder / ENTRIES, allow_pickle=False)
        if self.entries.ndim != 4 or self.entries.shape[2:] != (len(self.order), 3):
            raise ValueError(f"{self.folder / ENTRIES}: shape {self.entries.shape}, expected (views, samples, "
                             f"{len(self.order)}, 3)")
        # The .npy header of each field, as written: a read compares bytes instead of parsing it.
        self.headers = {f: _npy(np.zeros(shape, dtype))[: -int(np.prod(shape)) * np.dtype(dtype).itemsize or None]
                        for f, shape, dtype in self.order}
        self._fds: dict[int, int] = {}

    def _fd(self, view: int) -> int:
        if view not in self._fds:
            self._fds[view] = os.open(self.folder / f"v{view}.tar", os.O_RDONLY)
        return self._fds[view]

    def read(self, row: int, view: int, roles=None) -> dict[str, np.ndarray]:
        out, fd = {}, self._fd(view)
        for name in roles or self.specs:
            for field, (shape, dtype) in self.specs[name].fields().items():
                offset, size, crc = (int(v) for v in self.entries[view, row, self.column[field]])
                payload = os.pread(fd, size, offset)
                where = f"{self.folder / f'v{view}.tar'}: entry {field} of row {row}"
                if len(payload) != size:
                    raise ValueError(f"{where} is cut short ({len(payload)} of {size} bytes)")
                if zlib.crc32(payload) != crc:
                    raise ValueError(f"{where} fails its crc32 (the tar is damaged; run inspect-shards --verify)")
                header = self.headers[field]
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                decoded = bytearray(len(header) + nbytes)  # decoded in place: a writable array, no copy
                try:
                    _ZSTD.decode(payload, out=decoded)
                except RuntimeError:  # not of that size: written by another numpy (other header padding)
                    decoded = None
                if decoded is not None and decoded.startswith(header):
                    out[field] = np.frombuffer(decoded, dtype, offset=len(header)).reshape(shape)
                else:
                    out[field] = np.load(io.BytesIO(bytes(_ZSTD.decode(payload))), allow_pickle=False)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def open_shard(folder: Path, specs: dict[str, RoleSpec], meta: dict | None = None) -> TarShard:
    """meta: the shard's shard.json (unused here)."""
    return TarShard(folder, specs, meta)
