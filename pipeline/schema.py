"""The cache schema: ONE definition of what is stored, used by both stores (zarr and webdataset).

A cache is a folder:
    manifest.json            everything a reader needs, without this project's code
    index/                   the columnar sample index of the whole cache (pipeline.sample_index), written
                             when the cache is complete
    shard-00000/ ...         committed shards (a shard folder appears only by an atomic rename)
        shard.json           the shard's range, sample count, skipped inputs, file sizes and checksums
        index/               the shard's columnar sample index: keys, labels, sources, views, fingerprints
        <store files>        zarr: a v3 group, one sharded array per field;
                             webdataset: v0.tar … v{K-1}.tar, one tar per view index, and entries.npy

Roles and what is stored for each (per view):
    final   F^t, (N, C) tokens. φ(F^t) is NOT stored: F = φ(F) + DC with DC the per-channel token
            mean, so the reader derives φ(F) = F − mean(F) exactly on read (nothing stored twice).
    mid     early's output = late's input, (L, C_mid) tokens (ViTs: prefix tokens first).
    logits  (classes,).

Codecs (per role):
    fp32    float32 + zstd: lossless.
    fp16    float16 + zstd: lossless from fp16 (the default).
    int8    per-channel symmetric int8: scale = max |x| / 127 over tokens (float32). Zeros stay
            exact, so sparse post-ReLU maps keep their zeros (best measured on the demo's CNN features).
    int8dc  the DC-split int8 form: DC = per-channel token mean (float32, exact) and the DC-removed
            part quantised per channel to int8 with scale max |x − DC| / 127. For dense maps with a
            dominant DC component (ViT features, the poster's Figure 2) the step size follows φ(F)'s
            range instead of |F|'s, so φ(F) keeps its precision.
    numcodecs has no per-channel int8 codec (its Quantize/FixedScaleOffset use one scale per
    chunk), hence our own few lines. Every lossy codec's error on F and on φ(F) is measured in
    bench/storage.py and shown in docs/storage.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["ROLES", "CODECS", "RoleSpec", "encode", "decode", "shard_name", "SHARD_PREFIX", "write_json_atomic",
           "MANIFEST", "SHARD_META", "ManifestError", "read_manifest", "file_sha256"]

ROLES = ("final", "mid", "logits")
CODECS = ("fp32", "fp16", "int8", "int8dc")
SHARD_PREFIX = "shard-"
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
SCHEMA_VERSION = 2  # 2: columnar sample index (index/), relative sources, webdataset entries.npy


class ManifestError(ValueError):
    """A cache folder whose manifest is missing, unreadable or inconsistent."""


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"


@dataclass(frozen=True)
class RoleSpec:
    """One stored role: its per-view shape (float32 when decoded) and its codec."""

    name: str
    shape: tuple[int, ...]
    codec: str = "fp16"

    def __post_init__(self):
        if self.name not in ROLES:
            raise ValueError(f"unknown role {self.name!r}; expected one of {list(ROLES)}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r} for role {self.name!r}; expected one of {list(CODECS)}")

    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """field name → (per-view shape, dtype) as stored."""
        if self.codec in ("fp32", "fp16"):
            return {self.name: (self.shape, "float32" if self.codec == "fp32" else "float16")}
        stat = (1, self.shape[-1]) if len(self.shape) == 2 else (1,)
        out = {f"{self.name}_q": (self.shape, "int8"), f"{self.name}_scale": (stat, "float32")}
        if self.codec == "int8dc":
            out[f"{self.name}_dc"] = (stat, "float32")
        return out

    def to_dict(self) -> dict:
        return asdict(self) | {"fields": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.fields().items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "RoleSpec":
        return cls(d["name"], tuple(d["shape"]), d["codec"])


def _stat_axis(spec: RoleSpec) -> int:
    # per channel over tokens for (N, C); over the whole vector for logits
    return -2 if len(spec.shape) == 2 else -1


def encode(spec: RoleSpec, x: np.ndarray) -> dict[str, np.ndarray]:
    """x: float32 (..., *spec.shape) → {field: array (..., *field_shape)}."""
    x = np.asarray(x, dtype=np.float32)
    if tuple(x.shape[x.ndim - len(spec.shape):]) != spec.shape:
        raise ValueError(f"role {spec.name}: expected trailing shape {spec.shape}, found {x.shape}")
    if spec.codec == "fp32":
        return {spec.name: np.ascontiguousarray(x)}
    if spec.codec == "fp16":
        return {spec.name: x.astype(np.float16)}
    axis, n = _stat_axis(spec), spec.name
    out = {}
    if spec.codec == "int8dc":
        out[f"{n}_dc"] = x.mean(axis=axis, keepdims=True, dtype=np.float64).astype(np.float32)
        x = x - out[f"{n}_dc"]
    scale = (np.abs(x).max(axis=axis, keepdims=True) / 127.0).astype(np.float32)
    out[f"{n}_q"] = np.clip(np.rint(x / np.where(scale > 0, scale, 1.0)), -127, 127).astype(np.int8)
    out[f"{n}_scale"] = scale
    return out


def decode(spec: RoleSpec, fields: dict[str, np.ndarray], dtype=np.float32) -> np.ndarray:
    """{field: array} → float32 (..., *spec.shape). dtype None: an fp16 or fp32 role as stored (exact: the
    float32 of an fp16 value is exact, so a consumer may convert later, e.g. on its GPU), others float32."""
    if spec.codec in ("fp32", "fp16"):
        a = fields[spec.name]
        if dtype is None:
            return a if a.flags.writeable else a.copy()
        return np.array(a, dtype=dtype)  # a writable copy
    n = spec.name
    x = fields[f"{n}_q"].astype(np.float32) * fields[f"{n}_scale"]
    if spec.codec == "int8dc":
        # Rounding errors need not average to zero over the tokens: re-centre, so that the decoded
        # per-channel mean IS the stored DC and only φ(F) carries the quantisation error.
        x = x - x.mean(axis=_stat_axis(spec), keepdims=True) + fields[f"{n}_dc"]
    return x


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON under a temporary name, fsync, rename: a reader sees the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a cache folder, checked for the keys every reader relies on."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not a teacher cache: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: expected a JSON object (the manifest), found a JSON {type(m).__name__}")
    for key in ("format", "schema_version", "teacher", "views", "roles", "shards", "num_samples", "num_views"):
        if key not in m:
            raise ManifestError(f"{path}: missing key {key!r}")
    if m["schema_version"] != SCHEMA_VERSION:
        how = (" (an older cache: its per-sample metadata is not in the columnar index this version reads); rebuild "
               "it with this version: scalekd-pipeline cache-teacher JOB.yaml --overwrite") if m["schema_version"] == 1 else ""
        raise ManifestError(f"{path}: schema_version {m['schema_version']} is not the supported {SCHEMA_VERSION}{how}")
    if m["format"] not in ("zarr", "webdataset"):
        raise ManifestError(f"{path}: format {m['format']!r} is neither 'zarr' nor 'webdataset'")
    for name, role in m["roles"].items():
        try:
            spec = RoleSpec.from_dict(role)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: role {name!r} is malformed: {e}") from None
        declared = {k: (tuple(v["shape"]), v["dtype"]) for k, v in role.get("fields", {}).items()}
        if declared != spec.fields():
            raise ManifestError(f"{path}: role {name!r} declares fields {declared}, but shape {spec.shape} with codec "
                                f"{spec.codec!r} stores {spec.fields()}")
    return m


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
