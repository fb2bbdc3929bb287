"""The caching job on a local Ray started by the job itself: the same shards as engine='local', no files
in $HOME, errors from inside an actor surface as themselves, Ray shut down afterwards.

Two Ray runs in this file (a local Ray costs ~10 s to start and its actors another ~15 s to import
torch here)."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from _cache_helpers import (all_keys, committed, file_sums, make_imagefolder, make_spec, manifest, run,
                            save_checkpoint, shard_sums, temporaries, view_config)
from pipeline.inspect_cache import verify


def _augmented(data, out, ckpt):
    # RandAugment and erasing too: their parameters and the erasing after normalisation cross Ray's stages
    return make_spec(data, out, ckpt, views=view_config(3, rand_augment="rand-m9-mstd0.5-inc1", erasing=0.5))


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data")
        ckpt = save_checkpoint(root / "teacher.safetensors")
        run(_augmented(data, root / "local", ckpt), engine="local")
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, local=root / "local")


@pytest.fixture
def ray_env(monkeypatch, tmp_path):
    """A short SCALEKD_WORK (Ray's unix sockets live under it: ~107 characters at most), an empty HOME,
    no auth; Ray is shut down whatever happens."""
    import ray

    assert not ray.is_initialized()
    work = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SCALEKD_WORK", str(work))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        yield SimpleNamespace(work=work, home=home)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def test_ray_engine_writes_the_same_shards_as_local_and_leaves_home_alone(local_ref, ray_env, tmp_path):
    import ray

    out = tmp_path / "ray-cache"
    summary = run(_augmented(local_ref.data, out, local_ref.ckpt), engine="ray")
    assert summary["complete"] is True and summary["samples"] == 9 and summary["shards"] == 4
    assert summary["new_samples"] == 9 and summary["skipped"] == 1
    # the job started its own Ray and shut it down
    assert not ray.is_initialized()
    # byte-identical shards to the in-process engine
    assert shard_sums(out) == shard_sums(local_ref.local)
    assert file_sums(out) == file_sums(local_ref.local)
    assert sorted(all_keys(out)) == sorted(all_keys(local_ref.local))
    assert manifest(out)["skipped"] == manifest(local_ref.local)["skipped"]
    assert verify(out)["ok"] is True
    # Ray kept its files in the work folder, and nothing at all was written into $HOME
    assert list(ray_env.home.iterdir()) == []
    assert any((ray_env.work / "ray").glob("session_*"))


@pytest.fixture(scope="module")
def nan_run(local_ref, tmp_path_factory):
    """The second (and last) Ray run: a checkpoint with a NaN weight, so the teacher actor raises
    FloatingPointError on its first shard. Returns what the caller saw and what was left behind."""
    import ray

    root = tmp_path_factory.mktemp("ray-nan")
    work = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    (root / "home").mkdir()
    bad = save_checkpoint(root / "nan.safetensors", nan=True)
    out = root / "cache"
    error = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(work))
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        try:
            run(make_spec(local_ref.data, out, bad), engine="ray")
        except Exception as e:  # noqa: BLE001 - inspected by the tests below
            error = e
        finally:
            initialized_after = ray.is_initialized()
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    return SimpleNamespace(error=error, out=out, home=root / "home", initialized_after=initialized_after)


def test_ray_actor_error_stops_the_job_commits_nothing_it_computed_and_shuts_ray_down(nan_run):
    e = nan_run.error
    assert e is not None, "a NaN teacher must not give a cache"
    # the reason, with the shard, is in the error the caller gets (wrapped or not)
    assert re.search(r"NaN/Inf in '(final|mid|logits)' for shard-\d+", str(e)), str(e)[-2000:]
    assert nan_run.initialized_after is False
    # Nothing the NaN teacher computed is committed. A teacher actor works on several shards at once, so
    # a shard with nothing to forward (here the last: only the corrupt file) may be committed meanwhile.
    for name in committed(nan_run.out):
        assert json.loads((nan_run.out / name / "shard.json").read_text())["num_samples"] == 0, name
    assert temporaries(nan_run.out) == []
    m = manifest(nan_run.out)
    assert m["complete"] is False and m["shards"] == [] and m["num_samples"] == 0
    assert list(nan_run.home.iterdir()) == []


def test_ray_actor_error_surfaces_as_itself(nan_run):
    e = nan_run.error
    assert isinstance(e, FloatingPointError), f"{type(e).__mro__}"
    assert type(e) is FloatingPointError
