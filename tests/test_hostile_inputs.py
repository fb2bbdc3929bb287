"""Bad and hostile input, each with the exact message a user sees and what was kept.

Images that cannot be decoded are skipped with a recorded reason (the job goes on); every image
mode either loads as the RGB a reader would expect (values checked) or is refused. Tar members
with unsafe names or pickle extensions are never read. A hand-edited manifest, NaN/Inf teacher
outputs, a checkpoint with code in it and a cache of another teacher are refused, naming the file,
the key and the values. FAULT_MATRIX.md lists each case with its test.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cache_helpers import (FP32, TEACHER_NAME, committed, make_imagefolder, make_spec, manifest, run, save_checkpoint,
                            temporaries)
from pipeline.datasets import BadImage, DatasetError, SampleRef, list_dataset, load_image
from pipeline.inspect_cache import verify
from pipeline.reader import CacheReader
from pipeline.schema import ManifestError
from pipeline.views import ViewParams, fingerprint, render_view


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEKD_WORK", str(tmp_path / "work"))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ref(path: Path, key: str = "c/x") -> SampleRef:
    return SampleRef(0, key, 0, str(path))


def _reason(path: Path) -> str:
    with pytest.raises(BadImage) as e:
        load_image(_ref(path))
    return str(e.value)


RNG = np.random.default_rng(7)
NOISE = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
JPEG = _encode(NOISE, "JPEG", quality=90)
PNG = _encode(NOISE, "PNG")


# ---------------------------------------------------------------------------------------------- undecodable images

def _broken_stream(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[200:210] = np.random.default_rng(0).bytes(10)
    return bytes(bad)


# Each reason is Pillow's own words after ours: it names what is wrong with the bytes; the file and
# the key are in the skip record beside it (see the cache-job tests below).
UNDECODABLE = {
    "corrupt JPEG: random bytes after the JPEG marker": (b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000),
                                                         "cannot decode image: Truncated File Read"),
    "corrupt JPEG: broken entropy-coded data": (_broken_stream(JPEG),
                                                "cannot decode image: broken data stream when reading image file"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "cannot decode image: image file is truncated (146 bytes not processed)"),
    "JPEG header only": (JPEG[:20], "cannot decode image: not a JPEG, PNG, BMP, WEBP, TIFF, GIF file"),
    "truncated PNG: half": (PNG[: len(PNG) // 2], "cannot decode image: image file is truncated"),
    "truncated PNG: 100 bytes short": (PNG[:-100], "cannot decode image: image file is truncated"),
    "truncated PNG: first 60 bytes": (PNG[:60], "cannot decode image: image file is truncated"),
    "zero-byte file": (b"", "empty file"),
    "text file named .png": (b"hello, this is not an image\n", "cannot decode image: not a JPEG, PNG, BMP, WEBP, TIFF, GIF file"),
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_an_undecodable_image_is_refused_with_its_exact_reason(tmp_path, case):
    data, reason = UNDECODABLE[case]
    assert _reason(_write(tmp_path / "x.img", data)) == reason


def test_a_png_missing_only_its_trailer_loads_whole(tmp_path):
    """All pixel data present, only the IEND chunk (and the last IDAT's CRC) cut: nothing is lost."""
    path = _write(tmp_path / "t.png", PNG[:-20])
    np.testing.assert_array_equal(np.asarray(load_image(_ref(path))), np.asarray(NOISE))


# ---------------------------------------------------------------------------------------------- image modes → RGB

def _png16(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG written by hand (Pillow cannot write 16-bit colour): a (H, W, C) uint16,
    C = 3 (RGB) or 4 (RGBA)."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _cmyk_to_rgb(c: np.ndarray) -> np.ndarray:
    """The standard naive conversion: R = (255 − C)(255 − K)/255, and so on."""
    c = c.astype(np.int64)
    return np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)


def _modes() -> dict[str, tuple[bytes, str, np.ndarray]]:
    """name → (encoded file, the mode Pillow opens it in, the RGB array load_image must give)."""
    rng = np.random.default_rng(3)
    h, w = 12, 16
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (h, w, 4), dtype=np.uint16)
    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    index = rng.integers(0, 4, (h, w), dtype=np.uint8)
    palette = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0], [255, 255, 255]], np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.ravel().tolist())
    bits = rng.random((h, w)) < 0.5
    three = lambda g: np.repeat(g[..., None], 3, axis=-1)  # noqa: E731
    flat_cmyk = np.broadcast_to(np.array([10, 20, 30, 40], np.uint8), (h, w, 4))
    return {
        "grayscale (L)": (_encode(Image.fromarray(gray), "PNG"), "L", three(gray)),
        "grayscale + alpha (LA)": (_encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"), "LA", three(gray)),
        # alpha is dropped, not composited: what timm's and torchvision's loaders do
        "RGBA": (_encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), "RGBA", rgb),
        "16-bit grayscale PNG (I;16)": (_encode(Image.fromarray(deep[..., 0]), "PNG"), "I;16",
                                        three(np.rint(deep[..., 0] / 257).astype(np.uint8))),
        # Pillow decodes 16-bit colour PNGs to 8 bits itself, keeping the high byte
        "16-bit RGB PNG": (_png16(deep[..., :3]), "RGB", (deep[..., :3] >> 8).astype(np.uint8)),
        "16-bit RGBA PNG": (_png16(deep), "RGBA", (deep[..., :3] >> 8).astype(np.uint8)),
        "CMYK TIFF": (_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), "CMYK", _cmyk_to_rgb(cmyk)),
        "CMYK JPEG (one colour)": (_encode(Image.fromarray(np.ascontiguousarray(flat_cmyk), "CMYK"), "JPEG", quality=100),
                                   "CMYK", _cmyk_to_rgb(flat_cmyk)),
        "palette (P)": (_encode(pal, "PNG"), "P", palette[index]),
        "palette with a transparent entry": (_encode(pal, "PNG", transparency=1), "P", palette[index]),
        "palette GIF": (_encode(pal, "GIF"), "P", palette[index]),
        "1-bit (1)": (_encode(Image.fromarray(bits), "PNG"), "1", three(np.where(bits, 255, 0).astype(np.uint8))),
    }


