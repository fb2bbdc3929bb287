"""Reading a cache: one view of one sample at a time, from either store, decoded to float32.

Built for ImageNet size: the per-sample metadata is the columnar index (``pipeline.sample_index``),
memory-mapped from the cache's consolidated ``index/`` (or concatenated from the shards' own
indices while a cache is incomplete), so opening a cache reads no per-sample JSON and forked
DataLoader workers share its pages. Open shards are kept in a bounded LRU, each holding its files
open with their chunk tables parsed: a read is one pread (and one decode) per field.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .sample_index import INDEX_DIR, SampleIndex
from .schema import MANIFEST, SHARD_META, ManifestError, RoleSpec, decode, read_manifest
from .shards import record_mismatch
from .stores import store_module

__all__ = ["CacheReader", "OPEN_SHARDS"]

OPEN_SHARDS = 64  # shards held open per reader (a few files each)


class CacheReader:
    """A committed cache, readable without the teacher.

    ``reader[i]`` is the i-th stored sample's metadata (key, label, index in the dataset listing,
    views, fingerprints, its image's absolute source), built on demand; ``read(i, view)`` decodes
    that one view's roles to float32 arrays. φ(final) is not stored:
    ``scalekd.targets.Targets.from_final`` derives it, as for online targets.

    data_root: where the dataset lives now (a cache records sources relative to the dataset root;
    by default the root recorded at caching time).
    """

    def __init__(self, root: str | Path, data_root: str | Path | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.format = self.manifest["format"]
        self.num_views = int(self.manifest["num_views"])
        self.specs = {name: RoleSpec.from_dict(r) for name, r in self.manifest["roles"].items()}
        self._store = store_module(self.format)
        self.shards: list[dict] = list(self.manifest["shards"])
        recorded = self.manifest.get("dataset", {}).get("root")
        self.data_root = Path(data_root if data_root is not None else (recorded or "."))
        self.index = self._open_index()
        self._ends = np.cumsum([r["samples"] for r in self.shards], dtype=np.int64)
        total = int(self._ends[-1]) if len(self._ends) else 0
        if len(self.index) != total or self.manifest["num_samples"] != total:
            raise ManifestError(f"{self.root / MANIFEST}: {self.manifest['num_samples']} samples declared, its shards "
                                f"record {total}, their index holds {len(self.index)}; run inspect-shards --verify")
        # A forked DataLoader worker inherits these descriptors; every read is a pread (no shared
        # file offset), so parent and workers may use them alike.
        self._open: OrderedDict[str, object] = OrderedDict()

    def _open_index(self) -> SampleIndex:
        consolidated = self.manifest.get("index")
        width = len(self.manifest["views"].get("fields", [])) or 5
        try:
            if consolidated:
                folder = self.root / INDEX_DIR
                for name, f in consolidated["files"].items():
                    if (folder / name).stat().st_size != f["bytes"]:
                        raise ValueError(f"{folder / name} is {(folder / name).stat().st_size} bytes, "
                                         f"{MANIFEST} records {f['bytes']}")
                return SampleIndex.open(folder)
            # An incomplete cache: its shards' own indices, concatenated (in memory).
            return SampleIndex.concat([SampleIndex.open(self.root / r["name"] / INDEX_DIR, mmap=False)
                                       for r in self.shards], self.num_views, width)
        except (OSError, ValueError) as e:
            raise ManifestError(f"{self.root}: cannot open the sample index ({e}); run inspect-shards --verify") from None

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, i: int) -> tuple[int, int]:
        """(position of the sample's shard in the manifest, row in that shard)."""
        if not 0 <= i < len(self.index):
            raise IndexError(f"sample {i} out of range: {self.root} holds {len(self.index)} samples")
        k = int(np.searchsorted(self._ends, i, side="right"))
        return k, i - (int(self._ends[k - 1]) if k else 0)

    def __getitem__(self, i: int) -> dict:
        k, row = self.locate(i)
        s = self.index.record(i)
        return s | {"source": str(self.data_root / s["source"]), "shard": self.shards[k]["name"], "row": row}

    def views(self, i: int) -> np.ndarray:
        """(K, F) view parameters of sample i (columns named by the manifest's views.fields)."""
        return np.asarray(self.index.arrays["views"][i])

    def _shard(self, k: int):
        record = self.shards[k]
        name = record["name"]
        shard = self._open.pop(name, None)
        if shard is None:
            path = self.root / name / SHARD_META
            try:
                meta = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ManifestError(f"{path}: cannot read shard metadata ({e}); run inspect-shards --verify") from None
            # A hand-edited manifest (checksum, counts, range) no longer describes its shard: refuse it
            # when the shard is first read, rather than train on what the manifest does not vouch for.
            mismatch = record_mismatch(meta, record)
            if mismatch:
                raise ManifestError(f"{self.root / MANIFEST}: its record of {name} does not match {path} ({mismatch}); "
                                    f"run inspect-shards --verify")
            shard = self._store.open_shard(self.root / name, self.specs, meta)
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        self._open[name] = shard  # most recently used last
        return shard

    def read(self, i: int, view: int, roles: list[str] | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
        """Decoded roles of sample i, view ``view``: {role: float32 array}; dtype None: fp16 and fp32 roles
        as stored (half the bytes to copy and collate; converted exactly where they are used)."""
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range: {self.root} holds {self.num_views} views per sample")
        roles = roles or list(self.specs)
        missing = [r for r in roles if r not in self.specs]
        if missing:
            raise KeyError(f"{self.root} does not store role(s) {missing}; it stores {list(self.specs)}")
        k, row = self.locate(i)
        name = self.shards[k]["name"]
        try:
            fields = self._shard(k).read(row, view, roles)
        except ManifestError:
            raise
        except Exception as e:  # noqa: BLE001 — zarr/numcodecs/numpy raise many kinds on corrupt data
            key = self.index.string("key", i)
            raise ManifestError(f"{self.root / name}: cannot read sample {key!r} (index "
                                f"{int(self.index.arrays['dataset_index'][i])}), view {view}: {e}") from e
        for r in roles:
            for field, (shape, stored) in self.specs[r].fields().items():
                a = fields[field]
                if tuple(a.shape) != shape or str(a.dtype) != stored:
                    key = self.index.string("key", i)
                    raise ManifestError(f"{self.root / name}: field {field!r} of sample {key!r}, view {view} "
                                        f"is {a.dtype}{tuple(a.shape)}, but {MANIFEST} declares {stored}{shape}")
        return {r: decode(self.specs[r], fields, dtype) for r in roles}

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open = OrderedDict()
