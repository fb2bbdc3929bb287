"""Issue 11: inputs a hostile or careless user gives, each refused with a message that names the
key, the value and what was expected, and never losing or accepting damaged data.

Job specs are typed (pydantic): a wrong type, an unknown key or an out-of-range value is refused
when the spec is read, before any output exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.job_spec import load_cache_spec, load_train_spec

CACHE = ("cache:\n  name: x\n  dataset: {kind: imagefolder, root: data}\n  teacher: {name: vit_tiny_patch16_224}\n"
         "  output: out\n")


def _job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


# (extra lines of the cache section, or a whole file) → the exact refusal after "job spec JOB: "
SPEC_CASES = {
    "per_image a word": (CACHE + "  views: {per_image: four}\n",
                         "cache.views.per_image: expected an integer, found 'four' (a string)"),
    "per_image a fraction": (CACHE + "  views: {per_image: 2.5}\n",
                             "cache.views.per_image: expected an integer, found 2.5 (a number)"),
    "per_image 0": (CACHE + "  views: {per_image: 0}\n", "cache.views.per_image: expected at least 1, found 0"),
    "samples_per_shard a string": (CACHE + "  samples_per_shard: '3'\n",
                                   "cache.samples_per_shard: expected an integer, found '3' (a string)"),
    "views a number": (CACHE + "  views: 4\n", "cache.views: expected a mapping, found 4 (an integer)"),
    "roles a list": (CACHE + "  roles: [final, logits]\n",
                     "cache.roles: expected a mapping, found ['final', 'logits'] (a list)"),
    "file is a list": ("- a\n- b\n", "expected a mapping with a 'cache:' section, found a list ['a', 'b']"),
    "file is a string": ("hello\n", "expected a mapping with a 'cache:' section, found a string 'hello'"),
    "cache a number": ("cache: 5\n", "'cache' must be a mapping of settings, found an integer 5"),
    "compression_level 99": (CACHE + "  compression_level: 99\n", "cache.compression_level: expected at most 22, found 99"),
    "unknown top-level key": (CACHE + "distil: {}\n", "unknown top-level key(s) ['distil']; expected 'cache' and/or 'distill'"),
    "unknown cache key": (CACHE + "  sampels_per_shard: 3\n", "cache.sampels_per_shard: unknown key"),
    "teacher keys": (CACHE.replace("{name: vit_tiny_patch16_224}", "{nam: v, late_blocks: two}"),
                     "cache.teacher.name: missing; cache.teacher.late_blocks: expected an integer, found 'two' "
                     "(a string); cache.teacher.nam: unknown key"),
    "scale reversed": (CACHE + "  views: {scale: [0.9, 0.2]}\n",
                       "cache.views: views.scale must satisfy 0 < lo <= hi <= 1, got (0.9, 0.2)"),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_a_wrong_cache_spec_is_refused_naming_key_value_and_expectation(tmp_path, case):
    text, message = SPEC_CASES[case]
    job = _job(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_cache_spec(job)
    assert str(e.value) == f"job spec {job}: {message}"


DISTILL = "distill: {name: t, cache: c, student: s, output: o, "


@pytest.mark.parametrize("extra,message", [
    ("batch_size: 0}", "distill.batch_size: expected at least 1, found 0"),
    ("epochs: 0}", "distill.epochs: expected at least 1, found 0"),
    ("lr: fast}", "distill.lr: expected a number, found 'fast' (a string)"),
    ("targets: teacher}", "distill.targets: expected 'cache' or 'online', found 'teacher'"),
    ("epoch: 3}", "distill.epoch: unknown key"),
])
def test_a_wrong_distill_spec_is_refused_naming_key_value_and_expectation(tmp_path, extra, message):
    job = _job(tmp_path, DISTILL + extra + "\n")
    with pytest.raises(ValueError) as e:
        load_train_spec(job)
    assert str(e.value) == f"job spec {job}: {message}"


def test_the_shipped_job_specs_keep_their_values_and_yaml_lists_become_tuples():
    spec = load_cache_spec("jobs/demo.yaml")
    assert spec.views.scale == (0.25, 1.0) and isinstance(spec.views.ratio, tuple)
    assert spec.samples_per_shard == 32 and spec.teacher == {"name": "tf_efficientnet_lite0",
                                                             "checkpoint": "builtin:efficientnet-lite0"}
    assert load_train_spec("jobs/demo.yaml").student_input_size == 112


# ================================================================================================ the six cases
# A tiny ImageFolder (3 classes × 3 images), the tiny teacher, and an uninterrupted cache of it in
# each format (3 samples a shard → 3 shards, 2 views an image).

import json
import os
import shutil
import socket
from types import SimpleNamespace

from typer.testing import CliRunner

from _cache_helpers import (committed, make_imagefolder, make_spec, manifest, run, save_checkpoint, shard_sums,
                            shard_temporaries, start_job_subprocess, temporaries, wait_for)
from pipeline.cache_job import CacheConfigError
from pipeline.inspect_cache import verify
from pipeline.job_spec import TrainSpec
from pipeline.output_guard import OutputBusyError, OutputLock
from pipeline.shards import CacheWriteError
from pipeline.trainer import IncompleteCacheError, RunFolderError, train

STARTED = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}"


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEKD_WORK", str(tmp_path / "work"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data", corrupt=False)
        ckpt = save_checkpoint(root / "teacher.safetensors")
        caches = {}
        for fmt in ("zarr", "webdataset"):
            caches[fmt] = root / f"ref-{fmt}"
            run(make_spec(data, caches[fmt], ckpt, fmt=fmt, per_image=2))
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, caches=caches)


def _spec(base, out, **kw):
    kw.setdefault("per_image", 2)
    return make_spec(base.data, out, base.ckpt, **kw)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder → its bytes (the lock file aside: it records who last held it)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------------------------------------- 1. --overwrite

def test_overwrite_never_deletes_a_folder_that_is_not_a_cache(base, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(CacheConfigError) as e:
            run(_spec(base, out), overwrite=overwrite)
        assert str(e.value) == (f"output {out} holds 'holiday.jpg' and 1 more, which is not part of a cache (expected "
                                f"only manifest.json, zarr.json, index/ and shard-NNNNN folders); refusing to write a cache into "
                                f"it, with or without --overwrite: choose an empty or new folder")
    assert _tree(out) == {"holiday.jpg": b"precious", "notes.txt": b"mine"}


def test_overwrite_of_a_cache_holding_a_foreign_file_removes_nothing(base, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(base.caches["zarr"], out)
    (out / "README.txt").write_text("the user's notes")
    before = _tree(out)
    with pytest.raises(CacheConfigError, match=r"holds 'README.txt', which is not part of a cache"):
        run(_spec(base, out, per_image=3), overwrite=True)
    assert _tree(out) == before


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_overwrite_of_a_cache_with_a_foreign_file_inside_a_shard_removes_nothing(base, tmp_path, fmt):
    out = tmp_path / "cache"
    shutil.copytree(base.caches[fmt], out)
    (out / "shard-00001" / "my-notes.txt").write_text("the user's notes")
    before = _tree(out)
    with pytest.raises(CacheConfigError) as e:
        run(_spec(base, out, fmt=fmt, per_image=3), overwrite=True)
    assert str(e.value) == (f"{out / 'shard-00001'} holds 'my-notes.txt', which the cache job did not write; --overwrite "
                            f"removes the cache's shard folders whole, so nothing was removed: move it out of "
                            f"{out / 'shard-00001'} and run again")
    assert _tree(out) == before


def test_a_dot_tmp_entry_the_job_did_not_name_is_the_users_and_is_kept(base, tmp_path):
    from pipeline.output_guard import is_temporary

    assert [n for n in (".tmp-shard-00003-0badf00d", ".tmp-index-1a2b3c4d", ".manifest.json.tmp-4242", ".tmp-notes",
                        ".tmp-shard-00003", ".manifest.json.tmp-x", ".tmp-index-1A2B3C4D") if is_temporary(n)] == [
        ".tmp-shard-00003-0badf00d", ".tmp-index-1a2b3c4d", ".manifest.json.tmp-4242"]
    out = tmp_path / "cache"
    shutil.copytree(base.caches["zarr"], out)
    (out / ".tmp-notes").mkdir()
    (out / ".tmp-notes" / "mine.txt").write_text("the user's")
    (out / ".tmp-shard-00001-0badf00d").mkdir()  # a killed writer's: removed by the re-run
    before = _tree(out)
    with pytest.raises(CacheConfigError, match=r"holds '.tmp-notes', which is not part of a cache"):
        run(_spec(base, out))
    assert _tree(out) == before and (out / ".tmp-shard-00001-0badf00d").is_dir()
    (out / ".tmp-notes" / "mine.txt").rename(tmp_path / "mine.txt")
    (out / ".tmp-notes").rmdir()
    assert run(_spec(base, out))["new_samples"] == 0 and not (out / ".tmp-shard-00001-0badf00d").exists()


def test_what_a_shard_holds_is_the_jobs_own_by_its_record_or_else_by_the_stores_layout(base, tmp_path):
    from pipeline.output_guard import shard_foreign_files

    for fmt in ("zarr", "webdataset"):
        out = tmp_path / fmt
        shutil.copytree(base.caches[fmt], out)
        shard = out / "shard-00000"
        assert shard_foreign_files(shard) == []
        (shard / "shard.json").write_text("")  # unreadable: the stores' layout decides
        assert shard_foreign_files(shard) == []
        (shard / "index" / "extra.npy").write_bytes(b"x")
        (shard / "mine").mkdir()
        (shard / "mine" / "zarr.json").write_text("{}")  # the layout of an array's metadata: not told apart
        (shard / "mine" / "notes.txt").write_text("mine")
        os.symlink(tmp_path, shard / "link")
        assert shard_foreign_files(shard) == ["index/extra.npy", "link", "mine/notes.txt"]
        (shard / "shard.json").write_bytes((base.caches[fmt] / "shard-00000" / "shard.json").read_bytes())
        assert shard_foreign_files(shard) == ["index/extra.npy", "link", "mine/notes.txt", "mine/zarr.json"]


def test_a_damaged_shard_holding_a_foreign_file_is_kept_and_named(base, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(base.caches["zarr"], out)
    (out / "shard-00000" / "logits" / "zarr.json").unlink()
    (out / "shard-00002" / "shard.json").write_text("")
    (out / "shard-00002" / "keep.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(CacheConfigError) as e:
        run(_spec(base, out))
    assert str(e.value) == (f"{out / 'shard-00002'} holds 'keep.txt', which the cache job did not write; the damaged "
                            f"shards would be removed to be cached again, so nothing was removed: move it out of "
                            f"{out / 'shard-00002'} and run again")
    assert _tree(out) == before  # shard-00000, damaged too, is not removed either


def test_overwrite_removes_only_the_cache_it_replaces(base, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(base.caches["zarr"], out)
    logs = []
    assert run(_spec(base, out, per_image=3), overwrite=True, log=logs.append)["complete"] is True
    assert any(m.startswith(f"--overwrite: removed the cache of another configuration from {out}") for m in logs)
    assert manifest(out)["num_views"] == 3 and verify(out)["ok"] is True


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_an_output_at_the_dataset_is_refused_before_anything_is_read(base, tmp_path, where):
    data = tmp_path / "data"
    shutil.copytree(base.data, data)
    out = {"is": data, "inside": data / "cat" / "cache", "contains": tmp_path}[where]
    before = _tree(data)
    with pytest.raises(CacheConfigError) as e:
        run(make_spec(data, out, base.ckpt), overwrite=True)
    words = {"is": "is the dataset root", "inside": "is inside the dataset root", "contains": "contains the dataset root"}
    assert str(e.value) == (f"output {out} {words[where]} {data}; a cache must live outside the data it is made from "
                            f"(choose another output)")
    assert _tree(data) == before and not (data / "cat" / "cache").exists()


def test_cli_output_dot_with_overwrite_keeps_the_working_folders_files(base, tmp_path, monkeypatch):
    from pipeline.cli import app

    work = tmp_path / "home"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"cache": _spec(base, "unused").to_dict()}))
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["cache-teacher", str(job), "--engine", "local", "-o", ".", "--overwrite"])
    assert result.exit_code == 1, result.output
    assert f"error: output {work} holds 'thesis.tex', which is not part of a cache" in result.output
    assert _tree(work) == {"thesis.tex": b"years of work"}


# ---------------------------------------------------------------------------------------------- 2. two jobs, one output

def test_a_second_cache_job_on_a_running_ones_output_is_refused_and_touches_nothing(base, tmp_path):
    """The first job (a subprocess) holds each shard uncommitted for a while; the second starts while
    a .tmp-shard is live. It used to remove it and both 'completed' a corrupt cache."""
    out = tmp_path / "busy"
    spec = _spec(base, out)
    proc = start_job_subprocess(spec, delay=1.0)
    try:
        assert wait_for(lambda: bool(shard_temporaries(out)), proc), proc.communicate(timeout=60)
        live = shard_temporaries(out)
        with pytest.raises(OutputBusyError) as e:
            run(spec)
        assert re.fullmatch(rf"output {re.escape(str(out))} is in use by another cache job \(host "
                            rf"{re.escape(socket.gethostname())}, pid {proc.pid}, started {STARTED}\); wait for it to "
                            rf"end, or choose another output", str(e.value)), str(e.value)
        # the live temporary was not removed: it is still there, or the first job committed it
        assert all((out / t).exists() or (out / t[len(".tmp-"):-len("-0badf00d")]).is_dir() for t in live)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "FINISHED" in stdout, stderr[-3000:]
    assert manifest(out)["complete"] is True and verify(out)["ok"] is True
    assert shard_sums(out) == shard_sums(base.caches["zarr"])
    assert run(spec)["new_samples"] == 0  # the lock is free once the job has ended


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_a_shard_whose_arrays_are_not_all_there_is_never_committed(base, tmp_path, monkeypatch, fmt):
    """Another process removing part of a shard being written (what a second job did) stops the commit."""
    from pipeline.stores import STORES

    store = STORES[fmt]
    original = store.write_shard

    def write_then_lose_a_part(folder, *a, **k):
        original(folder, *a, **k)
        shutil.rmtree(folder / "final") if fmt == "zarr" else (folder / "v1.tar").unlink()

    monkeypatch.setattr(store, "write_shard", write_then_lose_a_part)
    out = tmp_path / "partial"
    with pytest.raises(CacheWriteError) as e:
        run(_spec(base, out, fmt=fmt))
    lost = "array 'final'" if fmt == "zarr" else "v1.tar"
    assert re.fullmatch(rf"refusing to commit shard-00000 under {re.escape(str(out))}: \.tmp-shard-00000-[0-9a-f]{{8}} "
                        rf"lacks {re.escape(lost)} after writing \(did another process remove or change it\?\); nothing "
                        rf"was committed, run the job again to redo it", str(e.value)), str(e.value)
    assert committed(out) == [] and temporaries(out) == [] and manifest(out)["complete"] is False


# ---------------------------------------------------------------------------------------------- 3. distill on an unfinished cache

def _train_spec(cache, output, **kw) -> TrainSpec:
    kw = {"recipe": "demo", "epochs": 1, "batch_size": 3, "workers": 0, "student_input_size": 64, "device": "cpu"} | kw
    return TrainSpec(name="t", cache=str(cache), student="test_resnet", output=str(output), **kw)


def _train(spec, **kw):
    kw.setdefault("log", lambda m: None)
    return train(spec, progress=False, **kw)


def test_distill_refuses_an_unfinished_cache_unless_allowed_by_name(base, tmp_path):
    cache = tmp_path / "half"
    run(_spec(base, cache), max_shards=1)
    assert manifest(cache)["complete"] is False
    with pytest.raises(IncompleteCacheError) as e:
        _train(_train_spec(cache, tmp_path / "run"))
    assert str(e.value) == (f"cache {cache} is incomplete (1 of 3 shards committed, 3 of 9 samples; its manifest.json "
                            f"says complete: false: the cache job is still running or was stopped); run the cache job "
                            f"again to finish it, or pass --allow-incomplete (allow_incomplete: true) to train on what "
                            f"is there")
    assert not (tmp_path / "run" / "student.safetensors").exists()
    result = _train(_train_spec(cache, tmp_path / "run", allow_incomplete=True))
    assert result["last"]["samples"] == 3


def test_distill_on_a_cache_with_no_shard_yet_is_refused_even_when_allowed(base, tmp_path):
    cache = tmp_path / "empty"
    run(_spec(base, cache), max_shards=0)
    for allow in (False, True):
        with pytest.raises(IncompleteCacheError) as e:
            _train(_train_spec(cache, tmp_path / "run", allow_incomplete=allow))
        assert "0 of 3 shards committed, 0 of 9 samples" in str(e.value)  # was ZeroDivisionError
    assert str(e.value) == (f"cache {cache} holds no samples yet (0 of 3 shards committed, 0 of 9 samples); run its "
                            f"cache job first")


def test_cli_distill_allow_incomplete_is_an_option_by_name(base, tmp_path):
    from pipeline.cli import app

    cache = tmp_path / "half"
    run(_spec(base, cache), max_shards=1)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"distill": _train_spec(cache, tmp_path / "run").to_dict()}))
    refused = CliRunner().invoke(app, ["distill", str(job)])
    assert refused.exit_code == 1 and f"error: cache {cache} is incomplete" in refused.output
    allowed = CliRunner().invoke(app, ["distill", str(job), "--allow-incomplete"])
    assert allowed.exit_code == 0, allowed.output


# ---------------------------------------------------------------------------------------------- 4. distill over another run

def test_distill_refuses_to_replace_another_run_and_overwrite_replaces_it(base, tmp_path):
    out = tmp_path / "run"
    _train(_train_spec(base.caches["zarr"], out))
    before = _tree(out)
    other = _train_spec(base.caches["zarr"], out, lr=0.01, seed=3)
    with pytest.raises(RunFolderError) as e:
        _train(other)
    assert str(e.value) == (f"run folder {out} holds a run of another configuration (lr: run has None, this run 0.01; "
                            f"seed: run has 0, this run 3); choose another output, or pass --overwrite to replace it")
    assert _tree(out) == before
    with pytest.raises(ValueError) as e:
        _train(other, resume=True)
    assert str(e.value) == (f"{out}/checkpoint.pt belongs to another run configuration (lr: run has None, this run "
                            f"0.01; seed: run has 0, this run 3); start a new output folder, or pass --overwrite "
                            f"instead of --resume to replace it")
    logs = []
    _train(other, overwrite=True, log=logs.append)
    assert logs[0] == (f"--overwrite: removed the earlier run's checkpoint.pt, metrics.jsonl, student.safetensors, "
                       f"curves.png, job.yaml, student from {out}")
    assert _tree(out)["student.safetensors"] != before["student.safetensors"]


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_distill_never_replaces_run_named_files_it_did_not_write(base, tmp_path, flags):
    out = tmp_path / "run"
    out.mkdir()
    (out / "job.yaml").write_text("distill: {}  # the user's own spec, kept beside the run\n")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(RunFolderError) as e:
        _train(_train_spec(base.caches["zarr"], out), **flags)
    assert str(e.value) == (f"run folder {out} holds metrics.jsonl, job.yaml, which no distill run wrote there (no "
                            f".distill-run mark, no trainer checkpoint); nothing was removed, with or without "
                            f"--overwrite or --resume: choose another output, or move them away")
    assert _tree(out) == {"job.yaml": b"distill: {}  # the user's own spec, kept beside the run\n",
                          "metrics.jsonl": b'{"mine": 1}\n'}


def test_overwrite_replaces_a_marked_run_without_a_checkpoint_and_an_unmarked_one_with_its_checkpoint(base, tmp_path):
    out = tmp_path / "run"
    _train(_train_spec(base.caches["zarr"], out))
    assert json.loads((out / ".distill-run").read_text())["written_by"] == "scalekd-pipeline distill"
    (out / "checkpoint.pt").unlink()  # a run stopped before its first checkpoint: the mark says whose the files are
    other = _train_spec(base.caches["zarr"], out, lr=0.01)
    logs = []
    _train(other, overwrite=True, log=logs.append)
    assert logs[0] == (f"--overwrite: removed the earlier run's metrics.jsonl, student.safetensors, curves.png, "
                       f"job.yaml, student from {out}")
    (out / ".distill-run").unlink()  # a run from before the mark: its trainer checkpoint says it is a run's folder
    logs = []
    _train(_train_spec(base.caches["zarr"], out), overwrite=True, log=logs.append)
    assert logs[0].startswith("--overwrite: removed the earlier run's checkpoint.pt, ")
    assert (out / ".distill-run").is_file()


def test_distill_the_same_run_again_without_resume_is_refused(base, tmp_path):
    out = tmp_path / "run"
    spec = _train_spec(base.caches["zarr"], out)
    _train(spec)
    with pytest.raises(RunFolderError) as e:
        _train(spec)
    assert str(e.value) == (f"run folder {out} already holds this run's checkpoint; pass --resume to continue it, "
                            f"--overwrite to start again, or choose another output")


def test_resume_with_no_checkpoint_says_it_starts_fresh(base, tmp_path):
    logs = []
    _train(_train_spec(base.caches["zarr"], tmp_path / "run"), resume=True, log=logs.append)
    assert logs[0] == f"--resume: no checkpoint.pt in {tmp_path / 'run'}: starting fresh"


def test_two_distill_runs_on_one_folder_the_second_is_refused_naming_the_first(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out, "distill run"):  # the first run, in this process
        with pytest.raises(OutputBusyError) as e:
            _train(_train_spec(base.caches["zarr"], out))
    assert re.fullmatch(rf"output {re.escape(str(out))} is in use by another distill run \(host "
                        rf"{re.escape(socket.gethostname())}, pid {os.getpid()}, started {STARTED}\); wait for it to "
                        rf"end, or choose another output", str(e.value)), str(e.value)  # was: "free space"
    assert sorted(os.listdir(out)) == [".lock"]


def test_a_run_folder_under_a_regular_file_is_named(base, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(RunFolderError) as e:
        _train(_train_spec(base.caches["zarr"], blocker / "run"))
    assert str(e.value) == f"cannot make run folder {blocker / 'run'}: {blocker} is a file, not a folder; choose another output"


# ---------------------------------------------------------------------------------------------- 6. a damaged shard on re-run

@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_a_rerun_redoes_a_truncated_shard_and_says_so(base, tmp_path, fmt):
    out = tmp_path / "damaged"
    shutil.copytree(base.caches[fmt], out)
    meta = json.loads((out / "shard-00001" / "shard.json").read_text())
    rel, recorded = max(meta["files"].items(), key=lambda kv: kv[1]["bytes"])
    with open(out / "shard-00001" / rel, "r+b") as f:
        f.truncate(recorded["bytes"] // 2)
    logs = []
    summary = run(_spec(base, out, fmt=fmt), log=logs.append)
    assert (f"shard-00001 is damaged ({rel} has {recorded['bytes'] // 2} bytes, shard.json records {recorded['bytes']}): "
            f"removing it, it will be cached again") in logs
    assert summary["complete"] is True and summary["new_samples"] == 3
    assert verify(out)["ok"] is True and shard_sums(out) == shard_sums(base.caches[fmt])


def test_a_rerun_redoes_a_shard_with_a_missing_file_or_an_unreadable_shard_json(base, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(base.caches["zarr"], out)
    (out / "shard-00000" / "logits" / "zarr.json").unlink()
    (out / "shard-00002" / "shard.json").write_text("")
    logs = []
    assert run(_spec(base, out), log=logs.append)["new_samples"] == 6
    assert "shard-00000 is damaged (logits/zarr.json is missing): removing it, it will be cached again" in logs
    assert "shard-00002 is damaged (shard.json is missing or unreadable): removing it, it will be cached again" in logs
    assert verify(out)["ok"] is True and shard_sums(out) == shard_sums(base.caches["zarr"])


# ---------------------------------------------------------------------------------------------- a lost manifest is rebuilt

@pytest.mark.parametrize("damage,why", [("zero bytes", "zero bytes"), ("a JSON list", "a JSON list, not a manifest"),
                                        ("deleted", "missing")])
def test_a_lost_manifest_is_rebuilt_from_the_committed_shards(base, tmp_path, damage, why):
    out = tmp_path / "lost"
    shutil.copytree(base.caches["zarr"], out)
    reference = manifest(out)
    {"zero bytes": lambda p: p.write_bytes(b""), "a JSON list": lambda p: p.write_text("[1, 2]"),
     "deleted": lambda p: p.unlink()}[damage](out / "manifest.json")
    logs = []
    summary = run(_spec(base, out), log=logs.append)
    assert (f"manifest.json of {out} is {why}: rebuilding it from the 3 committed shard(s)' own shard.json (format, "
            f"views and ranges match this run)") in logs
    assert summary["new_samples"] == 0 and summary["complete"] is True
    rebuilt = manifest(out)
    assert rebuilt["shards"] == reference["shards"] and rebuilt["config"] == reference["config"]
    assert verify(out)["ok"] is True


def test_a_lost_manifest_with_shards_of_another_configuration_is_refused(base, tmp_path):
    out = tmp_path / "lost"
    shutil.copytree(base.caches["zarr"], out)
    (out / "manifest.json").write_bytes(b"")
    before = _tree(out)
    with pytest.raises(CacheConfigError) as e:
        run(_spec(base, out, per_image=3))
    assert str(e.value) == (f"output {out} has no readable manifest.json (zero bytes), and its shard-00000 does not "
                            f"belong to this run (made by another configuration (its config_sha256 differs)); choose "
                            f"another output or pass --overwrite to replace it")
    assert _tree(out) == before


# ---------------------------------------------------------------------------------------------- tracebacks that became messages

def test_a_dataset_with_more_classes_than_the_teacher_is_refused_before_the_output_exists(base, tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=tuple(f"c{i:02d}" for i in range(11)), per_class=1,
                            corrupt=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        run(make_spec(data, out, base.ckpt))
    assert str(e.value) == (f"dataset {data} has label 10 (sample 'c10/c10000'), but teacher vit_tiny_patch16_224 has 10 "
                            f"classes (labels 0..9); use a teacher with a head for this dataset's classes, or pin labels "
                            f"with class_index.json")  # was: IndexError: Target 10 is out of bounds, in training
    assert not out.exists()


def test_a_checkpoint_path_that_is_a_folder_is_named_as_one(base, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        run(make_spec(base.data, tmp_path / "out", folder))
    assert str(e.value) == (f"teacher checkpoint {folder} is a folder; expected a file (.safetensors or a torch state "
                            f"dict)")


def test_verify_lists_a_manifest_that_names_the_other_store(base, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(base.caches["zarr"], out)
    m = manifest(out)
    m["format"] = "webdataset"
    (out / "manifest.json").write_text(json.dumps(m))
    report = verify(out)
    assert report["ok"] is False
    assert report["problems"] == [f"shard-0000{i}: shard.json says format 'zarr', manifest.json says 'webdataset'"
                                  for i in range(3)]


@pytest.mark.parametrize("text,found", [("[1, 2]", "a JSON list"), ('"cache"', "a JSON str")])
def test_a_manifest_that_is_not_an_object_is_refused_by_name(base, tmp_path, text, found):
    from pipeline.schema import ManifestError, read_manifest

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path / 'manifest.json'}: expected a JSON object (the manifest), found {found}"


def test_a_store_error_while_writing_a_shard_leaves_no_temporary(base, tmp_path, monkeypatch):
    """What zstd's own error did with compression_level 99 (now refused in the spec): no .tmp-shard is left."""
    from pipeline.stores import STORES

    def failing(*a, **k):
        raise ValueError("codec refused its settings")

    monkeypatch.setattr(STORES["zarr"], "write_shard", failing)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="codec refused its settings"):
        run(_spec(base, out))
    assert temporaries(out) == [] and committed(out) == []


def test_cli_views_override_is_checked_by_name(base, tmp_path):
    from pipeline.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"cache": _spec(base, tmp_path / "out").to_dict()}))
    result = CliRunner().invoke(app, ["cache-teacher", str(job), "--engine", "local", "--views", "0"])
    assert result.exit_code == 2
    assert "error: --views: views.per_image: expected at least 1, found 0" in result.output
    assert not (tmp_path / "out").exists()