MODES = _modes()


@pytest.mark.parametrize("name", list(MODES))
def test_every_image_mode_loads_as_the_expected_rgb_values(tmp_path, name):
    data, opened_as, expected = MODES[name]
    path = _write(tmp_path / "img", data)
    assert Image.open(path).mode == opened_as
    image = load_image(_ref(path))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)


# ---------------------------------------------------------------------------------------------- a hostile image folder, cached

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


def test_cache_job_over_a_hostile_folder_caches_every_decodable_image_and_records_the_rest(tmp_path, ckpt):
    data = tmp_path / "data"
    ext = {"JPEG": ".jpg", "GIF": ".gif", "TIFF": ".tif", "PNG": ".png"}
    good = {}
    for i, (name, (encoded, _, expected)) in enumerate(MODES.items()):
        path = _write(data / "good" / f"m{i:02d}{ext[Image.open(io.BytesIO(encoded)).format]}", encoded)
        if path.suffix != ".gif":  # an image folder lists torchvision's extensions, which have no .gif
            good[f"good/{path.stem}"] = expected
    gif = next(data.glob("good/*.gif"))
    bad = {"a_corrupt.jpg": UNDECODABLE["corrupt JPEG: broken entropy-coded data"],
           "b_truncated.png": UNDECODABLE["truncated PNG: half"], "c_empty.jpg": UNDECODABLE["zero-byte file"],
           "d_text.png": UNDECODABLE["text file named .png"]}
    for name, (encoded, _) in bad.items():
        _write(data / "bad" / name, encoded)
    _write(data / "bad" / "notes.txt", b"not an image")
    _write(data / "bad" / ".hidden.png", PNG)
    _write(data / "stray.jpg", JPEG)

    out = tmp_path / "cache"
    summary = run(make_spec(data, out, ckpt, samples_per_shard=4, per_image=2))
    m = manifest(out)
    listed = str(data)
    assert m["skipped"] == [  # the listing's skips first, then each shard's, in shard order
        {"source": f"{listed}/stray.jpg", "reason": f"file outside any class folder (expected {listed}/<class>/<image>)"},
        {"source": f"{listed}/bad/.hidden.png", "reason": "hidden file"},
        {"source": f"{listed}/bad/notes.txt", "reason": "not an image file (extension .txt)"},
        {"source": str(gif), "reason": "not an image file (extension .gif)"},
        *({"key": f"bad/{Path(name).stem}", "source": f"{listed}/bad/{name}", "reason": reason}
          for name, (_, reason) in bad.items()),
    ]
    # nothing lost: every listed sample is cached or skipped with its reason, none twice
    assert summary["complete"] is True and summary["samples"] == len(good) == m["num_samples"] == 11
    reader = CacheReader(out)
    keys = [reader[i]["key"] for i in range(len(reader))]
    assert keys == sorted(good) and len(set(keys)) == len(keys)
    # each cached view is the teacher's input rendered from the expected RGB values
    size, interpolation = tuple(m["teacher"]["input_size"][1:]), m["teacher"]["interpolation"]
    for i, key in enumerate(keys):
        s = reader[i]
        for v in range(2):
            pixels = render_view(Image.fromarray(good[key]), ViewParams.from_array(s["views"][v]), size, interpolation)
            assert s["fingerprints"][v] == fingerprint(pixels), (key, v)
    assert verify(out)["ok"] is True


