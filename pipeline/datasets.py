"""Input-dataset readers: what images there are, with which labels, and their pixels.

Three kinds of dataset spec (a dict, as it appears in a job's YAML):

- ``{"kind": "imagefolder", "root": PATH, "split": "train"}``: the ImageNet layout
  ``PATH/<split>/<class>/<image>``; with no split, PATH itself holds the class folders. Classes are
  the sorted class-folder names and a label is a class's position, as torchvision and timm number
  ImageNet's synsets.
- ``{"kind": "webdataset", "urls": [tar paths, globs or {a..b} brace patterns]}``: tar shards with
  members ``<key>.jpg|.jpeg|.png|.webp`` and ``<key>.cls`` (an ASCII integer). The label is the
  ``.cls`` integer itself, never renumbered, because a teacher's head is indexed by it.
- ``{"kind": "demo", "root": PATH, "split": "train" | "val"}``: the embedded demo (below), built on
  first use, then read as an imagefolder.

A listing is a list of :class:`SampleRef` sorted by key, so a sample's index is the same on every
machine. Listing reads directory entries and tar headers only; pixels are decoded by
:func:`load_image`, one sample at a time, and a sample that cannot be decoded raises
:class:`BadImage` so a job can record it and go on. Tar members are never extracted to disk and
pickle-like members (.pyd, .pickle, .pkl, .pth, .pt) are never read at all.

The embedded demo is ten real photos that ship inside scikit-image and scikit-learn (no download):
one class per photo. Each photo is cut into a left part (the left 64 % of its width) for ``train``
and a right part (the right 32 %) for ``val``, with a 4 % band between them that neither uses, so no
val pixel, nor its immediate neighbour, is ever seen in training. From each part a fixed recipe
(a golden-ratio point sequence, three tile sizes shared by both parts, no random numbers) cuts
overlapping square tiles: 24 per class for train, 8 for val, saved as PNG of at most 256 px a side.
"""
from __future__ import annotations

import array
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DatasetError", "BadImage", "SampleRef", "Listing", "list_dataset", "load_image", "build_demo_dataset", "dataset_root",
           "listing_sha256", "relative_spec", "relocate_spec",
           "IMAGE_EXTENSIONS", "DEMO_PHOTOS", "DEMO_LABELS", "CLASS_INDEX"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Unpickling runs arbitrary code; these are never read, whatever they hold.
_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt")
# Image.open otherwise tries every plugin, EPS included, which runs Ghostscript on the bytes.
# (Multi-picture JPEGs, MPO, open through the JPEG plugin.)
_SAFE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
_SPEC_KEYS = {"imagefolder": {"kind", "root", "split"}, "webdataset": {"kind", "urls"},
              "demo": {"kind", "root", "split"}}


class DatasetError(ValueError):
    """The dataset as a whole is unusable; the message names the path and what was expected/found."""


class BadImage(Exception):
    """One sample cannot be decoded; str(e) is a short reason."""


@dataclass(frozen=True)
class SampleRef:
    """One sample: where its image lives and its label.

    key: ``<class>/<file stem>`` (imagefolder) or ``<tar stem>/<__key__>`` (webdataset).
    source: the image file, or the tar file holding it; member: the image's name inside the tar;
    span: (byte offset, size) of the member's data inside the tar, read with one seek.
    """

    index: int
    key: str
    label: int
    source: str
    member: str | None = None
    span: tuple[int, int] | None = None

    @classmethod
    def from_sample(cls, sample: dict) -> "SampleRef":
        """The reference inside a cached sample's record (CacheReader[i]), to reload its image for a replay."""
        span = sample.get("span")
        return cls(sample["index"], sample["key"], sample["label"], sample["source"], sample.get("member"),
                   tuple(span) if span else None)


