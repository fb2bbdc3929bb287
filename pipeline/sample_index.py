"""The columnar sample index: a cache's per-sample metadata as a few flat arrays, never as dicts.

At ImageNet size (1.28 M samples × K views) a list of per-sample dicts costs ~2.5 KB a sample in
every process, and a forked DataLoader worker copies the pages it touches (reference counts are
written on read). Here a sample's metadata lives in plain ``.npy`` files that a reader opens with
``mmap_mode="r"``: forked workers share the pages, nothing is copied on read, and a sample's record
is built on demand. Every file is readable with numpy alone.

An index folder (``shard-NNNNN/index/`` for one shard, written at its commit; ``index/`` at the
cache root for the whole cache, written when the job completes) holds, for n samples and K views:

    dataset_index.npy   int64   (n,)         position in the sorted dataset listing
    label.npy           int64   (n,)         class label (the teacher's head index)
    views.npy           float64 (n, K, F)    view parameters; column j is named by the manifest's
                                             ``views.fields[j]`` (F = its length)
    fingerprint.npy     uint8   (n, K, 8)    first 8 bytes of sha256 of the teacher's uint8 input
    image_span.npy      int64   (n, 2)       byte offset and size of the image inside its tar
                                             (-1, -1 for an image file)
    key.bin / key_offsets.npy          UTF-8 blob, int64 (n + 1,): key i is blob[off[i]:off[i+1]]
    source.bin / source_offsets.npy    the image file or tar, relative to the dataset root (POSIX)
    member.bin / member_offsets.npy    the image's member name inside its tar ('' for a file)

The view-parameter width F is declared, not assumed: a richer augmentation (more ops, more
columns) appends named columns to ``views.fields`` and every reader slices by name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["INDEX_DIR", "ARRAY_COLUMNS", "STRING_COLUMNS", "index_files", "write_index", "SampleIndex",
           "fingerprint_bytes", "COLUMNS_DOC"]

INDEX_DIR = "index"
ARRAY_COLUMNS = ("dataset_index", "label", "views", "fingerprint", "image_span")
STRING_COLUMNS = ("key", "source", "member")
FINGERPRINT_BYTES = 8

COLUMNS_DOC = {
    "dataset_index": "int64 (n,): position in the sorted dataset listing",
    "label": "int64 (n,): class label",
    "views": "float64 (n, K, F): view parameters, column j named by views.fields[j]",
    "fingerprint": "uint8 (n, K, 8): first 8 bytes of sha256 of the teacher's uint8 input pixels",
    "image_span": "int64 (n, 2): byte offset and size of the image inside its tar; -1, -1 for an image file",
    "key": "key.bin (UTF-8) + key_offsets.npy int64 (n+1,): key i = blob[off[i]:off[i+1]]",
    "source": "source.bin + source_offsets.npy: image file or tar, relative to the dataset root",
    "member": "member.bin + member_offsets.npy: member name inside the tar ('' for an image file)",
}


def index_files() -> list[str]:
    """The file names of an index folder."""
    return [f"{c}.npy" for c in ARRAY_COLUMNS] + [n for c in STRING_COLUMNS for n in (f"{c}.bin", f"{c}_offsets.npy")]


def fingerprint_bytes(hex_digest: str) -> bytes:
    return bytes.fromhex(hex_digest)[:FINGERPRINT_BYTES]


def _strings(values: list[str]) -> tuple[bytes, np.ndarray]:
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


def write_index(folder: Path, samples: list[dict], num_views: int, view_width: int) -> None:
    """One shard's index from its sample records (at most a shard's worth of dicts, briefly).

    samples: {index, key, label, source (relative), member, span, views (K×F), fingerprints (K hex)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    arrays = {
        "dataset_index": np.array([s["index"] for s in samples], np.int64).reshape(n),
        "label": np.array([s["label"] for s in samples], np.int64).reshape(n),
        "views": np.array([s["views"] for s in samples], np.float64).reshape(n, num_views, view_width),
        "fingerprint": np.frombuffer(b"".join(fingerprint_bytes(f) for s in samples for f in s["fingerprints"]),
                                     np.uint8).reshape(n, num_views, FINGERPRINT_BYTES),
        "image_span": np.array([s.get("span") or (-1, -1) for s in samples], np.int64).reshape(n, 2),
    }
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a, allow_pickle=False)
    for name in STRING_COLUMNS:
        blob, offsets = _strings([s.get(name) or "" for s in samples])
        (folder / f"{name}.bin").write_bytes(blob)
        np.save(folder / f"{name}_offsets.npy", offsets, allow_pickle=False)


