"""webdataset store: a shard folder holds one tar per view index, v0.tar … v{K-1}.tar.

An epoch that uses view k reads only the v{k}.tar files, streamed in order by plain webdataset
(``webdataset.WebDataset("cache/shard-{00000..00099}/v0.tar")``) or by index, as our reader does.
Each sample of a tar: ``s<index>.json`` (key, label, view parameters, fingerprint) and one
``s<index>.<role>.npy.zst`` per stored role: the role's fields as .npy files back to back (one for
fp32/fp16, e.g. ``final``; ``final_q``, ``final_scale`` (, ``final_dc``) for the int8 codecs, in the
manifest's order), compressed by zstd (numcodecs' Zstd, zarr's codec, at the job's
``compression_level``, with zstd's content checksum) one zstd frame per field, the frames back to
back (zstd decodes concatenated frames as one stream, so one ``Zstd().decode`` gives the .npy files
back to back), so the same cache is about as large here as in zarr: each field is compressed on its
own, as zarr's chunks are (one frame over an int8 role's q and its float scales shares one literal
table between them and costs 1–2 % more), and tar's framing (a 512-byte header and padding per entry)
is paid once per role, not per field (caches whose role entries are one frame read the same way).
Only .npy.zst and .json entries exist; nothing is pickled. Plain webdataset streams a view's tars
with one decoder handler for the .npy.zst entries (``npy_zst`` below; docs/cache-format.md). ``entries.npy`` beside the tars records every .npy.zst entry's data offset,
size and crc32 (of the stored, compressed bytes) at commit time, so a read is one pread and one zstd
decode per role with no tar header parsed, and every read is checked. (Caches written when each
field had its own entry, ``s<index>.<field>.npy.zst``, are read as they are: their entries table has
one column per field.)

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


def member_name(index: int, role: str) -> str:
    return f"s{index:08d}.{role}.{EXTENSION}"


ENTRIES = "entries.npy"  # int64 (K, n, roles, 3): data offset, size and crc32 of every .npy.zst entry
_ZSTD = Zstd()  # decoding needs no level


def npy_zst(data: bytes) -> np.ndarray | tuple[np.ndarray, ...]:
    """One .npy.zst entry's bytes (a zstd frame per field, or one frame for all) → its array, or its
    arrays in order when the role has several fields (what a plain-webdataset user's handler does)."""
    f = io.BytesIO(_ZSTD.decode(data))
    arrays = []
    while f.tell() < len(f.getbuffer()):
        arrays.append(np.load(f, allow_pickle=False))
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


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
    """(field, shape, dtype) of every role, in the manifest's order (a role's entry holds its fields so)."""
    return [(f, shape, dtype) for spec in specs.values() for f, (shape, dtype) in spec.fields().items()]


def write_shard(folder: Path, specs: dict[str, RoleSpec], fields: dict[str, np.ndarray], samples: list[dict],
                num_views: int, level: int = 3, workers: int = 1) -> None:
    """workers: threads compressing the entries (pipeline.encoding); the tars are the same at any count."""
    folder.mkdir(parents=True, exist_ok=True)
    codec = Zstd(level=level, checksum=True)
    roles = list(specs)
    entries = np.zeros((num_views, len(samples), len(roles), 3), np.int64)
    for view in range(num_views):  # one view's entries compressed at a time: memory holds one tar's worth

        def compress(rows: slice, view: int = view) -> list[bytes]:  # every role of each row, in the tar's order
            return [b"".join(bytes(codec.encode(_npy(fields[f][row, view]))) for f in specs[r].fields())
                    for row in range(len(samples))[rows] for r in roles]

        payloads = iter([p for part in map_ordered(compress, slices(len(samples), workers), workers) for p in part])
        with tarfile.open(folder / f"v{view}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row, s in enumerate(samples):
                meta = {"key": s["key"], "label": s["label"], "index": s["index"], "view_index": view,
                        "view": s["views"][view], "fingerprint": s["fingerprints"][view]}
                _add(tar, f"s{s['index']:08d}.json", json.dumps(meta).encode())
                for j, role in enumerate(roles):
                    payload = next(payloads)
                    offset = _add(tar, member_name(s["index"], role), payload)
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
        wanted += [member_name(s["index"], r) for s in samples for r in specs]
        missing += [f"v{view}.tar:{n}" for n in wanted if n not in names]
    return missing


class TarShard:
    """A committed shard's tars, read by the offsets recorded at commit: one pread and one zstd
    decode per role, its crc32 checked on every read (a flipped byte is an error, not a wrong
    target; zstd's own checksum then guards the decoded bytes)."""

    def __init__(self, folder: Path, specs: dict[str, RoleSpec], meta: dict | None = None):
        self.folder, self.specs = Path(folder), specs
        self.order = field_order(specs)
        self.entries = np.load(self.folder / ENTRIES, allow_pickle=False)
        # An entry per role (its fields back to back), or, in caches written before, an entry per field.
        self.per_role = self.entries.ndim == 4 and self.entries.shape[2:] == (len(specs), 3)
        units = [[f] for f, _, _ in self.order] if not self.per_role else [list(s.fields()) for s in specs.values()]
        if self.entries.ndim != 4 or self.entries.shape[2:] != (len(units), 3):
            raise ValueError(f"{self.folder / ENTRIES}: shape {self.entries.shape}, expected (views, samples, "
                             f"{len(specs)}, 3)")
        self.column = {f: j for j, unit in enumerate(units) for f in unit}
        self.units = units
        # The .npy header of each field, as written: a read compares bytes instead of parsing it.
        self.layout = {f: (shape, dtype, _npy(np.zeros(shape, dtype))[: -int(np.prod(shape)) * np.dtype(dtype).itemsize
                                                                     or None])
                       for f, shape, dtype in self.order}
        self._fds: dict[int, int] = {}

    def _fd(self, view: int) -> int:
        if view not in self._fds:
            self._fds[view] = os.open(self.folder / f"v{view}.tar", os.O_RDONLY)
        return self._fds[view]

    def read(self, row: int, view: int, roles=None) -> dict[str, np.ndarray]:
        out, fd = {}, self._fd(view)
        wanted = [f for name in roles or self.specs for f in self.specs[name].fields()]
        for unit in [u for u in self.units if u[0] in wanted]:
            offset, size, crc = (int(v) for v in self.entries[view, row, self.column[unit[0]]])
            payload = os.pread(fd, size, offset)
            where = f"{self.folder / f'v{view}.tar'}: entry {'+'.join(unit)} of row {row}"
            if len(payload) != size:
                raise ValueError(f"{where} is cut short ({len(payload)} of {size} bytes)")
            if zlib.crc32(payload) != crc:
                raise ValueError(f"{where} fails its crc32 (the tar is damaged; run inspect-shards --verify)")
            spans = [(f, *self.layout[f]) for f in unit]
            decoded = bytearray(sum(len(h) + int(np.prod(s)) * np.dtype(d).itemsize for _, s, d, h in spans))
            try:  # decoded in place: writable arrays, no copy
                _ZSTD.decode(payload, out=decoded)
            except RuntimeError:  # not of that size: written by another numpy (other header padding)
                decoded = None
            at, fast = 0, decoded is not None
            for f, shape, dtype, header in spans:
                if not fast or decoded[at:at + len(header)] != header:
                    fast = False
                    break
                out[f] = np.frombuffer(decoded, dtype, count=int(np.prod(shape)), offset=at + len(header)).reshape(shape)
                at += len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not fast:
                arrays = npy_zst(payload)
                out.update(zip(unit, arrays if isinstance(arrays, tuple) else (arrays,)))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def open_shard(folder: Path, specs: dict[str, RoleSpec], meta: dict | None = None) -> TarShard:
    """meta: the shard's shard.json (unused here)."""
    return TarShard(folder, specs, meta)