class Listing(Sequence):
    """A dataset listing as columns: a sequence of SampleRef built on demand, never held.

    At ImageNet size a list of 1.28 M SampleRef objects costs ~450 bytes a sample (568 MB measured
    in the cache job's driver); here a sample is its key and file name in two byte blobs, an index
    into a short table of folders, a label and, for tar members, the member name and its span.
    ``listing[i]`` is a SampleRef, ``listing[a:b]`` a list of them; iteration yields them one by one.
    """

    def __init__(self, keys: list[str], labels, folders: list[str], folder_index, names: list[str],
                 members: list[str] | None = None, spans=None, order=None):
        """order: the positions of the values in listing order (default: as given)."""
        order = np.arange(len(keys)) if order is None else np.asarray(order)
        self.n = len(order)
        self.folders = list(folders)
        self.labels = np.asarray(labels, np.int64)[order]
        self.folder_index = np.asarray(folder_index, np.int32)[order]
        self._key, self._key_off = _blob(keys, order)
        self._name, self._name_off = _blob(names, order)
        self._member, self._member_off = _blob(members, order) if members is not None else (None, None)
        self.spans = None if spans is None else np.asarray(spans, np.int64).reshape(self.n, 2)[order]

    @classmethod
    def from_refs(cls, refs: list[SampleRef]) -> "Listing":
        folders: dict[str, int] = {}
        index, names = [], []
        for r in refs:
            folder, _, name = r.source.rpartition(os.sep)
            index.append(folders.setdefault(folder, len(folders)))
            names.append(name)
        tar = any(r.member is not None for r in refs)
        return cls([r.key for r in refs], [r.label for r in refs], list(folders), index, names,
                   [r.member or "" for r in refs] if tar else None,
                   [r.span or (-1, -1) for r in refs] if tar else None)

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return self._key[self._key_off[i] : self._key_off[i + 1]].decode()

    def _ref(self, i: int) -> SampleRef:
        name = self._name[self._name_off[i] : self._name_off[i + 1]].decode()
        source = f"{self.folders[self.folder_index[i]]}{os.sep}{name}"
        member = span = None
        if self._member is not None:
            member = self._member[self._member_off[i] : self._member_off[i + 1]].decode() or None
            span = None if self.spans[i, 0] < 0 else (int(self.spans[i, 0]), int(self.spans[i, 1]))
        return SampleRef(i, self.key(i), int(self.labels[i]), source, member, span)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._ref(j) for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} out of range: the listing holds {self.n}")
        return self._ref(i)

    def __iter__(self):
        return (self._ref(i) for i in range(self.n))


class _Packed:
    """Strings appended as UTF-8 bytes to one buffer: a list's interface (len, [i]) without the objects."""

    def __init__(self):
        self.blob, self.ends = bytearray(), array.array("q")

    def append(self, value: str) -> None:
        self.blob += value.encode()
        self.ends.append(len(self.blob))

    def __len__(self) -> int:
        return len(self.ends)

    def raw(self, i: int) -> bytes:
        return bytes(self.blob[self.ends[i - 1] if i else 0 : self.ends[i]])

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode()

    def sort_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(stable order of the strings, the strings as a fixed-width bytes array for comparisons)."""
        ends = np.frombuffer(self.ends, np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        lengths = ends - starts
        width = max(1, int(lengths.max()))
        buf = np.frombuffer(bytes(self.blob), np.uint8)
        fixed = np.zeros((len(ends), width), np.uint8)
        cols = np.arange(width)
        for a in range(0, len(ends), 1 << 16):  # in blocks: the index matrix stays small
            rows = slice(a, a + (1 << 16))
            mask = cols < lengths[rows, None]
            fixed[rows][mask] = buf[(starts[rows, None] + cols)[mask]]
        fixed = fixed.view(f"S{width}").ravel()
        return np.argsort(fixed, kind="stable"), fixed


def _blob(values, order=None) -> tuple[bytes, np.ndarray]:
    """values (in the given order) as one UTF-8 blob and n + 1 offsets, built without a second list."""
    order = range(len(values)) if order is None else order
    blob, offsets = bytearray(), np.zeros(len(order) + 1, np.int64)
    raw = values.raw if isinstance(values, _Packed) else (lambda i: values[i].encode())
    for j, i in enumerate(order):
        blob += raw(i)
        offsets[j + 1] = len(blob)
    return bytes(blob), offsets


def listing_sha256(refs: list[SampleRef]) -> str:
    """What the listing says (keys and labels, in order), independent of where the dataset lives."""
    h = hashlib.sha256()
    if isinstance(refs, Listing):  # its columns, not a SampleRef a sample
        for i in range(len(refs)):
            h.update(f"{chr(10) if i else ''}{refs.key(i)}\t{int(refs.labels[i])}".encode())
        return h.hexdigest()
    for i, r in enumerate(refs):
        h.update(f"{chr(10) if i else ''}{r.key}\t{r.label}".encode())
    return h.hexdigest()


def relative_spec(spec: dict, root: Path) -> dict:
    """The dataset spec with its paths relative to root ('.' for root itself), for relocate_spec."""
    if spec.get("kind") == "webdataset":
        urls = [spec["urls"]] if isinstance(spec["urls"], (str, os.PathLike)) else spec["urls"]
        return {"kind": "webdataset", "urls": [os.path.relpath(os.path.abspath(os.path.expanduser(str(u))), root)
                                               for u in urls]}
    return spec | {"root": "."}


def relocate_spec(relative: dict, data_root: str | Path) -> dict:
    """A relative_spec made absolute under data_root: the same dataset, moved."""
    data_root = Path(data_root)
    if relative.get("kind") == "webdataset":
        return {"kind": "webdataset", "urls": [str(data_root / u) for u in relative["urls"]]}
    return relative | {"root": str(data_root / relative["root"])}


def dataset_root(spec: dict, refs: list[SampleRef]) -> Path:
    """The folder a cache records its sources relative to: the imagefolder/demo root, or the folder
    holding a webdataset's tars (their common parent). A cache copied to another machine replays
    its views from ``--data-root`` joined with these relative sources."""
    if spec.get("kind") in ("imagefolder", "demo"):
        return Path(os.path.abspath(Path(spec["root"]).expanduser()))
    parents = sorted({os.path.dirname(r.source) for r in refs})
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


def list_dataset(spec: dict) -> tuple[list[SampleRef], list[str], list[dict]]:
    """-> (samples sorted by key with index = position, class names, skipped entries).

    A skipped entry is ``{"source": path, "reason": str}``, plus ``"key"`` and ``"member"`` for tar
    members.
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise DatasetError(f"dataset spec must be a mapping with a 'kind' (one of {sorted(_SPEC_KEYS)}), found {spec!r}")
    kind = spec["kind"]
    if kind not in _SPEC_KEYS:
        raise DatasetError(f"dataset kind {kind!r} is unknown; expected one of {sorted(_SPEC_KEYS)}")
    # A misspelt key ("spilt") would otherwise be ignored and list the wrong folder without a word.
    unknown = set(spec) - _SPEC_KEYS[kind]
    if unknown:
        raise DatasetError(f"{kind} dataset spec has unknown keys {sorted(unknown)}; expected only {sorted(_SPEC_KEYS[kind])}")
    if kind == "webdataset":
        if "urls" not in spec:
            raise DatasetError("webdataset dataset spec needs 'urls': a tar path, glob, or a list of them")
        return _list_webdataset(spec["urls"])
    if "root" not in spec:
        raise DatasetError(f"{kind} dataset spec needs 'root': the folder holding <split>/<class>/<image>")
    split = spec.get("split")
    if kind == "demo":
        split = "train" if split is None else split
        if split not in ("train", "val"):
            raise DatasetError(f"demo dataset split must be 'train' or 'val', found {split!r}")
        build_demo_dataset(spec["root"])
    # Absolute sources: Ray workers and DataLoader workers may run in another working directory.
    return _list_imagefolder(Path(os.path.abspath(Path(spec["root"]).expanduser())), split)