class SampleIndex:
    """Columnar metadata of n samples: arrays (memory-mapped when opened from one folder)."""

    def __init__(self, arrays: dict[str, np.ndarray], blobs: dict[str, np.ndarray], offsets: dict[str, np.ndarray]):
        self.arrays, self.blobs, self.offsets = arrays, blobs, offsets
        self.n = len(arrays["label"])
        for name, a in arrays.items():
            if len(a) != self.n:
                raise ValueError(f"index column {name} has {len(a)} rows, label has {self.n}")
        for name, off in offsets.items():
            if len(off) != self.n + 1 or (self.n and int(off[-1]) != len(blobs[name])):
                raise ValueError(f"index column {name}: {len(off)} offsets for {self.n} samples over "
                                 f"{len(blobs[name])} bytes")

    @classmethod
    def open(cls, folder: Path, mmap: bool = True) -> "SampleIndex":
        """An index folder; raises OSError/ValueError when a file is missing or malformed."""
        folder = Path(folder)
        mode = "r" if mmap else None
        arrays = {c: np.load(folder / f"{c}.npy", mmap_mode=mode, allow_pickle=False) for c in ARRAY_COLUMNS}
        blobs, offsets = {}, {}
        for c in STRING_COLUMNS:
            path = folder / f"{c}.bin"
            size = path.stat().st_size
            # np.memmap refuses a 0-byte file; an empty blob is an empty array.
            blobs[c] = (np.memmap(path, np.uint8, "r") if mmap and size else np.fromfile(path, np.uint8))
            offsets[c] = np.load(folder / f"{c}_offsets.npy", mmap_mode=mode, allow_pickle=False)
        return cls(arrays, blobs, offsets)

    @classmethod
    def concat(cls, parts: list["SampleIndex"], num_views: int, view_width: int) -> "SampleIndex":
        """Several shards' indices as one (in memory: for a cache that is not complete yet)."""
        if not parts:
            empty = {"dataset_index": np.zeros(0, np.int64), "label": np.zeros(0, np.int64),
                     "views": np.zeros((0, num_views, view_width)), "image_span": np.zeros((0, 2), np.int64),
                     "fingerprint": np.zeros((0, num_views, FINGERPRINT_BYTES), np.uint8)}
            return cls(empty, {c: np.zeros(0, np.uint8) for c in STRING_COLUMNS},
                       {c: np.zeros(1, np.int64) for c in STRING_COLUMNS})
        arrays = {c: np.concatenate([p.arrays[c] for p in parts]) for c in ARRAY_COLUMNS}
        blobs, offsets = {}, {}
        for c in STRING_COLUMNS:
            blobs[c] = np.concatenate([np.asarray(p.blobs[c]) for p in parts])
            base = np.cumsum([0] + [len(p.blobs[c]) for p in parts[:-1]])
            offsets[c] = np.concatenate([np.asarray(parts[0].offsets[c][:1])]
                                        + [np.asarray(p.offsets[c][1:]) + b for p, b in zip(parts, base)])
        return cls(arrays, blobs, offsets)

    def save(self, folder: Path) -> None:
        """Write this index as one folder (the cache's consolidated index), streaming each column."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for c in ARRAY_COLUMNS:
            np.save(folder / f"{c}.npy", np.asarray(self.arrays[c]), allow_pickle=False)
        for c in STRING_COLUMNS:
            np.asarray(self.blobs[c]).tofile(folder / f"{c}.bin")
            np.save(folder / f"{c}_offsets.npy", np.asarray(self.offsets[c]), allow_pickle=False)

    def __len__(self) -> int:
        return self.n

    def string(self, column: str, i: int) -> str:
        off = self.offsets[column]
        return bytes(self.blobs[column][int(off[i]) : int(off[i + 1])]).decode()

    def fingerprint(self, i: int, view: int) -> str:
        return bytes(self.arrays["fingerprint"][i, view]).hex()

    def record(self, i: int) -> dict:
        """Sample i's metadata as a dict, built on demand (never kept)."""
        a = self.arrays
        span = a["image_span"][i]
        return {"index": int(a["dataset_index"][i]), "key": self.string("key", i), "label": int(a["label"][i]),
                "source": self.string("source", i), "member": self.string("member", i) or None,
                "span": None if span[0] < 0 else (int(span[0]), int(span[1])),
                "views": np.asarray(a["views"][i]).tolist(),
                "fingerprints": [self.fingerprint(i, v) for v in range(a["fingerprint"].shape[1])]}
