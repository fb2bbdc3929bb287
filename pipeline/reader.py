"""Reading a cache: one view of one sample at a time, from either store, decoded to float32."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


from .schema import MANIFEST, SHARD_META, ManifestError, RoleSpec, decode, read_manifest
from .shards import record_mismatch
from .stores import store_module

__all__ = ["CacheReader"]


class CacheReader:
    """A committed cache, readable without the teacher.

    ``reader[i]`` is the i-th stored sample's metadata (key, label, index in the dataset listing,
    views, fingerprints); ``read(i, view)`` decodes that one view's roles to float32 arrays.
    φ(final) is not stored: ``scalekd.targets.Targets.from_final`` derives it, as for online targets.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.format = self.manifest["format"]
        self.num_views = int(self.manifest["num_views"])
        self.specs = {name: RoleSpec.from_dict(r) for name, r in self.manifest["roles"].items()}
        self._store = store_module(self.format)
        self.samples: list[dict] = []
        self._shard_meta: dict[str, dict] = {}
        for record in self.manifest["shards"]:
            path = self.root / record["name"] / SHARD_META
            try:
                meta = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ManifestError(f"{path}: cannot read shard metadata ({e}); run inspect-shards --verify") from None
            # A hand-edited manifest (checksum, counts, range) no longer describes its shard: refuse it
            # here, for free (shard.json is read anyway), rather than train on what it does not vouch for.
            mismatch = record_mismatch(meta, record)
            if mismatch:
                raise ManifestError(f"{self.root / MANIFEST}: its record of {record['name']} does not match "
                                    f"{path} ({mismatch}); run inspect-shards --verify")
            self._shard_meta[record["name"]] = meta
            for row, s in enumerate(meta["samples"]):
                self.samples.append(s | {"shard": record["name"], "row": row})
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    def _shard(self, name: str):
        if name not in self._open:
            self._open[name] = self._store.open_shard(self.root / name, self.specs, self._shard_meta[name])
        return self._open[name]

    def read(self, i: int, view: int, roles: list[str] | None = None) -> dict[str, np.ndarray]:
        """Decoded roles of sample i, view ``view``: {role: float32 array}."""
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range: {self.root} holds {self.num_views} views per sample")
        roles = roles or list(self.specs)
        missing = [r for r in roles if r not in self.specs]
        if missing:
            raise KeyError(f"{self.root} does not store role(s) {missing}; it stores {list(self.specs)}")
        s = self.samples[i]
        try:
            fields = self._shard(s["shard"]).read(s["row"], view, roles)
        except Exception as e:  # noqa: BLE001 — zarr/numcodecs/numpy raise many kinds on corrupt data
            raise ManifestError(f"{self.root / s['shard']}: cannot read sample {s['key']!r} (index {s['index']}), "
                                f"view {view}: {e}") from e
        for r in roles:
            for field, (shape, dtype) in self.specs[r].fields().items():
                a = fields[field]
                if tuple(a.shape) != shape or str(a.dtype) != dtype:
                    raise ManifestError(f"{self.root / s['shard']}: field {field!r} of sample {s['key']!r}, view {view} "
                                        f"is {a.dtype}{tuple(a.shape)}, but {MANIFEST} declares {dtype}{shape}")
        return {r: decode(self.specs[r], fields) for r in roles}