# ---------------------------------------------------------------------------------------------- imagefolder

def _list_imagefolder(root: Path, split: str | None):
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder "
                           f"(expected <root>/<split>/<class>/<image>)")
    top = root / split if split else root
    pattern = f"{root}/{split}/<class>/<image>" if split else f"{root}/<class>/<image>"
    if not top.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(f"dataset split folder {top} does not exist: expected {pattern} files, "
                           f"found folders {found} in {root}")
    real_root = root.resolve()
    skipped: list[dict] = []

    def escapes(entry: os.DirEntry) -> bool:
        # Symlinks that leave the dataset would let a listing read anything the job can read.
        # A directory entry carries its type: only a symlink costs a stat (1.28 M files list in
        # seconds, not the 2 stat calls a file that Path.is_dir/is_symlink make).
        if not entry.is_symlink():
            return False
        path = Path(entry.path)
        if not path.exists():
            skipped.append({"source": entry.path, "reason": "broken symlink"})
            return True
        target = path.resolve()
        if not target.is_relative_to(real_root):
            skipped.append({"source": entry.path, "reason": f"symlink points outside the dataset root ({target})"})
            return True
        return False

    def entries(folder: Path) -> list[os.DirEntry]:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)

    class_dirs = []
    for entry in entries(top):
        if escapes(entry):
            continue
        if entry.name.startswith("."):
            skipped.append({"source": entry.path, "reason": "hidden entry"})
        elif entry.is_dir():
            class_dirs.append(entry)
        else:
            skipped.append({"source": entry.path, "reason": f"file outside any class folder (expected {pattern})"})
    classes = [d.name for d in class_dirs]
    labels = _class_index(root, classes)

    # Columns, not objects: per sample a key and a file name packed as bytes as they are found (no
    # million str objects at once), its folder's index and a label.
    keys, names = _Packed(), _Packed()
    folder_index = array.array("i")
    label_of = array.array("q")
    for f, class_dir in enumerate(class_dirs):
        label = labels[class_dir.name]
        for entry in entries(Path(class_dir.path)):
            if escapes(entry):
                continue
            if entry.is_dir():
                skipped.append({"source": entry.path, "reason": f"folder inside a class folder (expected {pattern})"})
                continue
            name = entry.name
            if name.startswith("."):
                # e.g. macOS's ._photo.jpg companions, which look like images and are not
                skipped.append({"source": entry.path, "reason": "hidden file"})
                continue
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext not in IMAGE_EXTENSIONS:
                why = f"extension {ext}" if ext else "no extension"
                skipped.append({"source": entry.path, "reason": f"not an image file ({why})"})
                continue
            keys.append(f"{class_dir.name}/{stem}")
            names.append(name)
            folder_index.append(f)
            label_of.append(label)

    if not len(keys):
        found = f"{len(classes)} class folders and no image files" if classes else "no class folders"
        raise DatasetError(f"dataset {top} is empty: expected {pattern} files, found {found}")
    # By key, as every machine sorts it: UTF-8 bytes sort as the strings' code points do.
    order, fixed = keys.sort_order()
    same = np.flatnonzero(fixed[order[:-1]] == fixed[order[1:]])
    if len(same):  # one stem, two extensions (cat.jpg and cat.png)
        a, b = order[same[0]], order[same[0] + 1]
        raise DatasetError(f"duplicate sample key {keys[a]!r} in {top}: "
                           f"{class_dirs[folder_index[a]].path}{os.sep}{names[a]} and "
                           f"{class_dirs[folder_index[b]].path}{os.sep}{names[b]}")
    del fixed
    listing = Listing(keys, label_of, [d.path for d in class_dirs], folder_index, names, order=order)
    return listing, classes, skipped