# ---------------------------------------------------------------------------------------------- hostile tars

class _Marker:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """members: (name, bytes) for files, (name, 'link:target') for symlinks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data.removeprefix("link:")
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_cache_job_over_a_hostile_tar_reads_no_unsafe_or_pickle_entry(tmp_path, ckpt):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Marker(marker))
    png = _encode(Image.new("RGB", (20, 16), (1, 2, 3)), "PNG")
    shard = _tar(tmp_path / "wds" / "train-0.tar", [
        ("a.png", png), ("a.cls", b"3"),
        ("a.pyd", payload), ("b.pickle", payload), ("c.pkl", payload), ("d.pth", payload), ("e.pt", payload),
        ("../escape.png", png), ("/etc/abs.png", png), ("sub/../../up.cls", b"1"),
        ("link.png", "link:/etc/passwd"),
        ("bad.jpg", _broken_stream(JPEG)), ("bad.cls", b"1"),
        ("z.png", png), ("z.cls", b"7"),
    ])
    out = tmp_path / "cache"
    spec = make_spec(tmp_path, out, ckpt, samples_per_shard=4, per_image=1)
    spec.dataset = {"kind": "webdataset", "urls": str(shard)}
    summary = run(spec)
    src = str(shard)
    assert manifest(out)["skipped"] == [
        *({"key": f"train-0/{k}", "source": src, "member": f"{k}.{e}", "reason": f"pickle entries are never read (.{e})"}
          for k, e in (("a", "pyd"), ("b", "pickle"), ("c", "pkl"), ("d", "pth"), ("e", "pt"))),
        {"source": src, "member": "../escape.png", "reason": "unsafe tar member name"},
        {"source": src, "member": "/etc/abs.png", "reason": "unsafe tar member name"},
        {"source": src, "member": "sub/../../up.cls", "reason": "unsafe tar member name"},
        {"key": "train-0/link", "source": src, "member": "link.png", "reason": "not a regular file (link or device)"},
        {"key": "train-0/bad", "source": src, "member": "bad.jpg",
         "reason": "cannot decode image: broken data stream when reading image file"},
    ]
    assert not marker.exists() and not (tmp_path / "escape.png").exists()
    assert summary["complete"] is True and summary["samples"] == 2
    reader = CacheReader(out)
    assert [(reader[i]["key"], reader[i]["label"]) for i in range(len(reader))] == [("train-0/a", 3), ("train-0/z", 7)]
    pickle.loads(payload)  # control: the payload is live, had anything unpickled it the marker would exist
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- duplicate keys

def test_duplicate_keys_in_an_image_folder_stop_the_job_before_it_writes(tmp_path, ckpt):
    data = tmp_path / "data"
    _write(data / "train" / "cat" / "a.png", PNG)
    _write(data / "train" / "cat" / "a.jpg", JPEG)
    with pytest.raises(DatasetError) as e:
        list_dataset({"kind": "imagefolder", "root": str(data), "split": "train"})
    assert str(e.value) == (f"duplicate sample key 'cat/a' in {data}/train: {data}/train/cat/a.jpg and "
                            f"{data}/train/cat/a.png")
    out = tmp_path / "cache"
    with pytest.raises(DatasetError, match=re.escape(str(e.value))):
        run(make_spec(data / "train", out, ckpt))
    assert not out.exists()


def test_duplicate_keys_in_webdataset_tars_name_both_members(tmp_path):
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    a = _tar(tmp_path / "a" / "s.tar", [("k.png", png), ("k.cls", b"0")])
    b = _tar(tmp_path / "b" / "s.tar", [("k.png", png), ("k.cls", b"0")])
    with pytest.raises(DatasetError) as e:
        list_dataset({"kind": "webdataset", "urls": [str(a), str(b)]})
    assert str(e.value) == f"duplicate sample key 's/k': {a}:k.png and {b}:k.png"
    twice = _tar(tmp_path / "t.tar", [("k.png", png), ("k.jpg", png), ("k.cls", b"0")])
    with pytest.raises(DatasetError) as e:
        list_dataset({"kind": "webdataset", "urls": str(twice)})
    assert str(e.value) == f"duplicate sample key 't/k': {twice}:k.png and {twice}:k.jpg"
    labels = _tar(tmp_path / "l.tar", [("k.png", png), ("k.cls", b"0"), ("k.cls", b"1")])
    with pytest.raises(DatasetError) as e:
        list_dataset({"kind": "webdataset", "urls": str(labels)})
    assert str(e.value) == f"duplicate label for sample key 'l/k' in {labels}: member k.cls"


# ---------------------------------------------------------------------------------------------- a manifest edited by hand

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, ckpt):
    """6 images, 2 a shard (3 shards), 1 view each, fp32."""
    root = tmp_path_factory.mktemp("small")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data", per_class=2, corrupt=False)
        run(make_spec(data, root / "cache", ckpt, samples_per_shard=2, per_image=1))
    return root / "cache"


def _edited(small_cache: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(small_cache, out)
    m = manifest(out)
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("field,value,declared", [("shape", [16, 96], "float32(16, 96)"),
                                                  ("codec", "fp16", "float16(16, 192)")])
def test_a_manifest_whose_role_is_edited_consistently_is_refused_on_read(small_cache, tmp_path, field, value, declared):
    """shape (or codec) and fields edited together, so the manifest is self-consistent but not the shards."""
    from pipeline.schema import RoleSpec

    def edit(m):
        role = m["roles"]["final"] | {field: value}
        m["roles"]["final"] = RoleSpec.from_dict(role).to_dict() | {"compressor": role["compressor"]}

    out = _edited(small_cache, tmp_path, edit)
    reader = CacheReader(out)
    with pytest.raises(ManifestError) as e:
        reader.read(0, 0)
    assert str(e.value) == (f"{out}/shard-00000: field 'final' of sample 'cat/cat000', view 0 is float32(16, 192), "
                            f"but manifest.json declares {declared}")
    shape = "(2, 1, 16, 96)" if field == "shape" else "(2, 1, 16, 192)"
    dtype = "float32" if field == "shape" else "float16"
    assert verify(out)["problems"] == [f"shard-0000{i}/final: float32(2, 1, 16, 192), expected {dtype}{shape}"
                                       for i in range(3)]


def test_a_manifest_whose_role_fields_disagree_is_refused_at_open(small_cache, tmp_path):
    def edit(m):
        m["roles"]["final"]["shape"] = [16, 96]

    out = _edited(small_cache, tmp_path, edit)
    with pytest.raises(ManifestError) as e:
        CacheReader(out)
    assert str(e.value) == (f"{out}/manifest.json: role 'final' declares fields {{'final': ((16, 192), 'float32')}}, "
                            f"but shape (16, 96) with codec 'fp32' stores {{'final': ((16, 96), 'float32')}}")


def test_a_manifest_missing_its_roles_is_refused_at_open(small_cache, tmp_path):
    out = _edited(small_cache, tmp_path, lambda m: m.pop("roles"))
    with pytest.raises(ManifestError) as e:
        CacheReader(out)
    assert str(e.value) == f"{out}/manifest.json: missing key 'roles'"


@pytest.mark.parametrize("key,value", [("sha256", "0" * 64), ("samples", 3), ("end", 5)])
def test_a_manifest_with_an_edited_shard_record_is_refused_on_read(small_cache, tmp_path, key, value):
    """A count that disagrees is refused when the cache is opened; any other edit of a shard's record
    when that shard is first read (opening a cache reads no shard.json: 5,005 of them at ImageNet size)."""
    out = _edited(small_cache, tmp_path, lambda m: m["shards"][1].__setitem__(key, value))
    real = manifest(small_cache)["shards"][1][key]
    detail = f"{key}: manifest has {value!r}, shard.json gives {real!r}"
    with pytest.raises(ManifestError) as e:
        reader = CacheReader(out)
        reader.read(0, 0)  # shard-00000 is intact
        first_of_shard_1 = next(i for i in range(len(reader)) if reader[i]["shard"] == "shard-00001")
        reader.read(first_of_shard_1, 0)
    if key == "samples":
        assert str(e.value) == (f"{out}/manifest.json: 6 samples declared, its shards record 7, their index holds 6; "
                                f"run inspect-shards --verify")
    else:
        assert str(e.value) == (f"{out}/manifest.json: its record of shard-00001 does not match "
                                f"{out}/shard-00001/shard.json ({detail}); run inspect-shards --verify")
    count = ["manifest.json: num_samples 6 != the shards' 7"] if key == "samples" else []
    assert verify(out)["problems"] == [f"shard-00001: shard.json does not match the manifest's record ({detail})", *count]


# ---------------------------------------------------------------------------------------------- NaN / Inf in the teacher

def _poisoned_checkpoint(path: Path, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(save_checkpoint(path)))
    sd["norm.bias"] = torch.full_like(sd["norm.bias"], value)  # the last norm: final and logits, not mid
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_teacher_outputs_stop_the_job_and_nothing_is_committed(small_cache, tmp_path, value):
    data = Path(manifest(small_cache)["dataset"]["spec"]["root"])
    out = tmp_path / "cache"
    spec = make_spec(data, out, _poisoned_checkpoint(tmp_path / "poisoned.safetensors", value), samples_per_shard=2,
                     per_image=1)
    with pytest.raises(FloatingPointError) as e:
        run(spec)
    assert str(e.value) == (f"teacher {TEACHER_NAME} produced NaN/Inf in 'final' for shard-00000 (views 0..1 of the "
                            f"shard); refusing to cache it")
    m = manifest(out)
    assert committed(out) == [] and temporaries(out) == []
    assert m["complete"] is False and m["shards"] == [] and m["num_samples"] == 0


# ---------------------------------------------------------------------------------------------- checkpoints with code

class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_a_teacher_checkpoint_with_code_stops_the_cache_job_and_never_runs(small_cache, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": _Payload(marker)}, evil)
    data = Path(manifest(small_cache)["dataset"]["spec"]["root"])
    out = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        run(make_spec(data, out, evil, samples_per_shard=2, per_image=1))
    assert str(e.value) == (f"teacher checkpoint {evil} cannot be loaded safely (weights_only=True refused it: it "
                            f"imports posix.system; nothing in the file was run); save it as safetensors or a plain "
                            f"state dict")
    assert not marker.exists()
    assert committed(out) == [] and manifest(out)["complete"] is False


def test_a_cache_pointing_the_trainer_at_a_checkpoint_with_code_is_refused(small_cache, tmp_path):
    """The trainer builds late from the checkpoint the manifest names (sha256 checked): a torch file
    is read with weights_only=True too."""
    from pipeline.late import build_late
    from pipeline.weights import file_sha256

    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.pt"
    torch.save(_Payload(marker), evil)
    teacher = manifest(small_cache)["teacher"] | {"checkpoint": str(evil), "checkpoint_sha256": file_sha256(evil)}
    with pytest.raises(ValueError) as e:
        build_late(teacher)
    assert str(e.value) == (f"teacher checkpoint {evil} cannot be loaded safely (weights_only=True refused it: it "
                            f"imports posix.system; nothing in the file was run); save it as safetensors or a plain "
                            f"state dict")
    assert not marker.exists()


def test_a_resume_checkpoint_with_code_is_refused_and_never_runs(small_cache, tmp_path):
    from pipeline.job_spec import TrainSpec
    from pipeline.trainer import train

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"epoch": 0, "hook": _Payload(marker)}, run_dir / "checkpoint.pt")
    spec = TrainSpec(name="t", cache=str(small_cache), student="test_resnet", output=str(run_dir), epochs=1,
                     batch_size=2, workers=0, student_input_size=64, device="cpu")
    with pytest.raises(ValueError) as e:
        train(spec, resume=True, progress=False, log=lambda m: None)
    assert str(e.value) == (f"checkpoint {run_dir}/checkpoint.pt cannot be loaded safely (weights_only=True refused "
                            f"it: it imports posix.system; nothing in the file was run); it is not this trainer's "
                            f"checkpoint: remove it or start a new output folder")
    assert not marker.exists()


def test_a_checkpoint_that_is_not_a_torch_file_is_refused_naming_why(tmp_path):
    from pipeline.weights import read_state_dict

    path = _write(tmp_path / "notes.pt", b"not a checkpoint")
    with pytest.raises(ValueError) as e:
        read_state_dict(path)
    assert str(e.value) == (f"teacher checkpoint {path} cannot be loaded safely (weights_only=True refused it: "
                            f"UnpicklingError: Unsupported operand 110); save it as safetensors or a plain state dict")


# ---------------------------------------------------------------------------------------------- a bad validation image

def test_an_undecodable_validation_image_is_named(tmp_path):
    import timm

    from pipeline.trainer import evaluate

    val = tmp_path / "val"
    _write(val / "cat" / "a.png", PNG)
    _write(val / "cat" / "b.jpg", JPEG[: len(JPEG) // 2])
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(BadImage) as e:
        evaluate(model, {"kind": "imagefolder", "root": str(val)}, torch.device("cpu"), (3, 32, 32))
    assert str(e.value) == (f"validation image 'cat/b' ({val}/cat/b.jpg): cannot decode image: image file is truncated "
                            f"(146 bytes not processed)")
