"""The caching job (engine='local'): what a cache holds, that it is exactly the teacher on the replayed
views, that it is written exactly once (stopped, junk left, SIGKILLed), and that bad input gives a
clear error and loses nothing. Ray runs are in test_cache_ray.py, inspect-shards in test_inspect.py."""
from __future__ import annotations

import errno
import hashlib
import importlib.metadata as md
import io
import json
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from _cache_helpers import (CORRUPT_KEY, FINAL_SHAPE, FP32, LOGITS_SHAPE, MID_SHAPE, TEACHER_KWARGS, TEACHER_NAME,
                            all_keys, committed, file_sums, load_split, make_imagefolder, make_spec, manifest, replay,
                            run, save_checkpoint, shard_sums, shard_temporaries, start_job_subprocess, sigkill_when,
                            temporaries, view_config)
from pipeline.cache_job import CacheConfigError
from pipeline.datasets import DatasetError, list_dataset, load_image
from pipeline.inspect_cache import verify
from pipeline.reader import CacheReader
from pipeline.sample_index import SampleIndex, index_files
from pipeline.shards import CacheWriteError, verify_shard
from pipeline.stores import STORES
from pipeline.views import ViewParams, fingerprint, sample_views


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    """Scratch (Ray temp, exported weights) goes to a tmp folder, never into the repository."""
    monkeypatch.setenv("SCALEKD_WORK", str(tmp_path / "work"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny ImageFolder (3 classes × 3 images + 1 corrupt file), the teacher's checkpoint, and an
    uninterrupted fp32 cache of it in each format (3 samples a shard → 4 shards, 3 views an image)."""
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data")
        ckpt = save_checkpoint(root / "teacher.safetensors")
        out = {}
        for fmt in ("zarr", "webdataset"):
            spec = make_spec(data, root / f"ref-{fmt}", ckpt, fmt=fmt)
            out[fmt] = SimpleNamespace(spec=spec, root=root / f"ref-{fmt}", summary=run(spec))
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, zarr=out["zarr"], wds=out["webdataset"],
                           by_format=out, split=load_split(ckpt))


def _spec(base, out, **kw):
    return make_spec(base.data, out, base.ckpt, **kw)


def _listed_keys(data) -> list[str]:
    refs, _, _ = list_dataset({"kind": "imagefolder", "root": str(data)})
    return [r.key for r in refs]


# ---------------------------------------------------------------------------------------------- what a cache holds


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_job_completes_and_its_summary_counts_what_was_written(base, fmt):
    s = base.by_format[fmt].summary
    assert s["complete"] is True and s["format"] == fmt
    assert s["samples"] == 9 and s["views"] == 27 and s["shards"] == 4 and s["skipped"] == 1
    assert s["new_samples"] == 9 and s["shards_per_teacher_node"] == {"local": 4}
    m = manifest(base.by_format[fmt].root)
    assert s["bytes_on_disk"] == sum(x["bytes"] for x in m["shards"]) > 0


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_manifest_records_teacher_views_roles_shards_skipped_and_versions(base, fmt):
    root = base.by_format[fmt].root
    m = manifest(root)
    info = base.split.info
    assert m["format"] == fmt and m["complete"] is True and m["schema_version"] == 2
    # teacher: name, the checkpoint's real sha256, the split and the preprocessing
    t = m["teacher"]
    assert t["name"] == TEACHER_NAME and t["kwargs"] == TEACHER_KWARGS
    assert t["checkpoint"] == str(base.ckpt)
    assert t["checkpoint_sha256"] == hashlib.sha256(base.ckpt.read_bytes()).hexdigest()
    assert t["split_point"] == info.split_point == "blocks.1"
    assert t["input_size"] == list(info.input_size) == [3, 64, 64]
    assert t["mean"] == list(info.mean) and t["std"] == list(info.std)
    assert t["interpolation"] == info.interpolation == "bicubic"
    assert tuple(t["final_hw"]) == (4, 4) and t["num_prefix_tokens"] == 1
    # views: the sampling config and its seed
    v = m["views"]
    assert v["per_image"] == 3 and v["seed"] == 1 and list(v["scale"]) == [0.25, 1.0] and v["flip"] == 0.5
    assert v["fields"] == ["top", "left", "height", "width", "flip"]
    # roles: shapes, codec, stored dtypes
    assert set(m["roles"]) == {"final", "mid", "logits"}
    for role, shape in (("final", FINAL_SHAPE), ("mid", MID_SHAPE), ("logits", LOGITS_SHAPE)):
        r = m["roles"][role]
        assert tuple(r["shape"]) == shape and r["codec"] == "fp32"
        assert r["fields"] == {role: {"shape": list(shape), "dtype": "float32"}}
    # counts and shards
    assert m["num_samples"] == 9 and m["num_views"] == 3 and m["num_shards_expected"] == 4
    assert m["dataset"]["listed"] == 10 and m["dataset"]["classes"] == ["cat", "dog", "eel"]
    assert [s["name"] for s in m["shards"]] == [f"shard-{i:05d}" for i in range(4)]
    assert [(s["start"], s["end"]) for s in m["shards"]] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [s["samples"] for s in m["shards"]] == [3, 3, 3, 0]  # the last shard's only image is the corrupt one
    # the consolidated columnar index: every file checksummed; sources relative to the recorded dataset root
    assert m["dataset"]["root"] == str(base.data) and m["dataset"]["relative_spec"]["root"] == "."
    assert m["index"]["samples"] == 9 and sorted(m["index"]["files"]) == sorted(index_files())
    for name, f in m["index"]["files"].items():
        assert hashlib.sha256((root / "index" / name).read_bytes()).hexdigest() == f["sha256"]
    index = SampleIndex.open(root / "index")
    assert index.string("source", 0) == index.string("key", 0) .split("/")[0] + "/" + Path(index.string("source", 0)).name
    assert not Path(index.string("source", 0)).is_absolute() and (base.data / index.string("source", 0)).is_file()
    for s in m["shards"]:
        assert s["bytes"] > 0 and len(s["sha256"]) == 64
        meta = json.loads((root / s["name"] / "shard.json").read_text())
        assert s["bytes"] == sum(f["bytes"] for f in meta["files"].values())
        for rel, f in meta["files"].items():
            assert (root / s["name"] / rel).stat().st_size == f["bytes"]
            assert hashlib.sha256((root / s["name"] / rel).read_bytes()).hexdigest() == f["sha256"]
        assert verify_shard(root, s) == []
    # the corrupt input: skipped, with its reason; the job went on
    assert len(m["skipped"]) == 1
    assert m["skipped"] == [{"key": CORRUPT_KEY, "source": str(base.data / "eel" / "zz_broken.jpg"),
                             "reason": "cannot decode image: Truncated File Read"}]
    # package versions
    for pkg in ("torch", "timm", "numpy", "zarr", "numcodecs", "webdataset"):
        assert m["versions"][pkg] == md.version(pkg)
    assert m["versions"]["python"].count(".") == 2


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_every_stored_view_is_the_teacher_on_the_replayed_view(base, fmt):
    """fp32: final/mid/logits equal the teacher recomputed on the replayed pixels; fingerprints match."""
    reader = CacheReader(base.by_format[fmt].root)
    assert len(reader) == 9 and reader.num_views == 3
    info = base.split.info
    for i in range(len(reader)):
        s = reader[i]
        image = load_image(SimpleNamespace(**{"source": s["source"], "member": s.get("member")}))
        # the stored parameters are the ones sampled from the seeded RNG, keyed by the sample's key
        expected = sample_views(s["key"], image.size, view_config(3))
        assert [ViewParams.from_array(v) for v in s["views"]] == expected
        for v in range(3):
            pixels, live = replay(base.split, s, v)
            assert pixels.shape == (64, 64, 3)
            assert s["fingerprints"][v] == fingerprint(pixels)
            stored = reader.read(i, v)
            assert stored["final"].shape == FINAL_SHAPE and stored["final"].dtype == np.float32
            assert stored["mid"].shape == MID_SHAPE and stored["logits"].shape == LOGITS_SHAPE
            for role in ("final", "mid", "logits"):
                np.testing.assert_allclose(stored[role], live[role], rtol=1e-5, atol=1e-5, err_msg=f"{s['key']} {v} {role}")
        assert info.input_size == (3, 64, 64)


def test_flipped_views_are_computed_by_the_teacher_not_mirrored(base):
    reader = CacheReader(base.zarr.root)
    flipped = [(i, v) for i in range(len(reader)) for v in range(3) if reader[i]["views"][v][4] == 1.0]
    assert 3 <= len(flipped) < 27  # flip = 0.5 over 27 views
    hw = base.split.info.final_hw
    for i, v in flipped:
        s = reader[i]
        pixels, live = replay(base.split, s, v)
        stored = reader.read(i, v)["final"]
        np.testing.assert_allclose(stored, live["final"], rtol=1e-5, atol=1e-5)
        # the same crop, unflipped: its pixels are the mirror image ...
        unflipped = s | {"views": [list(s["views"][v][:4]) + [0.0]]}
        pixels0, live0 = replay(base.split, unflipped, 0)
        np.testing.assert_array_equal(pixels, pixels0[:, ::-1])
        # ... but its features mirrored in token space are NOT the flipped view's features
        mirrored = live0["final"].reshape(*hw, -1)[:, ::-1].reshape(stored.shape)
        assert not np.allclose(stored, mirrored, rtol=1e-2, atol=1e-2)
        assert np.abs(stored - mirrored).max() > 0.05 * np.abs(stored).max()


def test_zarr_and_webdataset_caches_of_one_job_decode_identically(base):
    a, b = CacheReader(base.zarr.root), CacheReader(base.wds.root)
    assert len(a) == len(b) == 9
    for i in range(len(a)):
        drop = ("shard", "row")
        assert {k: v for k, v in a[i].items() if k not in drop} == {k: v for k, v in b[i].items() if k not in drop}
        for v in range(3):
            ra, rb = a.read(i, v), b.read(i, v)
            for role in ("final", "mid", "logits"):
                np.testing.assert_array_equal(ra[role], rb[role])


def test_webdataset_tars_hold_only_zstd_npy_and_json(base):
    """Every array entry is a role's .npy file(s), a zstd frame each (one here: fp32 roles; no pickle
    anywhere); its crc32 in entries.npy is of the stored, compressed bytes."""
    from numcodecs import Zstd

    root = base.wds.root
    tars = sorted(root.glob("shard-*/v*.tar"))
    assert len(tars) == 4 * 3
    seen_npy = 0
    for path in tars:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for m in members:
                assert m.isfile(), m.name
                assert m.name.endswith((".npy.zst", ".json")), m.name
                data = tar.extractfile(m).read()
                if m.name.endswith(".npy.zst"):
                    assert data[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
                    a = np.load(io.BytesIO(Zstd().decode(data)), allow_pickle=False)
                    assert a.dtype == np.float32
                    seen_npy += 1
                else:
                    meta = json.loads(data)
                    assert set(meta) >= {"key", "label", "view", "fingerprint"}
    assert seen_npy == 27 * 3  # every view of every sample, three roles


def test_webdataset_manifest_names_the_compressor_it_uses(base):
    m = manifest(base.wds.root)
    assert all(r["compressor"].startswith("zstd(level=3, checksum) over each of the role's .npy files, a frame each")
               for r in m["roles"].values())
    assert ".npy.zst" in m["layout"]["shard"]


def test_webdataset_tars_are_byte_identical_across_runs(base, tmp_path):
    out = tmp_path / "again"
    run(_spec(base, out, fmt="webdataset"))
    for path in sorted(base.wds.root.glob("shard-*/*")):
        if path.is_file():
            assert path.read_bytes() == (out / path.relative_to(base.wds.root)).read_bytes(), path.name


def test_zarr_reads_one_chunk_per_view(base):
    import zarr

    root = base.zarr.root
    for shard in manifest(root)["shards"]:
        n = shard["samples"]
        for role, shape in (("final", FINAL_SHAPE), ("mid", MID_SHAPE), ("logits", LOGITS_SHAPE)):
            a = zarr.open_array(str(root / shard["name"] / role), mode="r")
            assert a.shape == (n, 3, *shape)
            assert a.chunks == (1, 1, *shape)  # the unit of reading: one view of one sample
            assert a.shards == (n, 3, *shape)  # the unit of writing: the whole shard
            assert a.dtype == np.float32


def test_reader_refuses_a_view_or_role_it_does_not_hold(base):
    reader = CacheReader(base.zarr.root)
    with pytest.raises(IndexError, match="view 3 out of range"):
        reader.read(0, 3)
    fp16_free = reader.read(0, 0, ["logits"])
    assert list(fp16_free) == ["logits"]


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_lossy_codec_cache_round_trips_within_its_step(base, tmp_path, fmt):
    """int8dc on final, int8 on mid, fp16 on logits: decoded values are within their step bound of the fp32
    cache (int8: half a step; int8dc: one step, half of rounding and half of re-centring on the exact DC)."""
    out = tmp_path / "lossy"
    run(_spec(base, out, fmt=fmt, roles={"final": "int8dc", "mid": "int8", "logits": "fp16"}))
    m = manifest(out)
    assert set(m["roles"]["final"]["fields"]) == {"final_q", "final_scale", "final_dc"}
    lossy, exact = CacheReader(out), CacheReader(base.zarr.root)
    for i in range(len(lossy)):
        for v in range(3):
            a, b = lossy.read(i, v), exact.read(i, v)
            for role in ("final", "mid"):
                step = np.abs(b[role] - b[role].mean(0) if role == "final" else b[role]).max(0) / 127
                bound = 1.0 if role == "final" else 0.5
                assert (np.abs(a[role] - b[role]) <= step * bound * (1 + 1e-4) + 1e-6).all(), role
            np.testing.assert_allclose(a["final"].mean(0), b["final"].mean(0), rtol=0, atol=1e-5)  # the DC, exact
            np.testing.assert_array_equal(a["logits"], b["logits"].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------- exactly once


def test_stopped_after_one_shard_then_rerun_equals_an_uninterrupted_run(base, tmp_path):
    out = tmp_path / "resumed"
    spec = _spec(base, out)
    first = run(spec, max_shards=1)
    assert first["complete"] is False and first["shards"] == 1 and committed(out) == ["shard-00000"]
    assert manifest(out)["complete"] is False
    second = run(spec)
    assert second["complete"] is True and second["new_samples"] == 6
    assert shard_sums(out) == shard_sums(base.zarr.root)
    assert file_sums(out) == file_sums(base.zarr.root)
    assert sorted(all_keys(out)) == sorted(set(_listed_keys(base.data)) - {CORRUPT_KEY})


def test_rerun_of_a_complete_cache_writes_nothing(base, tmp_path):
    out = tmp_path / "again"
    spec = _spec(base, out)
    run(spec)
    before = {p: p.stat().st_mtime_ns for p in out.glob("shard-*/**/*") if p.is_file()}
    again = run(spec)
    assert again["new_samples"] == 0 and again["complete"] is True
    assert {p: p.stat().st_mtime_ns for p in out.glob("shard-*/**/*") if p.is_file()} == before


def test_rerun_of_the_same_spec_resumes_with_tuple_view_config(base, tmp_path):
    """Regression: the config compared with the manifest's went through JSON on one side only, so a spec
    with tuple-valued views.scale/ratio (the default, and what load_cache_spec makes of YAML lists) was
    refused as 'another configuration' on every re-run; fixed in 852f8f6 (_config round-trips JSON)."""
    out = tmp_path / "tuples"
    spec = _spec(base, out)
    assert isinstance(spec.views.scale, tuple) and isinstance(spec.views.ratio, tuple)
    run(spec, max_shards=1)
    assert run(spec)["complete"] is True
    assert shard_sums(out) == shard_sums(base.zarr.root)
    # a spec with lists (built by hand) is the same configuration too
    listed = replace(spec, views=replace(spec.views, scale=list(spec.views.scale), ratio=list(spec.views.ratio)))
    assert run(listed)["new_samples"] == 0


def test_half_written_shard_left_in_the_output_is_not_counted_and_is_removed(base, tmp_path):
    out = tmp_path / "junk"
    spec = _spec(base, out)
    run(spec, max_shards=1)
    junk = out / ".tmp-shard-00001-0badf00d"
    (junk / "final" / "c").mkdir(parents=True)
    (junk / "final" / "c" / "0").write_bytes(os.urandom(1000))
    (junk / "shard.json").write_text('{"name": "shard-00001", "index": 1')  # half a shard.json
    # not counted by a reader or by verify's shard list
    assert len(CacheReader(out)) == 3
    report = verify(out)
    assert report["shards"] == 1 and report["problems"] == [
        ".tmp-shard-00001-0badf00d: half-written shard left by an interrupted run (ignored; removed on the next run)",
        *(f"shard-0000{i}: never committed (the run did not finish; run the job again to resume)" for i in (1, 2, 3))]
    logs = []
    summary = run(spec, log=logs.append)
    assert logs[0] == "removed 1 half-written shard(s) from an interrupted run: .tmp-shard-00001-0badf00d"
    assert not junk.exists() and temporaries(out) == []
    assert summary["complete"] is True and summary["shards"] == 4
    assert shard_sums(out) == shard_sums(base.zarr.root)
    assert verify(out)["ok"] is True


@pytest.mark.parametrize("race", [False, True], ids=["already-committed", "committed-during-the-write"])
def test_a_retried_shard_write_keeps_the_committed_copy(base, tmp_path, monkeypatch, race):
    """A retried (Ray) task writing a shard that another attempt committed: the committed copy stays
    byte for byte, the retry's copy is discarded, no .tmp is left, and the same record is returned."""
    from dataclasses import asdict

    from pipeline.cache_job import TeacherForward, render_views, write_shard
    from pipeline.shards import shard_record

    out = tmp_path / "retry"
    shutil.copytree(base.zarr.root, out)
    before = file_sums(out)
    m = manifest(out)
    spec, info = base.zarr.spec, base.split.info
    task = {"shard": 1, "start": 3, "end": 6,
            "refs": json.dumps([asdict(r) for r in list_dataset(spec.dataset)[0][3:6]])}
    row = TeacherForward(spec.teacher, str(base.ckpt), list(spec.roles), 16)(
        render_views(task, spec.views, tuple(info.input_size[1:]), info.interpolation, m["dataset"]["root"]))
    specs = dict(m["roles"])
    if race:  # the shard appears (another attempt's rename) while this attempt writes its own copy
        committed_copy = tmp_path / "stash"
        shutil.move(out / "shard-00001", committed_copy)
        store, original = STORES["zarr"], STORES["zarr"].write_shard

        def write_then_lose_the_race(folder, *a, **k):
            original(folder, *a, **k)
            shutil.move(committed_copy, out / "shard-00001")

        monkeypatch.setattr(store, "write_shard", write_then_lose_the_race)
    result = json.loads(write_shard(row, str(out), "zarr", specs, 3, 3)["record"])
    assert result == m["shards"][1]
    assert shard_record(json.loads((out / "shard-00001" / "shard.json").read_text())) == m["shards"][1]
    assert file_sums(out) == before and temporaries(out) == []
    assert verify(out)["ok"] is True


def test_a_teacher_actor_called_from_several_threads_runs_one_forward_at_a_time(base):
    """A Ray teacher actor renders shards in some threads while its teacher runs in another: the
    forwards take turns (never two on the device at once) and give what they give in series."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import asdict

    from pipeline.cache_job import TeacherForward, render_views

    spec, info = base.zarr.spec, base.split.info
    refs = list_dataset(spec.dataset)[0]
    root = manifest(base.zarr.root)["dataset"]["root"]

    def rendered(shard):
        task = {"shard": shard, "start": 3 * shard, "end": 3 * shard + 3,
                "refs": json.dumps([asdict(r) for r in refs[3 * shard : 3 * shard + 3]])}
        return render_views(task, spec.views, tuple(info.input_size[1:]), info.interpolation, root)

    forward = TeacherForward(spec.teacher, str(base.ckpt), list(spec.roles), 4)
    series = [forward(rendered(i)) for i in range(3)]
    targets, active, most = forward.split.targets, [0], [0]
    lock = threading.Lock()

    def watched(x):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.02)  # long enough for another thread to enter if nothing stopped it
        try:
            return targets(x)
        finally:
            with lock:
                active[0] -= 1

    forward.split.targets = watched
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda i: forward(rendered(i)), range(3)))
    assert most[0] == 1
    for a, b in zip(series, together):
        for role in spec.roles:
            np.testing.assert_array_equal(a[role], b[role])


# --- SIGKILL in a subprocess, then a re-run

@pytest.fixture(scope="module")
def killable(tmp_path_factory):
    """24 images, 2 a shard (12 shards), 2 views each; and an uninterrupted run of it in-process."""
    root = tmp_path_factory.mktemp("kill")
    data = make_imagefolder(root / "data", classes=("ant", "bee", "cow"), per_class=8, corrupt=False, seed=5)
    ckpt = save_checkpoint(root / "teacher.safetensors")
    refs = {}
    for fmt in ("zarr", "webdataset"):
        spec = make_spec(data, root / f"ref-{fmt}", ckpt, fmt=fmt, samples_per_shard=2, per_image=2, batch_size=4)
        run(spec)
        refs[fmt] = shard_sums(root / f"ref-{fmt}")
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, refs=refs)


def _kill_and_resume(killable, tmp_path, fmt: str, after: int, mid_write: bool):
    """Start the job in a subprocess; SIGKILL it once `after` shards are committed (and, with mid_write,
    while the next shard sits written but uncommitted in its .tmp folder); re-run; compare."""
    out = tmp_path / "killed"
    spec = make_spec(killable.data, out, killable.ckpt, fmt=fmt, samples_per_shard=2, per_image=2, batch_size=4)
    proc = start_job_subprocess(spec, delay=0.3)
    sigkill_when(lambda: len(committed(out)) >= after and (not mid_write or shard_temporaries(out)), proc, "the job")
    done = committed(out)
    assert after <= len(done) < 12, done
    if mid_write:
        assert shard_temporaries(out), "the kill should have left a half-written shard"
    m = manifest(out)
    assert m["complete"] is False and len(m["shards"]) <= len(done)
    # the re-run: skips what is committed, redoes the rest, ends complete and identical
    logs = []
    summary = run(spec, log=logs.append)
    assert summary["complete"] is True and summary["shards"] == 12
    assert summary["new_samples"] == 24 - 2 * len(done)
    assert any("resuming" in line for line in logs)
    assert temporaries(out) == []
    assert shard_sums(out) == killable.refs[fmt]
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) == 24
    assert sorted(keys) == _listed_keys(killable.data)
    assert verify(out)["ok"] is True


@pytest.mark.parametrize("after,mid_write", [(1, True), (6, False)], ids=["after-1-mid-write", "after-6"])
def test_sigkilled_job_rerun_is_complete_and_identical(killable, tmp_path, after, mid_write):
    _kill_and_resume(killable, tmp_path, "zarr", after, mid_write)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("after,mid_write", [(1, False), (2, True), (4, True), (8, False), (10, True), (11, True)])
def test_sigkilled_job_rerun_is_complete_and_identical_more_moments(killable, tmp_path, fmt, after, mid_write):
    _kill_and_resume(killable, tmp_path, fmt, after, mid_write)


def _keys_in_shard_files(root: Path, fmt: str) -> list[str]:
    """Every sample key the committed shards hold, read from the store's own files (not the manifest):
    webdataset: the .json entry of each sample in each view's tar (all views must agree); zarr: the
    shard.json keys, each checked to have its row in every array."""
    import zarr

    keys = []
    for folder in sorted(root.glob("shard-*")):
        meta = json.loads((folder / "shard.json").read_text())
        index = SampleIndex.open(folder / "index")
        shard_keys = [index.string("key", i) for i in range(len(index))]
        assert len(index) == meta["num_samples"], folder.name
        if fmt == "webdataset":
            per_view = []
            for tar_path in sorted(folder.glob("v*.tar")):
                with tarfile.open(tar_path) as tar:
                    per_view.append([json.loads(tar.extractfile(m).read())["key"] for m in tar.getmembers()
                                     if m.name.endswith(".json")])
            assert all(v == per_view[0] for v in per_view), folder.name
            assert per_view[0] == shard_keys, folder.name
            keys += per_view[0]
        else:
            for role in ("final", "mid", "logits"):
                assert zarr.open_array(str(folder / role), mode="r").shape[0] == len(index), folder.name
            keys += shard_keys
    return keys


def _kill_repeatedly(killable, tmp_path, fmt: str, kills: int, seed: int) -> dict:
    """One job, SIGKILLed `kills` times at random moments and restarted after each, then run to the end.

    A moment: after 0 to 2 further shards commit (0: during start-up), half of the time while the
    next shard sits written but uncommitted, then a further random 0 to 0.4 s (inside the next
    shard's decode, teacher or write). Returns the figures: kills survived, samples lost, duplicates.
    """
    import random

    rng = random.Random(seed)
    out = tmp_path / "killed"
    spec = make_spec(killable.data, out, killable.ckpt, fmt=fmt, samples_per_shard=2, per_image=2, batch_size=4)
    survived = 0
    for _ in range(kills):
        target = min(len(committed(out)) + rng.randint(0, 2), 10)  # 12 shards: the job never ends first
        mid_write, jitter = rng.random() < 0.5, rng.uniform(0.0, 0.4)
        proc = start_job_subprocess(spec, delay=0.3)
        sigkill_when(lambda: len(committed(out)) >= target and (not mid_write or shard_temporaries(out)), proc, "the job",
                     jitter=jitter)
        survived += 1
        # after each kill: the manifest (once written) lists only intact, committed shards and is not complete
        if (out / "manifest.json").is_file():
            m = manifest(out)
            assert m["complete"] is False and {s["name"] for s in m["shards"]} <= set(committed(out))
            assert all(verify_shard(out, s) == [] for s in m["shards"])
    summary = run(spec)
    assert summary["complete"] is True and summary["shards"] == 12 and temporaries(out) == []
    assert shard_sums(out) == killable.refs[fmt]  # the exact cache an uninterrupted run writes
    assert verify(out)["ok"] is True
    m = manifest(out)
    listed = _listed_keys(killable.data)
    in_files = _keys_in_shard_files(out, fmt)
    assert m["num_samples"] == sum(s["samples"] for s in m["shards"]) == len(in_files) == len(listed) == 24
    return {"kills_survived": survived, "samples_lost": len(set(listed) - set(in_files)),
            "duplicates": len(in_files) - len(set(in_files))}


def test_job_killed_three_times_at_random_moments_loses_and_duplicates_nothing(killable, tmp_path, record_property):
    figures = _kill_repeatedly(killable, tmp_path, "zarr", kills=3, seed=0)
    for name, value in figures.items():
        record_property(name, value)
    print(figures)
    assert figures == {"kills_survived": 3, "samples_lost": 0, "duplicates": 0}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_job_killed_five_times_at_random_moments_loses_and_duplicates_nothing(killable, tmp_path, fmt, record_property):
    figures = _kill_repeatedly(killable, tmp_path, fmt, kills=5, seed=1)
    for name, value in figures.items():
        record_property(name, value)
    print(figures)
    assert figures == {"kills_survived": 5, "samples_lost": 0, "duplicates": 0}


def test_rerun_after_a_kill_before_the_first_manifest(base, tmp_path):
    import zarr

    out = tmp_path / "early-kill"
    zarr.open_group(str(out), mode="a", zarr_format=3)  # all that run_cache_job had written at that moment
    assert sorted(p.name for p in out.iterdir()) == ["zarr.json"]
    assert run(_spec(base, out))["complete"] is True


def test_rerun_removes_a_stale_manifest_temporary(base, tmp_path):
    out = tmp_path / "stale"
    spec = _spec(base, out)
    run(spec, max_shards=1)
    stale = out / ".manifest.json.tmp-999999"
    stale.write_text('{"format": "za')
    run(spec)
    assert not stale.exists()


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_dataset_folder_is_a_dataset_error_naming_it(base, tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as e:
        run(make_spec(empty, out, base.ckpt))
    assert str(empty) in str(e.value) and "empty" in str(e.value)
    assert not out.exists()


def test_unknown_teacher_is_refused_before_the_output_exists(base, tmp_path):
    out = tmp_path / "out"
    spec = replace(_spec(base, out), teacher={"name": "resnet50"})
    with pytest.raises(ValueError) as e:
        run(spec)
    msg = str(e.value)
    assert "unsupported teacher 'resnet50'" in msg
    for family in ("swin_*", "vit_*", "deit_*", "tf_efficientnet_lite*", "convnext_*"):
        assert family in msg
    assert not out.exists()


def test_missing_checkpoint_is_refused_before_the_output_exists(base, tmp_path):
    out = tmp_path / "out"
    spec = make_spec(base.data, out, tmp_path / "no-such.safetensors")
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        run(spec)
    assert not out.exists()


@pytest.mark.parametrize("change,key", [
    (dict(per_image=2), "views"),
    (dict(roles={"final": "fp16", "mid": "fp32", "logits": "fp32"}), "roles"),
    (dict(samples_per_shard=2), "samples_per_shard"),
    (dict(fmt="webdataset"), "format"),
])
def test_output_of_another_configuration_is_refused_untouched_and_overwrite_replaces_it(base, tmp_path, change, key):
    out = tmp_path / "cache"
    shutil.copytree(base.zarr.root, out)
    before, manifest_before = file_sums(out), (out / "manifest.json").read_bytes()
    other = _spec(base, out, **change)
    with pytest.raises(CacheConfigError) as e:
        run(other)
    msg = str(e.value)
    assert str(out) in msg and f"{key}:" in msg and "overwrite" in msg
    # only the differing key is named
    others = {"format", "views", "roles", "samples_per_shard", "teacher", "checkpoint_sha256"} - {key}
    assert not any(f"{k}: cache has" in msg for k in others), msg
    assert file_sums(out) == before and (out / "manifest.json").read_bytes() == manifest_before
    assert verify(out)["ok"] is True
    summary = run(other, overwrite=True)
    assert summary["complete"] is True
    m = manifest(out)
    assert m["config"] == json.loads(json.dumps(m["config"]))
    if key == "views":
        assert m["num_views"] == 2
    if key == "roles":
        assert m["roles"]["final"]["codec"] == "fp16"
    if key == "format":
        assert m["format"] == "webdataset" and not (out / "zarr.json").exists()
    assert verify(out)["ok"] is True


def test_nonempty_folder_without_a_manifest_is_refused(base, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(CacheConfigError) as e:
        run(_spec(base, out))
    assert str(out) in str(e.value) and "manifest.json" in str(e.value)
    assert (out / "holiday.jpg").read_bytes() == b"precious" and sorted(os.listdir(out)) == ["holiday.jpg"]


def test_output_that_is_a_file_is_refused(base, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    with pytest.raises(CacheConfigError, match="not a folder"):
        run(_spec(base, out))
    assert out.read_text() == "x"


def test_output_under_a_regular_file_is_a_cache_write_error(base, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "cache"
    with pytest.raises(CacheWriteError) as e:
        run(_spec(base, out))
    assert str(out) in str(e.value) and "cannot write to output" in str(e.value)


@pytest.mark.parametrize("url", ["s3://bucket/caches/t", "gs://bucket/t", "file:///tmp/t"])
def test_output_url_is_refused_naming_it(base, url):
    """Shards are committed by renaming folders: an object store (or fsspec URL) cannot hold a cache."""
    with pytest.raises(ValueError, match="is a URL") as e:
        _spec(base, url)
    assert url in str(e.value) and "every node mounts" in str(e.value)


def test_cli_output_url_exits_2_and_writes_nothing(base, tmp_path, monkeypatch):
    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    job = _yaml_spec(base, tmp_path / "job.yaml", tmp_path / "ignored")
    result = CliRunner().invoke(app, ["cache-teacher", str(job), "--engine", "local", "-o", "s3://bucket/cache"])
    assert result.exit_code == 2, result.output
    assert "'s3://bucket/cache' is a URL" in result.output
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "ignored").exists()  # no local folder "s3:"


def test_a_shard_committed_where_the_driver_cannot_see_it_is_a_clear_error(base, tmp_path, monkeypatch):
    """A cluster whose output folder is each node's own disk: the writer commits on its node, the
    driver does not find the shard; the error says the output must be a shared filesystem."""
    import pipeline.shards as shards

    other_node = tmp_path / "other-node"
    commit = shards.commit_shard
    monkeypatch.setattr(shards, "commit_shard", lambda root, *a, **k: commit(other_node, *a, **k))
    out = tmp_path / "out"
    with pytest.raises(CacheWriteError, match="every node mounts at the same path") as e:
        run(_spec(base, out))
    assert "shard-00000" in str(e.value) and str(out) in str(e.value)
    m = manifest(out)
    assert m["complete"] is False and m["shards"] == [] and committed(out) == []


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_disk_full_on_the_second_shard(base, tmp_path, monkeypatch, fmt):
    out = tmp_path / "full"
    spec = _spec(base, out, fmt=fmt)
    store = STORES[fmt]
    original, calls = store.write_shard, []

    def write_shard(folder, *a, **k):
        calls.append(folder.name)
        if len(calls) == 2:
            original(folder, *a, **k)  # some bytes land in the .tmp folder first
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(folder, *a, **k)

    monkeypatch.setattr(store, "write_shard", write_shard)
    with pytest.raises(CacheWriteError) as e:
        run(spec)
    assert str(e.value) == (f"cannot write shard shard-00001 under {out}: No space left on device; committed shards "
                            f"are intact, free space or fix permissions and run the job again to resume")
    assert calls[1].startswith(".tmp-shard-00001-")
    assert committed(out) == ["shard-00000"] and temporaries(out) == []
    m = manifest(out)
    assert m["complete"] is False and [s["name"] for s in m["shards"]] == ["shard-00000"]
    assert verify_shard(out, m["shards"][0]) == []
    monkeypatch.setattr(store, "write_shard", original)
    summary = run(spec)
    assert summary["complete"] is True and summary["new_samples"] == 6
    assert shard_sums(out) == shard_sums(base.by_format[fmt].root)


def test_nan_in_the_teacher_outputs_is_a_floating_point_error_naming_the_shard(base, tmp_path, monkeypatch):
    import pipeline.cache_job as cache_job

    real_load = cache_job.load_teacher
    calls = []

    def poisoned_load(*a, **k):
        split, sha = real_load(*a, **k)
        targets = split.targets

        def nan_on_second_shard(x):
            calls.append(len(x))
            out = targets(x)
            if len(calls) == 2:  # one batch per shard here (9 views ≤ batch_size 16)
                out["final"] = out["final"].clone()
                out["final"][0, 3, 5] = float("nan")
            return out

        split.targets = nan_on_second_shard
        return split, sha

    monkeypatch.setattr(cache_job, "load_teacher", poisoned_load)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError) as e:
        run(_spec(base, out))
    assert str(e.value) == (f"teacher {TEACHER_NAME} produced NaN/Inf in 'final' for shard-00001 (views 0..8 of the "
                            f"shard); refusing to cache it")
    assert committed(out) == ["shard-00000"] and temporaries(out) == []
    assert manifest(out)["complete"] is False


# ---------------------------------------------------------------------------------------------- CLI: cache-teacher


def _yaml_spec(base, path: Path, output: Path, **extra) -> Path:
    spec = {"name": "tiny", "dataset": {"kind": "imagefolder", "root": str(base.data)},
            "teacher": {"name": TEACHER_NAME, "checkpoint": str(base.ckpt), "late_blocks": 1,
                        "kwargs": dict(TEACHER_KWARGS)},
            "views": {"per_image": 3, "seed": 1, "scale": [0.25, 1.0], "ratio": [0.75, 4 / 3], "flip": 0.5},
            "output": str(output), "format": "zarr", "roles": dict(FP32), "samples_per_shard": 3, "batch_size": 16}
    path.write_text(yaml.safe_dump({"cache": spec | extra}))
    return path


def test_cli_cache_teacher_local_writes_the_cache_and_prints_the_summary(base, tmp_path):
    from pipeline.cli import app

    out = tmp_path / "cli-out"
    job = _yaml_spec(base, tmp_path / "job.yaml", tmp_path / "ignored")
    result = CliRunner().invoke(app, ["cache-teacher", str(job), "--engine", "local", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "complete: True" in result.output and "samples: 9" in result.output and "shards: 4" in result.output
    assert str(out) in result.output and not (tmp_path / "ignored").exists()
    # the same spec as the in-process run: the same shards
    assert shard_sums(out) == shard_sums(base.zarr.root)


def test_cli_cache_teacher_json_summary(base, tmp_path):
    from pipeline.cli import app

    out = tmp_path / "cli-json"
    job = _yaml_spec(base, tmp_path / "job.yaml", out, format="webdataset")
    result = CliRunner().invoke(app, ["cache-teacher", str(job), "--engine", "local", "--json", "-k", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "webdataset" and summary["views"] == 18 and summary["complete"] is True


def test_cli_cache_teacher_twice_on_the_same_spec_resumes(base, tmp_path):
    """`make cache-teacher` run again (to resume, or after it finished) goes on / does nothing, exit 0."""
    from pipeline.cli import app

    out = tmp_path / "twice"
    job = _yaml_spec(base, tmp_path / "job.yaml", out)
    runner = CliRunner()
    first = runner.invoke(app, ["cache-teacher", str(job), "--engine", "local"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["cache-teacher", str(job), "--engine", "local"])
    assert second.exit_code == 0, second.output
    assert "new_samples: 0" in second.output and "complete: True" in second.output
    assert shard_sums(out) == shard_sums(base.zarr.root)


@pytest.mark.parametrize("bad,named", [
    ({"sample_per_shard": 2}, "sample_per_shard"),
    ({"views": {"per_image": 2, "seeds": 3}}, "seeds"),
    ({"teacher": {"name": TEACHER_NAME, "weights": "x"}}, "weights"),
    ({"roles": {"final": "fp8", "logits": "fp16"}}, "fp8"),
])
def test_cli_cache_teacher_bad_spec_key_exits_2_naming_it(base, tmp_path, bad, named):
    from pipeline.cli import app

    out = tmp_path / "never"
    job = _yaml_spec(base, tmp_path / "job.yaml", out, **bad)
    result = CliRunner().invoke(app, ["cache-teacher", str(job), "--engine", "local"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and named in result.output
    assert not out.exists()


def test_cli_cache_teacher_missing_spec_file_exits_2(tmp_path):
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["cache-teacher", str(tmp_path / "nope.yaml"), "--engine", "local"])
    assert result.exit_code == 2 and "nope.yaml" in result.output


@pytest.mark.parametrize("command", [[], ["cache-teacher"], ["inspect-shards"], ["teacher-info"]])
def test_cli_help_exits_0(command):
    from pipeline.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command == ["inspect-shards"]:
        assert "--verify" in result.output and "--recompute" in result.output and "--plot" in result.output
    if command == ["cache-teacher"]:
        assert "--engine" in result.output and "--output" in result.output


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_overlapped_local_engine_writes_the_same_cache_as_the_stages_in_series(base, tmp_path, threads):
    """The local engine renders ahead in threads and writes in a writer thread; shards still reach
    the teacher and the disk in order, so the bytes equal the reference (made with the default)."""
    from pipeline.cache_job import run_cache_job

    out = tmp_path / f"t{threads}"
    summary = run_cache_job(_spec(base, out), engine="local", progress=False, log=lambda m: None,
                            local_threads=threads)
    assert summary["complete"] is True and summary["new_samples"] == base.zarr.summary["new_samples"]
    assert shard_sums(out) == shard_sums(base.zarr.root)


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_encoder_threads_write_byte_identical_shards(base, tmp_path, fmt):
    """Views are cast, compressed and files hashed in several threads (pipeline.encoding); results are
    gathered in order, so every file is byte for byte the one-thread file, for every codec."""
    from pipeline.cache_job import run_cache_job

    roles = {"final": "int8dc", "mid": "int8", "logits": "fp16"}
    sums = {}
    for encoders in (1, 3):
        out = tmp_path / f"e{encoders}"
        run_cache_job(_spec(base, out, fmt=fmt, roles=roles), engine="local", progress=False, log=lambda m: None,
                      local_encoders=encoders)
        sums[encoders] = file_sums(out)
    assert sums[1] and sums[1] == sums[3]


def test_local_engine_rendering_in_processes_writes_the_same_cache(base, tmp_path):
    from pipeline.cache_job import run_cache_job

    out = tmp_path / "p"
    summary = run_cache_job(_spec(base, out), engine="local", progress=False, log=lambda m: None,
                            local_threads=2, local_render="processes")
    assert summary["complete"] is True
    assert shard_sums(out) == shard_sums(base.zarr.root)
    with pytest.raises(ValueError, match=r"^render must be 'threads' or 'processes', got 'fibers'$"):
        run_cache_job(_spec(base, tmp_path / "f"), engine="local", progress=False, log=lambda m: None,
                      local_threads=2, local_render="fibers")


def test_a_failing_driver_closes_the_local_pipeline_and_commits_nothing_more(base, tmp_path, monkeypatch):
    """When the driver's own step fails (here: the manifest cannot be written), the local engine's
    render pool and writer are shut down at once: no shard beyond those already in flight lands."""
    import pipeline.ledger as cj

    real = cj.write_json_atomic
    calls = []

    def failing_manifest(path, data):
        calls.append(path)
        if len(calls) == 2:  # the first save after a shard came back
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(cj, "write_json_atomic", failing_manifest)
    monkeypatch.setattr(cj, "SAVE_EVERY", 1)  # a manifest write after every commit
    out = tmp_path / "closed"
    with pytest.raises(OSError, match="No space left on device"):
        run(_spec(base, out), local_threads=2)
    n_after_failure = len(committed(out))
    import time

    time.sleep(1.0)  # a writer left running would commit more shards by now
    assert len(committed(out)) == n_after_failure < 4
    assert temporaries(out) == []
    monkeypatch.setattr(cj, "write_json_atomic", real)
    assert run(_spec(base, out))["complete"] is True
    assert shard_sums(out) == shard_sums(base.zarr.root)


def test_teacher_actors_take_several_shards_at_once_where_ray_can(monkeypatch):
    """Ray 2.60's ActorPoolStrategy runs `calls` shards at once in an actor's threads; a Ray without
    that option gets one shard at a time per actor, and the job says so."""
    import ray.data

    from pipeline.cache_job import _teacher_pool

    logs = []
    pool = _teacher_pool(3, 4, logs.append)
    assert (pool.min_size, pool.max_size, pool.max_concurrent_calls_per_actor) == (3, 3, 4)
    assert pool.enable_true_multi_threading is True and logs == []
    assert _teacher_pool(2, 1, logs.append).max_concurrent_calls_per_actor is None and logs == []

    class OlderStrategy:  # the signature of ActorPoolStrategy before max_concurrent_calls_per_actor
        def __init__(self, *, size=None, min_size=None, max_size=None, max_tasks_in_flight_per_actor=None):
            self.size = size

    monkeypatch.setattr(ray.data, "ActorPoolStrategy", OlderStrategy)
    older = _teacher_pool(2, 4, logs.append)
    assert isinstance(older, OlderStrategy) and older.size == 2
    assert len(logs) == 1 and "one shard at a time" in logs[0] and "max_concurrent_calls_per_actor" in logs[0]