CLASS_INDEX = "class_index.json"


def _class_index(root: Path, classes: list[str]) -> dict[str, int]:
    """class folder → label. By default the folder's position in sorted order (torchvision's rule);
    a ``class_index.json`` ({folder: label}) at the dataset root pins labels instead, e.g. to keep
    ImageNet's indices for a subset of its classes so that they match the teacher's head, or to
    number every split alike when one split lacks a class."""
    path = root / CLASS_INDEX
    if not path.is_file():
        return {c: i for i, c in enumerate(classes)}
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(index, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in index.values()):
        raise DatasetError(f"{path} must map class folder names to non-negative integer labels")
    missing = [c for c in classes if c not in index]
    if missing:
        raise DatasetError(f"{path} gives no label for class folder(s) {missing[:5]}")
    return {c: index[c] for c in classes}


# ---------------------------------------------------------------------------------------------- webdataset

def _expand_urls(urls) -> list[str]:
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    try:
        from braceexpand import braceexpand  # webdataset's own dependency, for shard-{000..009}.tar
    except ImportError:  # pragma: no cover - braceexpand ships with webdataset
        braceexpand = lambda s: [s]  # noqa: E731
    paths = []
    for url in urls:
        url = str(url)
        if "://" in url or url.startswith("pipe:"):
            raise DatasetError(f"webdataset url {url!r} is not a local path; only local tar files are read")
        for pattern in braceexpand(url):
            pattern = os.path.expanduser(pattern)
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise DatasetError(f"webdataset pattern {pattern} matches no files (expected .tar shards)")
                paths.extend(os.path.abspath(m) for m in matches)
            elif not os.path.isfile(pattern):
                raise DatasetError(f"webdataset shard {pattern} does not exist (expected a .tar file)")
            else:
                paths.append(os.path.abspath(pattern))
    if not paths:
        raise DatasetError(f"webdataset urls {urls!r} name no tar files")
    return paths


