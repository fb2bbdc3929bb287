"""zarr v3 store: a shard folder is a zarr group with one array per stored field.

Array shape (n, K, *field_shape); chunk (1, 1, *field_shape) = one view of one sample, the unit of
reading; zarr shard = the whole array, the unit of writing (one file per field per cache shard,
so a cache of a million views is not a million files). Compression: zstd with its frame checksum
(a flipped bit fails the read instead of decoding to wrong values), no shuffle (byte or bit
shuffling hurt sparse post-ReLU maps, measured in bench/storage.py).

Reading goes around zarr's general machinery (1.7 ms a view: several opens, reads and seeks):
a shard's index is parsed once and each view is one pread and one zstd decode. zarr's own
reader gives the same arrays (tested), and remains the reader of any other layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from ..encoding import map_ordered, slices
from ..schema import RoleSpec

__all__ = ["write_shard", "open_shard", "write_root", "missing_entries"]

_ZSTD = Zstd()


def write_root(root: Path) -> None:
    """Make the cache folder itself a zarr group, so zarr tools see the shards as its children."""
    zarr.open_group(str(root), mode="a", zarr_format=3)


def write_shard(folder: Path, specs: dict[str, RoleSpec], fields: dict[str, np.ndarray], samples: list[dict],
                num_views: int, level: int = 3, workers: int = 1) -> None:
    """workers: threads compressing the views (pipeline.encoding); the files are the same at any count."""
    group = zarr.open_group(str(folder), mode="w", zarr_format=3)
    group.attrs["scalekd"] = {"samples": len(samples), "num_views": num_views}
    for spec in specs.values():
        for field, (shape, dtype) in spec.fields().items():
            data = fields[field]
            full = (len(samples), num_views, *shape)
            if data.shape != full:
                raise ValueError(f"field {field}: expected {full}, found {data.shape}")
            # zarr writes the array's metadata; the one shard file is written here (see _write_shard_file).
            group.create_array(field, shape=full, chunks=(1, 1, *shape), shards=full, dtype=dtype,
                               compressors=ZstdCodec(level=level, checksum=True), fill_value=0)
            if len(samples):
                _write_shard_file(folder / field / "c" / "/".join("0" * len(full)), data, dtype, level, workers)


def _write_shard_file(path: Path, data: np.ndarray, dtype: str, level: int, workers: int = 1) -> None:
    """The sharding codec's file, as zarr's own reader reads it: every (1, 1, *shape) chunk as
    little-endian bytes through zstd (with its checksum), back to back in C order, then the index
    ((offset, size) uint64 per chunk) and its crc32c. zarr's own ``arr[...] = data`` takes 0.38 s for
    a 256 × 4-view shard of tiny arrays (per-chunk asyncio tasks); this takes a few milliseconds,
    and the chunks' bytes are the same (numcodecs' Zstd is zarr's zstd codec)."""
    codec = Zstd(level=level, checksum=True)
    n, k = data.shape[:2]
    flat = np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(n * k, -1)
    chunks = [c for part in map_ordered(lambda s: [codec.encode(row) for row in flat[s]], slices(len(flat), workers),
                                        workers) for c in part]
    sizes = np.fromiter((len(c) for c in chunks), np.uint64, len(chunks))
    index = np.empty((len(chunks), 2), "<u8")
    index[:, 1] = sizes
    index[:, 0] = np.cumsum(sizes) - sizes
    raw = index.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"".join(chunks))
        f.write(raw)
        f.write(google_crc32c.value(raw).to_bytes(4, "little"))


_NO_CHUNK = 2**64 - 1  # zarr's shard-index entry for a chunk never written (all fill value)


