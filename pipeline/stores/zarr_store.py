"""zarr v3 store: a shard folder is a zarr group with one array per stored field.

Array shape (n, K, *field_shape); chunk (1, 1, *field_shape) = one view of one sample, the unit of
reading; zarr shard = the whole array, the unit of writing (one file per field per cache shard,
so a cache of a million views is not a million files). Compression: zstd with its frame checksum
(a flipped bit fails the read instead of decoding to wrong values), no shuffle (byte or bit
shuffling hurt sparse post-ReLU maps, measured in bench/storage.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from ..schema import RoleSpec

__all__ = ["write_shard", "open_shard", "write_root", "missing_entries"]


def write_root(root: Path) -> None:
    """Make the cache folder itself a zarr group, so zarr tools see the shards as its children."""
    zarr.open_group(str(root), mode="a", zarr_format=3)


def write_shard(folder: Path, specs: dict[str, RoleSpec], fields: dict[str, np.ndarray], samples: list[dict],
                num_views: int, level: int = 3) -> None:
    group = zarr.open_group(str(folder), mode="w", zarr_format=3)
    group.attrs["scalekd"] = {"samples": len(samples), "num_views": num_views}
    for spec in specs.values():
        for field, (shape, dtype) in spec.fields().items():
            data = fields[field]
            full = (len(samples), num_views, *shape)
            if data.shape != full:
                raise ValueError(f"field {field}: expected {full}, found {data.shape}")
            arr = group.create_array(field, shape=full, chunks=(1, 1, *shape), shards=full, dtype=dtype,
                                     compressors=ZstdCodec(level=level, checksum=True), fill_value=0)
            arr[...] = data


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
    def __init__(self, folder: Path, specs: dict[str, RoleSpec], meta: dict):
        self.folder, self.specs = Path(folder), specs
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, field: str) -> zarr.Array:
        if field not in self._arrays:
            self._arrays[field] = zarr.open_array(str(self.folder / field), mode="r")
        return self._arrays[field]

    def read(self, row: int, view: int, roles=None) -> dict[str, np.ndarray]:
        out = {}
        for name in roles or self.specs:
            for field in self.specs[name].fields():
                out[field] = self._array(field)[row, view]
        return out


def open_shard(folder: Path, specs: dict[str, RoleSpec], meta: dict) -> ZarrShard:
    """meta: the shard's shard.json."""
    return ZarrShard(folder, specs, meta)