def _tar_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".bz2", ".xz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key runs to the first dot of the file's base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _list_webdataset(urls):
    skipped: list[dict] = []
    images: dict[str, tuple[str, str, int, int]] = {}  # key -> (tar, member, data offset, size)
    labels: dict[str, int] = {}
    others: list[tuple[str, str, str, str]] = []  # members neither image nor label: (key, tar, member, ext)
    for tar_path in _expand_urls(urls):
        prefix = _tar_stem(tar_path)
        try:
            fd = os.open(tar_path, os.O_RDONLY)
        except OSError as e:
            raise DatasetError(f"webdataset shard {tar_path} is not a readable tar file: {e}") from None
        try:
            for name, kind, offset, size in tar_members(tar_path, fd):
                if kind == "dir":
                    continue  # tar's own folder entries carry no sample
                if name.startswith("/") or ".." in name.split("/"):
                    skipped.append({"source": tar_path, "member": name, "reason": "unsafe tar member name"})
                    continue
                local_key, ext = _split_member(name.removeprefix("./"))
                key = f"{prefix}/{local_key}"
                entry = {"key": key, "source": tar_path, "member": name}
                if kind != "file":
                    skipped.append(entry | {"reason": "not a regular file (link or device)"})
                elif ext in _PICKLE_EXTENSIONS:
                    skipped.append(entry | {"reason": f"pickle entries are never read (.{ext})"})
                elif ext == "cls":
                    label = _read_cls(fd, offset, size)
                    if isinstance(label, str):
                        skipped.append(entry | {"reason": label})
                    elif key in labels:
                        raise DatasetError(f"duplicate label for sample key {key!r} in {tar_path}: member {name}")
                    else:
                        labels[key] = label
                elif ext in _TAR_IMAGE_EXTENSIONS:
                    if key in images:
                        first = images[key]
                        raise DatasetError(f"duplicate sample key {key!r}: {first[0]}:{first[1]} and {tar_path}:{name}")
                    images[key] = (tar_path, name, offset, size)
                else:
                    others.append((key, tar_path, name, ext))
        finally:
            os.close(fd)

    # A side member of a sample (timm's and HF's .json / .txt captions and metadata) belongs to it and
    # is simply not read; only a member of no sample at all is a skip worth recording.
    for key, tar_path, name, ext in others:
        if key not in images:
            skipped.append({"key": key, "source": tar_path, "member": name,
                            "reason": f"not an image or .cls entry (.{ext or 'no extension'})"})
    samples = []
    for key in sorted(images):
        tar_path, member, offset, size = images[key]
        if key not in labels:
            skipped.append({"key": key, "source": tar_path, "member": member, "reason": "image without a valid .cls label"})
            continue
        samples.append(SampleRef(len(samples), key, labels[key], tar_path, member, (offset, size)))
    for key in sorted(set(labels) - set(images)):
        skipped.append({"key": key, "source": "", "reason": ".cls label without an image"})
    if not samples:
        raise DatasetError(f"webdataset {urls!r} holds no samples: expected <key>.jpg|.jpeg|.png|.webp with "
                           f"<key>.cls members, found {len(images)} images and {len(labels)} labels")
    classes = [str(c) for c in sorted({s.label for s in samples})]
    return Listing.from_refs(samples), classes, skipped


def _read_cls(fd: int, offset: int, size: int) -> int | str:
    """The label of a .cls entry of `size` bytes at `offset`, or a reason it is unusable."""
    if size > 32:
        return f".cls entry is {size} bytes; expected a short ASCII integer"
    raw = os.pread(fd, size, offset)
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return f".cls entry is not an integer: {raw[:32]!r}"
    return label if label >= 0 else f".cls entry is negative: {label}"


class _NeedsTarfile(Exception):
    """An archive the header scan leaves to tarfile: global or charset pax headers, GNU sparse or
    multi-volume members, base-256 numbers, signed checksums, a first block that is no tar header."""


_ZERO_BLOCK = bytes(512)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_MEMBER_KIND = {b"0": "file", b"\x00": "file", b"7": "file", b"5": "dir", b"1": "other", b"2": "other",
                b"3": "other", b"4": "other", b"6": "other"}


def tar_members(tar_path: str, fd: int | None = None) -> list[tuple[str, str, int, int]]:
    """(name, kind, data offset, size) of each member of an uncompressed tar, kind 'file' (tarfile's
    isfile), 'dir' or 'other' (links, devices, fifos), as tarfile lists them.

    The headers are read directly, through a 16 KiB window (_Blocks). tarfile builds a TarInfo per
    header and parses each pax header with a regular expression: 60 µs a member of a webdataset tar
    (three members and three pax headers a sample), 3.8 M members at ImageNet size; the scan takes a
    third of that (measured: bench/tar_listing.py). Archives with rarer features are listed by tarfile
    itself. A cut or damaged header after the first is an error naming its byte (tarfile ends the
    listing at a damaged one silently). Compressed tars are refused: images are read by offset (one
    pread each), which needs the tar uncompressed."""
    own = fd is None
    try:
        fd = os.open(tar_path, os.O_RDONLY) if own else fd
    except OSError as e:
        raise DatasetError(f"webdataset shard {tar_path} is not a readable tar file: {e}") from None
    try:
        head = os.pread(fd, 512, 0)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic) and not _checksum_holds(head):  # a member's name may begin as a magic does
                raise DatasetError(f"webdataset shard {tar_path} is {kind}-compressed; images are read from the tar by "
                                   f"offset, so decompress it first (the shard's members stay as they are)")
        try:
            return _scan_headers(fd, tar_path)
        except _NeedsTarfile:
            pass
    finally:
        if own:
            os.close(fd)
    try:
        with tarfile.open(tar_path, "r:") as tar:
            return [(i.name, "dir" if i.isdir() else "file" if i.isfile() else "other", i.offset_data, i.size)
                    for i in tar]
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"webdataset shard {tar_path} is not a readable tar file: {e}") from None


def _checksum_holds(block: bytes) -> bool:
    """The header's unsigned checksum (its own field counted as spaces), as tar writes it."""
    try:
        return len(block) == 512 and _octal(block[148:156]) == 256 + sum(block) - sum(block[148:156])
    except _NeedsTarfile:
        return False


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise _NeedsTarfile("base-256 number")
    field = field.split(b"\x00", 1)[0].strip(b" ")
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise _NeedsTarfile("not an octal number") from None