class _FieldFile:
    """One field's zarr shard file, read without zarr: its index (offset, size per chunk, checked
    with its crc32c) parsed once, then one pread and one zstd decode per view. The layout is zarr
    v3's sharding codec as this store writes it (checked against the array's zarr.json); any other
    layout is read through zarr itself."""

    def __init__(self, folder: Path, field: str):
        meta = json.loads((folder / field / "zarr.json").read_text())
        n, k = meta["shape"][:2]
        # The array's own shape and dtype (the reader checks them against the manifest's declaration).
        self.shape, self.dtype = tuple(meta["shape"][2:]), np.dtype(meta["data_type"]).newbyteorder("<")
        self.fd = None
        if not _fast_layout(meta, self.shape) or n == 0:
            self.array = zarr.open_array(str(folder / field), mode="r")
            return
        path = folder / field / "c" / "/".join("0" * len(meta["shape"]))
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            nbytes = n * k * 16 + 4
            raw = os.pread(fd, nbytes, size - nbytes) if size >= nbytes else b""
            if len(raw) != nbytes:
                raise ValueError(f"{path}: {size} bytes, too short for the index of {n * k} chunks")
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ValueError(f"{path}: the shard index fails its crc32c checksum")
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path, self.index = fd, path, np.frombuffer(raw[:-4], "<u8").reshape(n, k, 2)

    def read(self, row: int, view: int) -> np.ndarray:
        if self.fd is None:
            return self.array[row, view]
        offset, size = (int(v) for v in self.index[row, view])
        if offset == _NO_CHUNK:
            return np.zeros(self.shape, self.dtype)
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.path}: chunk ({row}, {view}) is cut short ({len(data)} of {size} bytes)")
        out = np.empty(self.shape, self.dtype)  # decoded in place: a writable array, no copy
        _ZSTD.decode(data, out=out)
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _fast_layout(meta: dict, shape) -> bool:
    """Is this array one shard of (1, 1, *shape) chunks, bytes(little) + zstd inside, index at the end?"""
    try:
        (codec,) = meta["codecs"]
        cfg = codec["configuration"]
        inner = [c["name"] for c in cfg["codecs"]]
        return (codec["name"] == "sharding_indexed" and cfg["chunk_shape"] == [1, 1, *shape]
                and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and inner == ["bytes", "zstd"] and cfg["codecs"][0].get("configuration", {}).get("endian", "little") == "little"  # 1-byte types: none
                and [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
                and cfg.get("index_location", "end") == "end" and meta.get("fill_value") in (0, 0.0))
    except (KeyError, TypeError, ValueError):
        return False


def missing_entries(folder: Path, specs: dict[str, RoleSpec], samples: list[dict], num_views: int) -> list[str]:
    """What a written shard folder lacks (empty when whole): each field's array metadata, and its data
    file when the shard holds samples."""
    missing = []
    for spec in specs.values():
        for field in spec.fields():
            if not (folder / field / "zarr.json").is_file():
                missing.append(f"array {field!r}")
            elif samples and not any(p.is_file() for p in (folder / field).glob("c/**/*")):
                missing.append(f"the data of array {field!r}")
    return missing


class ZarrShard:
    """A committed shard's arrays, kept open while the reader holds the shard (its LRU bounds them)."""

    def __init__(self, folder: Path, specs: dict[str, RoleSpec], meta: dict | None = None):
        self.folder, self.specs = Path(folder), specs
        self._fields: dict[str, _FieldFile] = {}

    def read(self, row: int, view: int, roles=None) -> dict[str, np.ndarray]:
        out = {}
        for name in roles or self.specs:
            for field in self.specs[name].fields():
                if field not in self._fields:
                    self._fields[field] = _FieldFile(self.folder, field)
                out[field] = self._fields[field].read(row, view)
        return out

    def close(self) -> None:
        for f in self._fields.values():
            f.close()
        self._fields = {}


def open_shard(folder: Path, specs: dict[str, RoleSpec], meta: dict | None = None) -> ZarrShard:
    """meta: the shard's shard.json (unused here)."""
    return ZarrShard(folder, specs, meta)
