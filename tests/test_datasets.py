"""Dataset readers: listings, skipped entries, decoding, and the embedded demo."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import datasets
from pipeline.datasets import BadImage, DatasetError, SampleRef, build_demo_dataset, list_dataset, load_image


def _png(color=(10, 20, 30), size=(6, 4), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(color=(200, 40, 10), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ref(path) -> SampleRef:
    return SampleRef(0, "x/y", 0, str(path))


def _tar(path, members: dict[str, bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------- imagefolder

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imnet"
    _write(root / "train" / "zebra" / "z2.png", _png((1, 2, 3)))
    _write(root / "train" / "zebra" / "z1.JPG", _jpeg())
    _write(root / "train" / "apple" / "a1.png", _png((4, 5, 6)))
    _write(root / "train" / "apple" / "notes.txt", b"hello")
    _write(root / "train" / "apple" / "README", b"hello")
    _write(root / "train" / "apple" / "._a1.png", b"\x00\x05\x16\x07")
    _write(root / "train" / "stray.png", _png())
    _write(root / "val" / "apple" / "v1.png", _png())
    _write(root / "val" / "zebra" / "v2.png", _png())
    return root


def test_imagefolder_lists_sorted_keys_labels_and_indices(folder):
    samples, classes, _ = list_dataset({"kind": "imagefolder", "root": str(folder), "split": "train"})
    assert classes == ["apple", "zebra"]
    assert [s.key for s in samples] == ["apple/a1", "zebra/z1", "zebra/z2"]
    assert [s.index for s in samples] == [0, 1, 2]
    assert [s.label for s in samples] == [0, 1, 1]
    assert samples[1].source == str(folder / "train" / "zebra" / "z1.JPG")  # extension match ignores case
    assert all(s.member is None for s in samples)


def test_imagefolder_records_skipped_files_with_reasons(folder):
    _, _, skipped = list_dataset({"kind": "imagefolder", "root": str(folder), "split": "train"})
    reasons = {os.path.basename(s["source"]): s["reason"] for s in skipped}
    assert reasons["notes.txt"] == "not an image file (extension .txt)"
    assert reasons["README"] == "not an image file (no extension)"
    assert reasons["._a1.png"] == "hidden file"
    assert reasons["stray.png"] == f"file outside any class folder (expected {folder}/train/<class>/<image>)"
    assert len(skipped) == 4


def test_imagefolder_split_selects_folder_and_none_means_root(folder, tmp_path):
    val, classes, _ = list_dataset({"kind": "imagefolder", "root": str(folder), "split": "val"})
    assert [(s.key, s.label) for s in val] == [("apple/v1", 0), ("zebra/v2", 1)]
    flat, classes, _ = list_dataset({"kind": "imagefolder", "root": str(folder / "val")})
    assert [s.key for s in flat] == ["apple/v1", "zebra/v2"] and classes == ["apple", "zebra"]


def test_imagefolder_missing_and_empty_datasets_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        list_dataset({"kind": "imagefolder", "root": str(missing), "split": "train"})
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders") as e:
        list_dataset({"kind": "imagefolder", "root": str(tmp_path / "d"), "split": "train"})
    assert f"dataset {tmp_path / 'd' / 'train'} is empty" in str(e.value)
    _write(tmp_path / "d" / "train" / "cat" / "x.txt", b"")
    with pytest.raises(DatasetError, match="1 class folders and no image files"):
        list_dataset({"kind": "imagefolder", "root": str(tmp_path / "d"), "split": "train"})
    with pytest.raises(DatasetError, match=f"{tmp_path / 'd' / 'val'} does not exist"):
        list_dataset({"kind": "imagefolder", "root": str(tmp_path / "d"), "split": "val"})


def test_spec_typos_and_duplicate_stems_are_errors(folder):
    with pytest.raises(DatasetError, match=r"unknown keys \['spilt'\]"):
        list_dataset({"kind": "imagefolder", "root": str(folder), "spilt": "val"})
    with pytest.raises(DatasetError, match="kind 'lmdb' is unknown"):
        list_dataset({"kind": "lmdb", "root": str(folder)})
    _write(folder / "val" / "apple" / "v1.jpg", _jpeg())
    with pytest.raises(DatasetError, match="duplicate sample key 'apple/v1'"):
        list_dataset({"kind": "imagefolder", "root": str(folder), "split": "val"})


def test_imagefolder_skips_symlinks_leaving_the_root(folder, tmp_path):
    outside = _write(tmp_path / "secret" / "s.png", _png())
    os.symlink(outside, folder / "val" / "apple" / "link.png")
    os.symlink(tmp_path / "secret", folder / "val" / "escape")
    os.symlink(folder / "val" / "zebra" / "v2.png", folder / "val" / "apple" / "inside.png")
    samples, classes, skipped = list_dataset({"kind": "imagefolder", "root": str(folder), "split": "val"})
    assert classes == ["apple", "zebra"]
    assert [s.key for s in samples] == ["apple/inside", "apple/v1", "zebra/v2"]
    escaped = sorted(os.path.basename(s["source"]) for s in skipped if "outside the dataset root" in s["reason"])
    assert escaped == ["escape", "link.png"]


# ------------------------------------------------------------------------------------------- webdataset

class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_webdataset_lists_labels_and_reads_members(tmp_path):
    png = _png((7, 8, 9))
    shard = _tar(tmp_path / "shard-000.tar", {"a.jpg": _jpeg(), "a.cls": b"3", "b.png": png, "b.cls": b" 11\n"})
    samples, classes, skipped = list_dataset({"kind": "webdataset", "urls": str(shard)})
    assert [(s.index, s.key, s.label, s.member) for s in samples] == [
        (0, "shard-000/a", 3, "a.jpg"), (1, "shard-000/b", 11, "b.png")]
    assert classes == ["3", "11"] and skipped == []
    assert all(s.source == str(shard) for s in samples)
    assert np.array(load_image(samples[1]))[0, 0].tolist() == [7, 8, 9]
    assert load_image(samples[0]).mode == "RGB"


def test_webdataset_globs_and_keys_from_different_tars_never_collide(tmp_path):
    _tar(tmp_path / "s-0.tar", {"k.png": _png(), "k.cls": b"0"})
    _tar(tmp_path / "s-1.tar", {"k.png": _png(), "k.cls": b"1"})
    samples, _, _ = list_dataset({"kind": "webdataset", "urls": [str(tmp_path / "s-*.tar")]})
    assert [s.key for s in samples] == ["s-0/k", "s-1/k"]
    samples, _, _ = list_dataset({"kind": "webdataset", "urls": str(tmp_path / "s-{0..1}.tar")})
    assert len(samples) == 2
    with pytest.raises(DatasetError, match="matches no files"):
        list_dataset({"kind": "webdataset", "urls": [str(tmp_path / "t-*.tar")]})


def test_webdataset_never_reads_unsafe_or_pickle_members(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Boom(marker))
    shard = _tar(tmp_path / "w.tar", {
        "ok.png": _png(), "ok.cls": b"1",
        "ok.pyd": payload, "other.pickle": payload, "m.pth": payload,
        "../escape.jpg": _jpeg(), "/abs.png": _png(),
        "meta.json": b"{}", "nolabel.png": _png(), "badlabel.png": _png(), "badlabel.cls": b"cat",
    })
    samples, _, skipped = list_dataset({"kind": "webdataset", "urls": [str(shard)]})
    for s in samples:
        load_image(s)
    assert [s.key for s in samples] == ["w/ok"]
    reasons = {s["member"]: s["reason"] for s in skipped}
    assert reasons["ok.pyd"] == "pickle entries are never read (.pyd)"
    assert reasons["other.pickle"] == "pickle entries are never read (.pickle)"
    assert reasons["m.pth"] == "pickle entries are never read (.pth)"
    assert reasons["../escape.jpg"] == "unsafe tar member name"
    assert reasons["/abs.png"] == "unsafe tar member name"
    assert reasons["meta.json"] == "not an image or .cls entry (.json)"
    assert reasons["badlabel.cls"] == ".cls entry is not an integer: b'cat'"
    assert reasons["nolabel.png"] == reasons["badlabel.png"] == "image without a valid .cls label"
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: had the reader unpickled it, the marker would exist
    assert marker.exists()


def test_webdataset_duplicate_keys_and_empty_shards_are_errors(tmp_path):
    a = _tar(tmp_path / "a" / "shard.tar", {"k.png": _png(), "k.cls": b"0"})
    b = _tar(tmp_path / "b" / "shard.tar", {"k.png": _png(), "k.cls": b"0"})
    with pytest.raises(DatasetError, match="duplicate sample key 'shard/k'") as e:
        list_dataset({"kind": "webdataset", "urls": [str(a), str(b)]})
    assert str(a) in str(e.value) and str(b) in str(e.value)
    twice = _tar(tmp_path / "t.tar", {"k.png": _png(), "k.jpg": _jpeg(), "k.cls": b"0"})
    with pytest.raises(DatasetError, match="duplicate sample key 't/k'"):
        list_dataset({"kind": "webdataset", "urls": str(twice)})
    empty = _tar(tmp_path / "e.tar", {"x.json": b"{}"})
    with pytest.raises(DatasetError, match="holds no samples"):
        list_dataset({"kind": "webdataset", "urls": str(empty)})
    with pytest.raises(DatasetError, match=str(tmp_path / "missing.tar")):
        list_dataset({"kind": "webdataset", "urls": str(tmp_path / "missing.tar")})
    not_tar = _write(tmp_path / "n.tar", b"this is not a tar file" * 40)
    with pytest.raises(DatasetError, match="not a readable tar file"):
        list_dataset({"kind": "webdataset", "urls": str(not_tar)})


def _tarfile_members(path):
    with tarfile.open(path, "r:") as tar:
        return [(i.name, "dir" if i.isdir() else "file" if i.isfile() else "other", i.offset_data, i.size) for i in tar]


def _odd_tar(path, fmt, global_pax=None):
    """Every kind of member tar writes, in one of its formats: long names (a ustar prefix, a GNU long name
    or a pax path), non-ASCII and 'BZh' names, empty files, folders, links, a fifo, float mtimes."""
    with tarfile.open(path, "w", format=fmt, pax_headers=global_pax or {}) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE, **kw):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), kw.pop("mtime", 1_700_000_000.25)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("BZh9-first.jpg", b"x" * 700)
        add("dir", kind=tarfile.DIRTYPE)
        add("dir/a.cls", b"3")
        add("empty.jpg")
        add("/".join(["deep"] * 20) + "/img.jpg", b"y" * 513)  # 119 characters: ustar prefix, GNU or pax name
        add("n" * 130 + ".png", b"z" * 1024)  # a base name past 100 characters: GNU or pax only
        add("link.jpg", kind=tarfile.SYMTYPE, linkname="empty.jpg")
        add("hard.jpg", kind=tarfile.LNKTYPE, linkname="empty.jpg")
        add("fifo", kind=tarfile.FIFOTYPE)
        add("tail.cls", b"12", mtime=5)


@pytest.mark.parametrize("fmt,names", [(tarfile.USTAR_FORMAT, "ustar"), (tarfile.GNU_FORMAT, "gnu"),
                                       (tarfile.PAX_FORMAT, "pax")])
def test_the_header_scan_lists_every_member_as_tarfile_does(tmp_path, fmt, names):
    path = tmp_path / f"{names}.tar"
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold a 130-character base name: the rest of the set
        with pytest.raises(ValueError):
            _odd_tar(path, fmt)
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in (("BZh.jpg", b"a"), ("/".join(["deep"] * 20) + "/img.jpg", b"b" * 600), ("e.cls", b"")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        _odd_tar(path, fmt)
    listed = datasets.tar_members(str(path))
    assert listed == _tarfile_members(path)
    assert len(listed) >= 3 and any(len(name) > 100 for name, *_ in listed)
    with open(path, "rb") as f:  # the offsets are the members' bytes
        blob = f.read()
    with tarfile.open(path) as tar:
        for name, kind, offset, size in listed:
            if kind == "file":
                assert blob[offset:offset + size] == tar.extractfile(name).read()


def test_the_header_scan_gives_unusual_archives_to_tarfile_and_refuses_compressed_ones(tmp_path, monkeypatch):
    webdataset = pytest.importorskip("webdataset")
    written = tmp_path / "wds.tar"  # webdataset's own writer: a pax header before every member (float mtimes)
    with webdataset.TarWriter(str(written)) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "jpg": bytes(range(200)), "cls": str(i).encode(), "json": b"{}"})
    global_pax = tmp_path / "g.tar"
    _odd_tar(global_pax, tarfile.PAX_FORMAT, {"comment": "a global header"})
    v7_dir = tmp_path / "v7.tar"  # an old tar's folder: a regular-file type, a name ending in '/'
    with tarfile.open(v7_dir, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind in (("old/", tarfile.AREGTYPE), ("old/x.cls", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info, io.BytesIO(b""))
    expected = {path: _tarfile_members(path) for path in (written, global_pax, v7_dir)}
    fell_back = []
    original = tarfile.open
    monkeypatch.setattr(datasets.tarfile, "open", lambda *a, **k: fell_back.append(a[0]) or original(*a, **k))
    for path, members in expected.items():
        assert datasets.tar_members(str(path)) == members, path
    assert fell_back == [str(global_pax)]  # only the global pax header needed tarfile
    monkeypatch.undo()
    assert [k for _, k, _, _ in datasets.tar_members(str(v7_dir))] == ["dir", "file"]
    gz = tmp_path / "c.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(written, arcname="inner.tar")
    with pytest.raises(DatasetError, match=f"webdataset shard {gz} is gzip-compressed; images are read from the tar "
                                           f"by offset, so decompress it first"):
        list_dataset({"kind": "webdataset", "urls": str(gz)})
    samples, _, _ = list_dataset({"kind": "webdataset", "urls": str(written)})
    assert [(s.key, s.label) for s in samples] == [(f"wds/k{i}", i) for i in range(5)]
    cut = tmp_path / "cut.tar"  # a checksum broken in the third header: tarfile would list 2 members and stop
    blob = bytearray(written.read_bytes())
    with tarfile.open(written) as tar:
        third = [i.offset for i in tar][2]  # the pax header before the third member
    blob[third + 148] ^= 1
    cut.write_bytes(bytes(blob))
    assert len(_tarfile_members(cut)) == 2
    with pytest.raises(DatasetError, match=f"webdataset shard {cut} is damaged: the header at byte {third} fails its "
                                           f"checksum \\(after 2 members\\), so the members after it cannot be listed"):
        list_dataset({"kind": "webdataset", "urls": str(cut)})


def _raw_tar(path, *entries):
    """A tar built header by header: ("pax", {records}), ("long", name) or (name, data, type), then two zero blocks."""
    out = b""
    for e in entries:
        if e[0] == "pax":
            out += tarfile.TarInfo._create_pax_generic_header(e[1], tarfile.XHDTYPE, "utf-8")
        elif e[0] == "long":
            out += tarfile.TarInfo._create_gnu_long_header(e[1], tarfile.GNUTYPE_LONGNAME, "utf-8", "strict")
        else:
            name, data, kind = e
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            out += info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)
    path.write_bytes(out + bytes(1024))
    return path


def test_the_header_scan_applies_stacked_pax_and_long_name_headers_as_tarfile_does(tmp_path):
    reg, folder = tarfile.REGTYPE, tarfile.DIRTYPE
    cases = {
        "two-pax": [("pax", {"path": "first.jpg"}), ("pax", {"path": "second.jpg"}), ("m.jpg", b"x" * 10, reg)],
        "pax-then-long": [("pax", {"path": "pax.jpg"}), ("long", "l" * 120 + ".jpg"), ("m.jpg", b"y", reg)],
        "long-then-pax": [("long", "l" * 120 + ".jpg"), ("pax", {"path": "pax.jpg"}), ("m.jpg", b"y", reg)],
        "pax-path-slash": [("pax", {"path": "trailing.jpg/"}), ("m.jpg", b"z" * 600, reg), ("n.cls", b"1", reg)],
        "long-dir-slashes": [("long", "d" * 120 + "//"), ("d", b"", folder), ("k.cls", b"2", reg)],
        "pax-bad-size": [("pax", {"size": "5.0"}), ("m.jpg", b"", reg), ("n.cls", b"3", reg)],
        "pax-size": [("pax", {"size": "700"}), ("m.jpg", b"w" * 700, reg), ("n.cls", b"4", reg)],
    }
    for label, entries in cases.items():
        path = _raw_tar(tmp_path / f"{label}.tar", *entries)
        assert datasets.tar_members(str(path)) == _tarfile_members(path), label
    assert datasets.tar_members(str(tmp_path / "two-pax.tar"))[0][0] == "first.jpg"  # the earliest header wins
    assert datasets.tar_members(str(tmp_path / "pax-then-long.tar"))[0][0] == "pax.jpg"


def test_a_cut_or_scrambled_tar_is_an_error_naming_the_shard_and_byte(tmp_path):
    whole = _raw_tar(tmp_path / "whole.tar", ("a.jpg", b"j" * 700, tarfile.REGTYPE), ("a.cls", b"123", tarfile.REGTYPE),
                     ("b.jpg", b"k" * 300, tarfile.REGTYPE), ("b.cls", b"7", tarfile.REGTYPE))
    blob = whole.read_bytes()
    cut = tmp_path / "cut.tar"  # 2 bytes into a.cls's data: its label would read '12'
    cut.write_bytes(blob[:512 + 1024 + 512 + 2])
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _tarfile_members(cut)
    with pytest.raises(DatasetError, match=f"webdataset shard {cut} is cut short: 'a.cls' needs bytes up to 2560, "
                                           f"the file has 2050; restore the shard from its source"):
        list_dataset({"kind": "webdataset", "urls": str(cut)})
    scrambled = tmp_path / "scrambled.tar"  # the third header overwritten with noise: tarfile lists two and stops
    noise = bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8))
    scrambled.write_bytes(blob[:2560] + noise + blob[3072:])
    assert [m[0] for m in _tarfile_members(scrambled)] == ["a.jpg", "a.cls"]
    with pytest.raises(DatasetError, match=f"webdataset shard {scrambled} is damaged: the header at byte 2560 fails "
                                           f"its checksum \\(after 2 members\\)"):
        list_dataset({"kind": "webdataset", "urls": str(scrambled)})
    ends_early = tmp_path / "padded.tar"  # cut inside the closing zero blocks: whole, as tarfile reads it
    ends_early.write_bytes(blob[:-700])
    assert datasets.tar_members(str(ends_early)) == _tarfile_members(ends_early) == _tarfile_members(whole)


# ------------------------------------------------------------------------------------------- load_image

def test_load_image_converts_modes_to_rgb(tmp_path):
    rgb = load_image(_ref(_write(tmp_path / "rgb.png", _png((1, 2, 3)))))
    assert rgb.mode == "RGB" and rgb.size == (6, 4) and np.array(rgb)[0, 0].tolist() == [1, 2, 3]
    gray = load_image(_ref(_write(tmp_path / "g.png", _png(77, mode="L"))))
    assert gray.mode == "RGB" and np.array(gray)[2, 3].tolist() == [77, 77, 77]
    rgba = load_image(_ref(_write(tmp_path / "a.png", _png((9, 8, 7, 0), mode="RGBA"))))
    assert rgba.mode == "RGB" and np.array(rgba)[0, 0].tolist() == [9, 8, 7]  # alpha dropped, not composited
    cmyk = load_image(_ref(_write(tmp_path / "c.jpg", _jpeg((0, 255, 255, 0), mode="CMYK"))))
    r, g, b = np.array(cmyk).reshape(-1, 3).mean(0)
    assert cmyk.mode == "RGB" and r > 240 and g < 15 and b < 15  # CMYK (0, 1, 1, 0) is red


def test_load_image_scales_16_bit_and_float_images(tmp_path):
    values = np.array([[0, 65535, 257 * 100], [257, 1000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.array(load_image(_ref(path)))
    assert out.shape == (2, 3, 3) and (out[..., 0] == out[..., 2]).all()
    assert out[..., 0].tolist() == [[0, 255, 100], [1, 4, 255]]
    floats = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)).save(floats)
    assert np.array(load_image(_ref(floats)))[..., 1].tolist() == [[0, 128], [255, 64]]


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (8, 2), (50, 60, 70))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    path = tmp_path / "o.jpg"
    image.save(path, exif=exif)
    assert load_image(_ref(path)).size == (2, 8)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"


def test_load_image_never_hands_bytes_to_unsafe_decoders(tmp_path):
    path = _write(tmp_path / "eps.jpg", EPS)
    assert Image.open(path).format == "EPS"  # PIL alone would run Ghostscript on it
    with pytest.raises(BadImage, match="not a JPEG, PNG, BMP, WEBP, TIFF, GIF file"):
        load_image(_ref(path))


def test_load_image_raises_bad_image_for_broken_files(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "empty.jpg": (b"", "empty file"),
        "random.jpg": (b"\xff\xd8\xff\xe0" + rng.bytes(2000), "cannot decode image: Truncated File Read"),
        "cut.png": (_png(size=(64, 64))[:60], "cannot decode image: image file is truncated"),
        "text.png": (b"hello", "cannot decode image: not a JPEG, PNG, BMP, WEBP, TIFF, GIF file"),
        "eps.jpg": (EPS, "cannot decode image: not a JPEG, PNG, BMP, WEBP, TIFF, GIF file"),
    }
    for name, (data, reason) in cases.items():
        with pytest.raises(BadImage) as e:
            load_image(_ref(_write(tmp_path / name, data)))
        assert str(e.value) == reason, name
    with pytest.raises(BadImage) as e:
        load_image(_ref(tmp_path / "gone.png"))
    assert str(e.value) == f"cannot read: [Errno 2] No such file or directory: '{tmp_path / 'gone.png'}'"


def test_load_image_turns_decompression_bombs_into_bad_image(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn = _write(tmp_path / "w.png", _png(size=(15, 10)))  # over the limit: PIL warns
    bomb = _write(tmp_path / "b.png", _png(size=(30, 10)))  # over twice the limit: PIL refuses
    for path in (warn, bomb):
        with pytest.raises(BadImage, match="image too large"):
            load_image(_ref(path))


# ------------------------------------------------------------------------------------------- demo

def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")


def test_demo_has_real_classes_and_disjoint_train_val(demo):
    train, classes, skipped = list_dataset({"kind": "demo", "root": str(demo), "split": "train"})
    val, val_classes, _ = list_dataset({"kind": "demo", "root": str(demo), "split": "val"})
    assert len(classes) >= 8 and classes == val_classes == sorted(datasets.DEMO_PHOTOS)
    assert skipped == []
    assert len(train) == 24 * len(classes) and len(val) == 8 * len(classes)
    digest = lambda s: hashlib.sha256(open(s.source, "rb").read()).hexdigest()  # noqa: E731
    train_bytes, val_bytes = {digest(s) for s in train}, {digest(s) for s in val}
    assert len(train_bytes) == len(train) and len(val_bytes) == len(val)  # no repeated tile either
    assert not train_bytes & val_bytes
    image = load_image(val[0])
    assert image.mode == "RGB" and max(image.size) <= 256


@pytest.mark.parametrize("size", [(451, 300), (1411, 1411), (640, 427), (1000, 872)])
def test_demo_tiles_come_from_disjoint_regions(size):
    width, height = size
    train, val = datasets._tile_boxes(width, height, "train"), datasets._tile_boxes(width, height, "val")
    assert max(b[2] for b in train) < min(b[0] for b in val)
    for left, top, right, bottom in train + val:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
    assert len(set(train)) == len(train) and len(set(val)) == len(val)


def test_demo_build_is_idempotent_and_deterministic(demo, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}
    assert build_demo_dataset(demo) == demo
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before
    stale = tmp_path / ".again.building-999999999"  # a killed build's leftovers
    stale.mkdir()
    again = build_demo_dataset(tmp_path / "again")
    assert _digests(again) == _digests(demo)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_demo_refuses_a_root_holding_other_files(tmp_path):
    _write(tmp_path / "mine" / "thesis.txt", b"precious")
    with pytest.raises(DatasetError, match=f"demo root {tmp_path / 'mine'} exists"):
        build_demo_dataset(tmp_path / "mine")
    with pytest.raises(DatasetError, match="split must be 'train' or 'val', found 'test'"):
        list_dataset({"kind": "demo", "root": str(tmp_path / "mine"), "split": "test"})
    assert (tmp_path / "mine" / "thesis.txt").read_bytes() == b"precious"


def test_an_older_demo_holding_a_users_file_is_not_replaced(demo, tmp_path):
    import json
    import shutil

    old = tmp_path / "demo"
    shutil.copytree(demo, old)
    marker = json.loads((old / ".complete").read_text())
    (old / ".complete").write_text(json.dumps(marker | {"version": 1}))  # an older build's
    _write(old / "train" / "astronaut" / "notes.txt", b"mine")
    before = _digests(old)
    with pytest.raises(DatasetError) as e:
        build_demo_dataset(old)
    assert str(e.value) == (f"demo root {old} holds an older demo dataset and 'train/astronaut/notes.txt', which its "
                            f"build did not write; the older demo is replaced whole, so nothing was changed: move it out")
    assert _digests(old) == before
    (old / "train" / "astronaut" / "notes.txt").unlink()
    assert _digests(build_demo_dataset(old)) == _digests(demo)  # nothing else there: replaced by this version