def _text(field: bytes) -> str:
    try:
        return field.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _NeedsTarfile("a name that is not UTF-8") from None


def _pax(payload: bytes) -> dict[str, str]:
    """A pax extended header's records, 'length key=value\\n' each."""
    out, at = {}, 0
    try:
        while at < len(payload) and payload[at:at + 1] != b"\x00":
            space = payload.index(b" ", at)
            n = int(payload[at:space])
            key, eq, value = payload[space + 1:at + n - 1].partition(b"=")
            if not eq or n <= 0:
                raise ValueError
            out[key.decode("utf-8")] = value.decode("utf-8")
            at += n
    except (ValueError, UnicodeDecodeError):
        raise _NeedsTarfile("a pax record it cannot parse") from None
    if "hdrcharset" in out or any(k.startswith("GNU.sparse") for k in out):
        raise _NeedsTarfile("pax charset or sparse records")
    return out


class _Blocks:
    """Reads of a file through a 16 KiB window: a webdataset sample's pax headers, small members and
    the next headers lie within a few blocks, read with one pread."""

    def __init__(self, fd: int):
        self.fd, self.start, self.buf = fd, 0, b""

    def read(self, at: int, n: int) -> bytes:
        if not (self.start <= at and at + n <= self.start + len(self.buf)):
            self.start, self.buf = at, os.pread(self.fd, max(n, 16384), at)
        return self.buf[at - self.start:at - self.start + n]


