"""ImageNet-scale reading: the columnar sample index, reads without per-read parsing (both stores,
every read checked), relocatable caches, input tars read by offset. The sizes themselves are
measured by bench/scale.py; these tests pin the behaviour."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from _cache_helpers import FP32, make_imagefolder, make_spec, run, save_checkpoint
from pipeline.datasets import SampleRef, list_dataset, load_image
from pipeline.job_spec import TrainSpec
from pipeline.late import CacheMismatchError
from pipeline.reader import CacheReader
from pipeline.sample_index import SampleIndex
from pipeline.schema import ManifestError
from pipeline.trainer import train
from pipeline.views import ViewParams, fingerprint, render_view


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, its teacher checkpoint, and a cache of it in each store (2 samples a shard, 2 views)."""
    root = tmp_path_factory.mktemp("scale")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data", per_class=3, corrupt=False)
        ckpt = save_checkpoint(root / "teacher.safetensors")
        caches = {}
        for fmt in ("zarr", "webdataset"):
            caches[fmt] = root / f"cache-{fmt}"
            run(make_spec(data, caches[fmt], ckpt, fmt=fmt, roles=FP32, samples_per_shard=2, per_image=2))
    return {"root": root, "data": data, "ckpt": ckpt, "caches": caches}


def test_zarr_reads_the_shards_this_store_writes_and_they_verify(world):
    from pipeline.inspect_cache import verify

    assert verify(world["caches"]["zarr"])["problems"] == []
    arr = zarr.open_array(str(world["caches"]["zarr"] / "shard-00000" / "final"), mode="r")
    reader = CacheReader(world["caches"]["zarr"])
    assert np.array_equal(arr[:], np.stack([[reader.read(i, v)["final"] for v in range(2)] for i in range(2)]))


def test_the_fast_zarr_read_equals_zarrs_own_reader(world):
    reader = CacheReader(world["caches"]["zarr"])
    for i in range(len(reader)):
        s = reader[i]
        for view in range(reader.num_views):
            fast = reader._shard(reader.locate(i)[0]).read(s["row"], view)
            for field, a in fast.items():
                ref = zarr.open_array(str(reader.root / s["shard"] / field), mode="r")[s["row"], view]
                assert a.dtype == ref.dtype and np.array_equal(a, ref), (i, view, field)


def test_a_view_zarr_never_wrote_reads_as_zeros(tmp_path):
    """zarr skips a chunk that is all fill value (its index says 2^64 − 1): the fast path gives zeros, as zarr does."""
    from pipeline.schema import RoleSpec
    from pipeline.stores import zarr_store

    from zarr.codecs import ZstdCodec

    spec = RoleSpec("logits", (10,), "fp32")
    data = np.arange(2 * 3 * 10, dtype=np.float32).reshape(2, 3, 10) + 1
    data[1, 2] = 0
    group = zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)  # written by zarr itself
    group.create_array("logits", shape=data.shape, chunks=(1, 1, 10), shards=data.shape, dtype="float32",
                       compressors=ZstdCodec(level=3, checksum=True), fill_value=0)[...] = data
    shard = zarr_store.open_shard(tmp_path / "s", {"logits": spec})
    for row in range(2):
        for view in range(3):
            assert np.array_equal(shard.read(row, view)["logits"], data[row, view])
    assert shard._fields["logits"].index[1, 2, 0] == 2**64 - 1  # really not written


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_the_index_matches_what_the_store_files_hold(world, fmt):
    """The consolidated index is the shards' indices in order; each sample's key, label and view are
    those its shard was written with (webdataset: the .json entry of each view's tar)."""
    cache = world["caches"][fmt]
    reader = CacheReader(cache)
    m = reader.manifest
    assert m["index"]["samples"] == len(reader) == 9
    parts = [SampleIndex.open(cache / r["name"] / "index") for r in m["shards"]]
    keys = [p.string("key", i) for p in parts for i in range(len(p))]
    assert [reader[i]["key"] for i in range(len(reader))] == keys == [r.key for r in list_dataset(m["dataset"]["spec"])[0]]
    refs = list_dataset(m["dataset"]["spec"])[0]
    for i in range(len(reader)):
        s = reader[i]
        assert s["source"] == refs[i].source and s["label"] == refs[i].label and s["index"] == i
        if fmt == "webdataset":
            with tarfile.open(cache / s["shard"] / "v1.tar") as tar:
                meta = json.loads(tar.extractfile(f"s{i:08d}.json").read())
            assert meta["view"] == s["views"][1] and meta["fingerprint"] == s["fingerprints"][1]


