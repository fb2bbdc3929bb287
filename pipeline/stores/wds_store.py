"""webdataset store: a shard folder holds one tar per view index, v0.tar … v{K-1}.tar.

An epoch that uses view k reads only the v{k}.tar files, streamed in order by plain webdataset
(``webdataset.WebDataset("cache/shard-{00000..00099}/v0.tar")``) or by index, as our reader does.
Each sample of a tar: ``s<index>.json`` (key, label, view parameters, fingerprint) and one
``s<index>.<field>.npy`` per stored field. Only .npy and .json entries exist; nothing is pickled.

Written with the standard tarfile module rather than webdataset's TarWriter: headers are stamped
with mtime 0 and a fixed owner, so re-running a shard gives byte-identical files and checksums.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from ..schema import RoleSpec

__all__ = ["write_shard", "open_shard", "member_name", "missing_entries"]


def member_name(index: int, field: str) -> str:
    return f"s{index:08d}.{field}.npy"


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, "scalekd", "scalekd"
    tar.addfile(info, io.BytesIO(payload))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_shard(folder: Path, specs: dict[str, RoleSpec], fields: dict[str, np.ndarray], samples: list[dict],
                num_views: int, level: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for view in range(num_views):
        with tarfile.open(folder / f"v{view}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row, s in enumerate(samples):
                meta = {"key": s["key"], "label": s["label"], "index": s["index"], "view_index": view,
                        "view": s["views"][view], "fingerprint": s["fingerprints"][view]}
                _add(tar, f"s{s['index']:08d}.json", json.dumps(meta).encode())
                for spec in specs.values():
                    for field in spec.fields():
                        _add(tar, member_name(s["index"], field), _npy(fields[field][row, view]))


def missing_entries(folder: Path, specs: dict[str, RoleSpec], samples: list[dict], num_views: int) -> list[str]:
    """What a written shard folder lacks (empty when whole): a view's tar, or an entry of one."""
    missing = []
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
    def __init__(self, folder: Path, specs: dict[str, RoleSpec], meta: dict):
        self.folder, self.specs = Path(folder), specs
        self.indices = [s["index"] for s in meta["samples"]]
        self._index: dict[int, dict[str, tuple[int, int]]] = {}

    def _members(self, view: int) -> dict[str, tuple[int, int]]:
        # Member name → (data offset, size), from the headers alone.
        if view not in self._index:
            with tarfile.open(self.folder / f"v{view}.tar", "r:") as tar:
                self._index[view] = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        return self._index[view]

    def read(self, row: int, view: int, roles=None) -> dict[str, np.ndarray]:
        members, index = self._members(view), self.indices[row]
        out = {}
        with open(self.folder / f"v{view}.tar", "rb") as f:
            for name in roles or self.specs:
                for field in self.specs[name].fields():
                    member = member_name(index, field)
                    if member not in members:
                        raise KeyError(f"{self.folder / f'v{view}.tar'}: entry {member} is missing")
                    offset, size = members[member]
                    f.seek(offset)
                    out[field] = np.load(io.BytesIO(f.read(size)), allow_pickle=False)
        return out


def open_shard(folder: Path, specs: dict[str, RoleSpec], meta: dict) -> TarShard:
    """meta: the shard's shard.json."""
    return TarShard(folder, specs, meta)