def _scan_headers(fd: int, tar_path: str) -> list[tuple[str, str, int, int]]:
    """tarfile's listing rules (Python 3.11: TarInfo.frombuf, _proc_pax, _proc_gnulong, TarFile.next)."""
    members, at, pending, blocks, end = [], 0, [], _Blocks(fd), os.fstat(fd).st_size
    while True:
        if at > end:  # the previous member's padded data runs past the end of the file
            last = members[-1][0] if members else "a pax or long-name header"
            raise DatasetError(f"webdataset shard {tar_path} is cut short: {last!r} needs bytes up to {at}, the "
                               f"file has {end}; restore the shard from its source")
        block = blocks.read(at, 512)
        if len(block) < 512 or block == _ZERO_BLOCK:  # the end (tarfile stops at a zero block or a cut header)
            if at == 0 or pending:
                raise _NeedsTarfile("an empty first header, or a pax or long-name header with no member")
            return members
        if not _checksum_holds(block):
            if at == 0:
                raise _NeedsTarfile("not a tar header, or a signed checksum")  # tarfile says which
            try:
                signed = memoryview(block).cast("b")
                signed_holds = _octal(block[148:156]) == 256 + sum(signed[:148]) + sum(signed[156:])
            except _NeedsTarfile:
                signed_holds = False
            if signed_holds:
                raise _NeedsTarfile("a signed checksum")
            # tarfile would end the listing here without a word, dropping every later member
            raise DatasetError(f"webdataset shard {tar_path} is damaged: the header at byte {at} fails its checksum "
                               f"(after {len(members)} members), so the members after it cannot be listed; restore "
                               f"the shard from its source")
        kind, size, data = block[156:157], _octal(block[124:136]), at + 512
        if kind in (b"x", b"L", b"K"):  # pax records, a GNU long name, a GNU long link name: for the next member
            payload = blocks.read(data, size)
            pending.append((kind, _pax(payload) if kind == b"x" else _text(payload)))
            at = data + -(-size // 512) * 512
            continue
        if kind not in _MEMBER_KIND:
            raise _NeedsTarfile(f"member type {kind!r}")
        name, prefix, kind = _text(block[:100]), _text(block[345:500]), _MEMBER_KIND[kind]
        if kind == "file" and block[156:157] == b"\x00" and name.endswith("/"):
            kind = "dir"  # old V7 tars mark a folder by its name alone
        if kind == "dir":
            name = name.rstrip("/")
        if prefix:  # a ustar name split in two (tarfile joins them for every non-GNU type)
            name = f"{prefix}/{name}"
        for header, value in reversed(pending):  # the header nearest the member first; the earliest has the last word
            if header == b"L":
                name = value
            elif header == b"x":
                name = value["path"].rstrip("/") if "path" in value else name
                try:
                    size = int(value.get("size", size))
                except ValueError:
                    size = 0  # as tarfile reads a pax number it cannot parse
            if header in (b"L", b"K") and kind == "dir":
                name = name.removesuffix("/")
        members.append((name, kind, data, size))
        # tarfile skips data after regular members only: the other types' sizes are not data
        at = data + (-(-size // 512) * 512 if kind == "file" else 0)
        pending = []


# ---------------------------------------------------------------------------------------------- pixels

class _OpenTars:
    """A few open tar files per process, with a name -> member table each.

    TarFile.getmember scans every header on each call; the table makes a read O(1). A forked worker
    must not share its parent's file offsets, so the cache starts empty in every new process, and a
    lock keeps threads from interleaving seek and read on one file.
    """

    def __init__(self, limit: int = 16):
        self.limit, self.pid, self.lock, self.open = limit, os.getpid(), threading.Lock(), {}

    def read(self, path: str, member: str) -> bytes:
        with self.lock:
            if self.pid != os.getpid():
                self.pid, self.open = os.getpid(), {}
            if path not in self.open:
                if len(self.open) >= self.limit:
                    self.open.pop(next(iter(self.open)))[0].close()
                tar = tarfile.open(path, "r:*")
                self.open[path] = (tar, {m.name: m for m in tar.getmembers()})
            tar, members = self.open[path]
            if member not in members:
                raise BadImage(f"member {member} not found in {path}")
            return tar.extractfile(members[member]).read()


_TARS = _OpenTars()


class _OpenFiles:
    """A bounded LRU of open files per process, read with pread: one read per image and no tar
    header parsed (the listing recorded each member's offset and size)."""

    def __init__(self, limit: int = 64):
        self.limit, self.pid, self.lock, self.open = limit, os.getpid(), threading.Lock(), {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: its own table (the descriptors stay valid)
                self.pid, self.open = os.getpid(), {}
            fd = self.open.pop(path, None)
            if fd is None:
                if len(self.open) >= self.limit:
                    os.close(self.open.pop(next(iter(self.open))))
                fd = os.open(path, os.O_RDONLY)
            self.open[path] = fd  # most recently used last
            data = os.pread(fd, size, offset)  # under the lock: an evicted descriptor is never read
        if len(data) != size:
            raise OSError(f"{path}: {len(data)} of {size} bytes at offset {offset} (truncated tar?)")
        return data


_FILES = _OpenFiles()


def load_image(ref: SampleRef) -> Image.Image:
    """The sample's pixels, always mode "RGB", EXIF orientation applied; BadImage if undecodable."""
    try:
        if ref.member is None:
            data = Path(ref.source).read_bytes()
        elif ref.span is not None:
            data = _FILES.read(ref.source, *ref.span)
        else:
            data = _TARS.read(ref.source, ref.member)
    except (OSError, tarfile.TarError) as e:
        raise BadImage(f"cannot read: {e}") from None
    if not data:
        raise BadImage("empty file")
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bad sample either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        try:
            image = Image.open(io.BytesIO(data), formats=_SAFE_FORMATS)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"image too large: {e}") from None
        except Image.UnidentifiedImageError:
            raise BadImage(f"cannot decode image: not a {', '.join(_SAFE_FORMATS)} file") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad bytes
            raise BadImage(f"cannot decode image: {e}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16"):
        # 16-bit photos span 0..65535; /257 maps that range exactly onto 0..255 (65535 -> 255).
        a = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    elif mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        a = np.where(np.isfinite(a), a, 0.0)
        lo, hi = float(a.min()), float(a.max())
        if mode == "I" and lo >= 0 and hi <= 65535:
            a = a / 257.0  # a 16-bit image PIL widened to 32 bits: keep its own scale, no stretching
        elif mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0  # float images in 0..1
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    # Alpha is dropped, not composited: convert("RGB") is what timm's and torchvision's loaders do,
    # so a cached view holds the same pixels an online pipeline would feed the teacher.
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------- demo

def _demo_photos() -> dict:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name) for name in
              ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")}
    photos["motorcycle"] = lambda: skimage.data.stereo_motorcycle()[0]
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[Path(path).stem] = lambda image=image: image  # china, flower
    return photos


DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "motorcycle", "china", "flower")
# The demo's labels are ImageNet indices, so that the task and the teacher's logits speak of the same
# classes: each is the demo teacher's (ImageNet EfficientNet-Lite0) top-1 class on the WHOLE photo,
# measured once (224 px bicubic, mean = std = 0.5). E.g. coffee → 967 espresso, chelsea → 285
# Egyptian cat, motorcycle → 665 moped. The task: name the photo's class from an unseen tile of it.
DEMO_LABELS = {"astronaut": 450, "coffee": 967, "chelsea": 285, "rocket": 540, "hubble_deep_field": 971,
               "immunohistochemistry": 109, "retina": 619, "motorcycle": 665, "china": 442, "flower": 985}
_DEMO_VERSION = 2
_DEMO_PARTS = {"train": (0.0, 0.64, 24), "val": (0.68, 1.0, 8)}  # (left, right) as fractions of width, tiles
# Tile sides as fractions of the val part's shorter side, for both parts: train and val tiles then
# come from the same range of sizes, and the largest still fits in the narrow val part.
_DEMO_SCALES = (0.9, 0.7, 0.5)
_DEMO_MAX_SIDE = 256


def _tile_boxes(width: int, height: int, part: str) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) pixel boxes of one part's tiles, all inside that part."""
    lo, hi, count = _DEMO_PARTS[part]
    x0, x1 = round(lo * width), round(hi * width)
    w = x1 - x0
    val_lo, val_hi, _ = _DEMO_PARTS["val"]
    reference = min(round(val_hi * width) - round(val_lo * width), height)
    boxes = []
    for i in range(count):
        side = max(1, round(_DEMO_SCALES[i % len(_DEMO_SCALES)] * reference))
        # The R2 sequence spreads points evenly in a square, with no random numbers to drift between versions.
        u = (0.5 + (i + 1) * 0.7548776662466927) % 1.0
        v = (0.5 + (i + 1) * 0.5698402909980532) % 1.0
        left, top = x0 + round(u * (w - side)), round(v * (height - side))
        boxes.append((left, top, left + side, top + side))
    return boxes