def test_a_forked_reader_reads_what_its_parent_reads(world):
    """A DataLoader worker inherits the reader (and its open files): every read is a pread, so both agree."""
    reader = CacheReader(world["caches"]["webdataset"])
    parent = reader.read(3, 1)["final"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        ok = all(np.array_equal(reader.read(3, 1)["final"], parent) for _ in range(3))
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert np.array_equal(reader.read(3, 1)["final"], parent)


def test_a_flipped_byte_in_a_webdataset_entry_is_caught_on_read(world, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(world["caches"]["webdataset"], out)
    entries = np.load(out / "shard-00001" / "entries.npy")
    offset, size, _ = entries[0, 1, 0]  # view 0, row 1 (sample 3), first field (final)
    tar = out / "shard-00001" / "v0.tar"
    raw = bytearray(tar.read_bytes())
    raw[offset + size - 7] ^= 0x10  # a byte of the entry's zstd frame, not of a tar header
    tar.write_bytes(bytes(raw))
    reader = CacheReader(out)
    reader.read(2, 0)  # the other sample of the shard is intact
    with pytest.raises(ManifestError) as e:
        reader.read(3, 0)
    assert str(e.value) == (f"{out}/shard-00001: cannot read sample 'dog/dog000' (index 3), view 0: {tar}: entry final "
                            f"of row 1 fails its crc32 (the tar is damaged; run inspect-shards --verify)")


def test_an_incomplete_cache_is_read_from_its_shards_indices(world, tmp_path):
    out = tmp_path / "part"
    spec = make_spec(world["data"], out, world["ckpt"], fmt="zarr", roles=FP32, samples_per_shard=2, per_image=2)
    run(spec, max_shards=2)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and m["index"] is None and not (out / "index").exists()
    reader, full = CacheReader(out), CacheReader(world["caches"]["zarr"])
    assert len(reader) == 4
    for i in range(4):
        assert reader[i] == full[i]
        assert np.array_equal(reader.read(i, 1)["final"], full.read(i, 1)["final"])


def test_a_cache_of_the_previous_schema_is_refused_saying_how_to_rebuild(world, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(world["caches"]["zarr"], out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(m | {"schema_version": 1}))
    with pytest.raises(ManifestError) as e:
        CacheReader(out)
    assert str(e.value) == (f"{out}/manifest.json: schema_version 1 is not the supported 2 (an older cache: its "
                            f"per-sample metadata is not in the columnar index this version reads); rebuild it with "
                            f"this version: scalekd-pipeline cache-teacher JOB.yaml --overwrite")


def test_a_cache_and_its_dataset_moved_elsewhere_train_from_the_new_place(world, tmp_path):
    """Copy the cache, the dataset and the checkpoint to a new folder, delete the originals, and train
    there: --data-root and --teacher-checkpoint say where they are, each checked."""
    src = tmp_path / "src"
    data = make_imagefolder(src / "data", per_class=2, corrupt=False, seed=3)
    ckpt = shutil.copy(world["ckpt"], src / "teacher.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(tmp_path / "work"))
        run(make_spec(data, src / "cache", ckpt, fmt="webdataset", roles=FP32, samples_per_shard=4, per_image=2))
    dst = tmp_path / "elsewhere"
    shutil.copytree(src, dst)
    shutil.rmtree(src)
    spec = dict(name="t", cache=str(dst / "cache"), student="test_resnet", output=str(tmp_path / "run"),
                recipe="demo", epochs=1, batch_size=2, workers=0, student_input_size=64, device="cpu",
                verify_fingerprints=True)
    with pytest.raises(Exception) as e:  # the recorded places are gone
        train(TrainSpec(**spec), progress=False, log=lambda m: None)
    assert "does not exist" in str(e.value) or "cannot read" in str(e.value)
    result = train(TrainSpec(**spec, data_root=str(dst / "data"), teacher_checkpoint=str(dst / "teacher.safetensors")),
                   progress=False, log=lambda m: None)
    last = json.loads(Path(result["metrics"]).read_text().splitlines()[-1])
    assert last["samples"] == 6 and np.isfinite(last["train"]["loss"])
    # another dataset at the new place is refused by its listing
    other = make_imagefolder(tmp_path / "other", per_class=2, corrupt=False, classes=("ant", "bee", "cow"))
    with pytest.raises(CacheMismatchError, match="differ from those the cache"):
        train(TrainSpec(**spec | {"output": str(tmp_path / "run2")}, data_root=str(other),
                        teacher_checkpoint=str(dst / "teacher.safetensors")), progress=False, log=lambda m: None)
    # and another checkpoint by its sha256
    other_ckpt = save_checkpoint(tmp_path / "other.safetensors", seed=5)
    with pytest.raises(CacheMismatchError, match="but the cache was made from sha256"):
        train(TrainSpec(**spec | {"output": str(tmp_path / "run3")}, data_root=str(dst / "data"),
                        teacher_checkpoint=str(other_ckpt)), progress=False, log=lambda m: None)


def _tar_dataset(root: Path) -> Path:
    """A webdataset of 4 samples, each with timm/HF-style side members (.json, .txt) and one stray member."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(root / "train-000.tar", "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(buf, format="PNG")
            add(f"s{i}.png", buf.getvalue())
            add(f"s{i}.cls", str(i % 2).encode())
            add(f"s{i}.json", b'{"caption": "x"}')
            add(f"s{i}.txt", b"a photo")
        add("stray.txt", b"belongs to no sample")
    return root


def test_webdataset_side_members_are_not_skips_and_images_are_read_by_offset(tmp_path):
    root = _tar_dataset(tmp_path / "wds")
    refs, _, skipped = list_dataset({"kind": "webdataset", "urls": str(root / "train-000.tar")})
    assert len(refs) == 4
    assert [s["member"] for s in skipped] == ["stray.txt"]  # only the member of no sample
    for ref in refs:
        assert ref.span is not None
        by_member = load_image(SampleRef(ref.index, ref.key, ref.label, ref.source, ref.member))  # the tar's headers
        assert np.array_equal(np.asarray(load_image(ref)), np.asarray(by_member))


def test_a_webdataset_input_cache_replays_its_views_by_offset(tmp_path):
    """Views replayed from input tars read by recorded offset reproduce the teacher's fingerprints."""
    root = _tar_dataset(tmp_path / "wds")
    ckpt = save_checkpoint(tmp_path / "teacher.safetensors")
    spec = make_spec(tmp_path, tmp_path / "cache", ckpt, roles=FP32, samples_per_shard=3, per_image=2)
    spec.dataset = {"kind": "webdataset", "urls": str(root / "train-{000..000}.tar")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(tmp_path / "work"))
        run(spec)
    reader = CacheReader(tmp_path / "cache")
    assert reader.manifest["dataset"]["relative_spec"]["urls"] == ["train-{000..000}.tar"]
    t = reader.manifest["teacher"]
    for i in range(len(reader)):
        s = reader[i]
        assert s["span"] is not None and s["source"] == str(root / "train-000.tar")
        for v in range(2):
            pixels = render_view(load_image(SampleRef.from_sample(s)), ViewParams.from_array(s["views"][v]),
                                 tuple(t["input_size"][1:]), t["interpolation"])
            assert fingerprint(pixels) == s["fingerprints"][v]


def test_persistent_workers_read_each_epochs_view_in_the_same_order_as_before(world):
    """One DataLoader for the whole run, its workers kept: the index carries the epoch, so epoch e
    reads view e mod K; the order is RandomSampler's for the same seed (resumes replay it)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from pipeline.train_data import EpochOrder, ModelInput, ViewDataset, collate_skipping

    reader = CacheReader(world["caches"]["zarr"])
    mi = ModelInput((32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3)
    data = ViewDataset(reader, mi, mi)
    order = EpochOrder(len(data), seed=7)
    loader = DataLoader(data, batch_size=3, sampler=order, num_workers=2, persistent_workers=True,
                        collate_fn=collate_skipping, multiprocessing_context="fork")
    for epoch in range(3):
        order.set_epoch(epoch)
        items = [b for b in loader]
        seen = torch.cat([b["index"] for b in items]).tolist()
        expected = list(RandomSampler(data, generator=torch.Generator().manual_seed(7 * 100_003 + epoch)))
        assert seen == expected
        assert {int(v) for b in items for v in b["view"]} == {epoch % 2}
        i = seen[0]
        assert np.array_equal(items[0]["final"][0].numpy(), reader.read(i, epoch % 2)["final"])


def test_every_codecs_fields_take_the_fast_zarr_path(tmp_path):
    """int8 fields (whose bytes codec names no endianness) are read by pread too, and equal zarr's own read."""
    from pipeline.schema import CODECS, RoleSpec, encode
    from pipeline.stores import zarr_store

    for codec in CODECS:
        spec = {"final": RoleSpec("final", (4, 6), codec)}
        fields = encode(spec["final"], np.random.default_rng(0).standard_normal((2, 2, 4, 6), dtype=np.float32))
        zarr_store.write_shard(tmp_path / codec, spec, fields, [{}] * 2, 2)
        shard = zarr_store.open_shard(tmp_path / codec, spec)
        got = shard.read(1, 1)
        assert all(f.fd is not None for f in shard._fields.values()), codec
        for name, a in got.items():
            assert np.array_equal(a, zarr.open_array(str(tmp_path / codec / name), mode="r")[1, 1]), (codec, name)


def test_verify_names_a_damaged_consolidated_index_and_the_reader_refuses_a_cut_one(world, tmp_path):
    from pipeline.inspect_cache import verify

    out = tmp_path / "cache"
    shutil.copytree(world["caches"]["zarr"], out)
    blob = out / "index" / "key.bin"
    raw = bytearray(blob.read_bytes())
    raw[0] ^= 0x01
    blob.write_bytes(bytes(raw))
    assert verify(out)["problems"] == ["index/key.bin: checksum mismatch"]
    blob.write_bytes(bytes(raw[:-3]))
    assert verify(out)["problems"] == [f"index/key.bin: {len(raw) - 3} bytes, expected {len(raw)}"]
    with pytest.raises(ManifestError) as e:
        CacheReader(out)
    assert str(e.value) == (f"{out}: cannot open the sample index ({out}/index/key.bin is {len(raw) - 3} bytes, "
                            f"manifest.json records {len(raw)}); run inspect-shards --verify")


def test_an_index_folder_that_is_not_a_sample_index_is_never_removed(world, tmp_path):
    """`index/` belongs to a cache only while it holds nothing but the index's columns: a user's folder
    of that name refuses the job (nothing removed); the cache's own, unrecorded one is redone."""
    from pipeline.cache_job import CacheConfigError

    out = tmp_path / "cache"
    shutil.copytree(world["caches"]["zarr"], out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(m | {"index": None}))  # as if killed before recording it
    spec = make_spec(world["data"], out, world["ckpt"], fmt="zarr", roles=FP32, samples_per_shard=2, per_image=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(world["root"] / "work"))
        assert run(spec)["complete"] is True
        assert json.loads((out / "manifest.json").read_text())["index"]["samples"] == 9
        (out / "index" / "notes.txt").write_text("mine")
        with pytest.raises(CacheConfigError, match="holds 'index'"):
            run(spec, overwrite=True)
    assert (out / "index" / "notes.txt").read_text() == "mine"