def build_demo_dataset(root: str | Path) -> Path:
    """Build the embedded demo at root/{train,val}/<photo>/<photo>_<i>.png unless it is there. -> root."""
    root = Path(root).expanduser()
    if _demo_complete(root):
        return root
    if root.exists() and not (root.is_dir() and not any(root.iterdir())) and not (root / ".complete").exists():
        raise DatasetError(f"demo root {root} exists and is not a demo dataset (no .complete marker); "
                           f"expected a missing or empty folder")
    foreign = _demo_foreign(root) if (root / ".complete").exists() else []
    if foreign:  # an older demo is replaced whole: only when it holds nothing but what its build wrote
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DatasetError(f"demo root {root} holds an older demo dataset and {foreign[0]!r}{more}, which its build "
                           f"did not write; the older demo is replaced whole, so nothing was changed: move it out")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    # Built beside root and renamed into place: a killed build leaves no half dataset under root.
    work = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    counts = {}
    photos = _demo_photos()
    for name in DEMO_PHOTOS:
        pixels = np.asarray(photos[name]())[..., :3]
        height, width = pixels.shape[:2]
        for part in _DEMO_PARTS:
            folder = work / part / name
            folder.mkdir(parents=True)
            boxes = _tile_boxes(width, height, part)
            for i, (l, t, r, b) in enumerate(boxes):
                tile = Image.fromarray(np.ascontiguousarray(pixels[t:b, l:r]))
                if tile.width > _DEMO_MAX_SIDE:
                    tile = tile.resize((_DEMO_MAX_SIDE, _DEMO_MAX_SIDE), Image.BICUBIC)
                tile.save(folder / f"{name}_{i}.png")
            counts[f"{part}/{name}"] = len(boxes)
    (work / CLASS_INDEX).write_text(json.dumps(DEMO_LABELS, indent=1))
    marker = {"version": _DEMO_VERSION, "photos": list(DEMO_PHOTOS), "tiles": counts}
    (work / ".complete").write_text(json.dumps(marker, indent=1))  # written last: its presence means complete
    stale = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        if (root / ".complete").exists():
            root.rename(stale)  # an older version of the demo
        else:
            root.rmdir()  # empty, checked above
    try:
        work.rename(root)
    except OSError:
        # Another process finished first; its dataset is as good as ours.
        shutil.rmtree(work, ignore_errors=True)
        if not _demo_complete(root):
            raise
    shutil.rmtree(stale, ignore_errors=True)
    return root


def _demo_foreign(root: Path) -> list[str]:
    """Files (relative, sorted) under a finished demo root that its build did not write: anything but its
    marker, class index and the tiles its marker counts (any tile of a demo photo when the marker is unreadable)."""
    from .output_guard import unknown_files

    try:
        tiles = json.loads((root / ".complete").read_text())["tiles"]
        ours = {f"{key}/{key.split('/')[-1]}_{i}.png" for key, n in tiles.items() for i in range(n)}
        is_tile = ours.__contains__
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        tile = re.compile(r"^(?:train|val)/([A-Za-z_]+)/\1_\d+\.png$")
        is_tile = lambda rel: tile.match(rel) is not None  # noqa: E731
    return unknown_files(root, lambda rel: rel in (".complete", CLASS_INDEX) or is_tile(rel))


def _demo_complete(root: Path) -> bool:
    try:
        return json.loads((root / ".complete").read_text()).get("version") == _DEMO_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_builds(root: Path) -> None:
    for path in root.parent.glob(f".{root.name}.building-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
