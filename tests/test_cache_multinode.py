"""The caching job on a real multi-node Ray cluster on this machine, and with its workers killed.

One cluster for the file (ray.cluster_utils.Cluster on loopback): a head with no CPUs, so no work
runs there, and two worker nodes of 2 CPUs each (one teacher actor and one task at a time each).
Two runs on it: a plain one, and one whose render, teacher and write processes each SIGKILL
themselves once mid-job (tests/_ray_faults.py). Both must write the same bytes as the in-process
engine with the same thread count: the teacher actors get 2 torch threads here (a node's 2 CPUs,
one actor per node), so the reference runs with torch.set_num_threads(2).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from _cache_helpers import (CORRUPT_KEY, ROOT, all_keys, file_sums, make_imagefolder, make_spec, manifest, run,
                            save_checkpoint, shard_sums, temporaries)
from _ray_faults import FAULT_SHARDS, FAULTS_ENV
from pipeline.inspect_cache import verify

ACTOR_THREADS = 2  # what run_cache_job gives each of 2 actors on two 2-CPU nodes
JOB_DEADLINE_S = 240  # a run takes ~15-40 s here; a Ray that hangs (workers failing to start) fails the test


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """Raise TimeoutError in this (main) thread after `seconds`, instead of hanging the test session."""
    def expire(signum, frame):
        raise TimeoutError(f"{what} did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _spec(data, out, ckpt, address):
    # 10 listed images (one corrupt) in 5 shards of 2; 2 views each, one teacher batch per shard
    return make_spec(data, out, ckpt, samples_per_shard=2, per_image=2, batch_size=4, actors=2, address=address)


def _ray_pids(marker: str) -> list[int]:
    """Live processes whose command line names this cluster's temp folder (raylets, GCS, workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (0 CPUs) + 2 worker nodes (2 CPUs each), all temp files under a short SCALEKD_WORK
    (Ray's unix sockets: ~107 characters at most); shut down, with every process gone, at the end."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    root = tmp_path_factory.mktemp("multinode")
    work = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    (root / "home").mkdir()
    c = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(work))
        mp.setenv("RAY_TMPDIR", str(work))  # the nodes' session folders and the cluster address file
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        # The nodes' workers inherit it: they import pipeline, and the fault hook from tests/.
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
        try:
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            workers = [c.add_node(num_cpus=2) for _ in range(2)]
            c.wait_for_nodes()
            yield SimpleNamespace(address=c.address, workers={n.node_id for n in workers}, head=c.head_node.node_id,
                                  root=root, work=work, home=root / "home")
        finally:
            ray.shutdown()
            if c is not None:
                c.shutdown()
            end = time.monotonic() + 30
            while _ray_pids(str(work)) and time.monotonic() < end:
                time.sleep(0.5)
            left = _ray_pids(str(work))
            shutil.rmtree(work, ignore_errors=True)
    assert left == [], f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def reference(cluster):
    """The same job with engine='local' in this process, at the actors' thread count."""
    import torch

    data = make_imagefolder(cluster.root / "data")
    ckpt = save_checkpoint(cluster.root / "teacher.safetensors")
    out = cluster.root / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(ACTOR_THREADS)
    try:
        run(_spec(data, out, ckpt, None), engine="local")
    finally:
        torch.set_num_threads(threads)
    keys = sorted(all_keys(out))
    assert len(keys) == 9 and CORRUPT_KEY not in keys
    return SimpleNamespace(data=data, ckpt=ckpt, out=out, keys=keys)


@pytest.fixture(scope="module")
def plain_run(cluster, reference):
    import ray

    out = cluster.root / "plain"
    ctx = ray.data.DataContext.get_current()
    wait = ctx.wait_for_min_actors_s
    # Both teachers up before the first shard: else the first actor to import torch (~10 s here) may take
    # all 5 tiny shards before the other is ready, and this run would prove nothing about two nodes.
    ctx.wait_for_min_actors_s = JOB_DEADLINE_S
    try:
        with _deadline(JOB_DEADLINE_S, "the caching job on the cluster"):
            summary = run(_spec(reference.data, out, reference.ckpt, cluster.address), engine="ray")
    finally:
        ctx.wait_for_min_actors_s = wait
    return SimpleNamespace(out=out, summary=summary, initialized_after=ray.is_initialized())


@pytest.fixture(scope="module")
def faulted_run(cluster, reference):
    """Every worker of this job runs _ray_faults.install: four processes kill themselves, once each."""
    import ray

    faults = cluster.root / "faults"
    faults.mkdir()
    out = cluster.root / "faulted"
    logs = []
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "_ray_faults.install", "env_vars": {FAULTS_ENV: str(faults)}})
    try:
        with _deadline(60, "a task under the fault hook (does tests/_ray_faults.py import on the workers?)"):
            assert ray.get(ray.remote(lambda: os.environ.get(FAULTS_ENV)).remote()) == str(faults)
        with _deadline(JOB_DEADLINE_S, "the caching job with killed workers"):
            summary = run(_spec(reference.data, out, reference.ckpt, cluster.address), engine="ray",
                          log=logs.append)
        initialized_after = ray.is_initialized()
    finally:
        ray.shutdown()
    fired = {p.name: p.read_text().split() for p in faults.iterdir()}
    return SimpleNamespace(out=out, summary=summary, logs=logs, fired=fired, initialized_after=initialized_after)


def _assert_same_cache(out: Path, reference) -> None:
    m = manifest(out)
    assert m["complete"] is True and m["num_samples"] == 9 and len(m["shards"]) == 5
    assert shard_sums(out) == shard_sums(reference.out)
    assert file_sums(out) == file_sums(reference.out)
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) and sorted(keys) == reference.keys  # every sample exactly once
    assert m["skipped"] == manifest(reference.out)["skipped"]
    assert temporaries(out) == []
    assert verify(out)["ok"] is True, verify(out)["problems"]


def test_two_node_cluster_run_equals_a_local_run_byte_for_byte(plain_run, reference):
    s = plain_run.summary
    assert s["complete"] is True and s["samples"] == 9 and s["new_samples"] == 9 and s["shards"] == 5
    _assert_same_cache(plain_run.out, reference)


def test_two_node_cluster_run_spreads_the_teacher_over_both_worker_nodes(plain_run, cluster):
    per_node = plain_run.summary["shards_per_teacher_node"]
    assert set(per_node) == cluster.workers, (per_node, cluster.workers)  # both workers, never the head
    assert sum(per_node.values()) == 5


def test_two_node_cluster_run_disconnects_and_leaves_home_alone(plain_run, cluster):
    assert plain_run.initialized_after is False  # the job connected itself, so it disconnected too
    assert list(cluster.home.iterdir()) == []


def test_every_fault_fired_exactly_once(faulted_run):
    """Four processes killed: two teacher actors (render is fused into them), two shard writers."""
    assert sorted(faulted_run.fired) == ["render", "teacher", "write-commit", "write-mid"]
    for fault, shard in FAULT_SHARDS.items():
        assert int(faulted_run.fired[fault][1]) == shard
    assert len({pid for pid, _ in faulted_run.fired.values()}) == 4


def test_killed_teacher_actor_and_shard_workers_lose_and_duplicate_nothing(faulted_run, reference):
    s = faulted_run.summary
    assert s["complete"] is True and s["samples"] == 9 and s["shards"] == 5
    assert s["new_samples"] == 9  # a shard whose writer died after its commit is not counted twice
    assert sum(s["shards_per_teacher_node"].values()) == 5
    _assert_same_cache(faulted_run.out, reference)


def test_a_writer_killed_mid_write_leaves_no_temporary_in_the_finished_cache(faulted_run):
    assert temporaries(faulted_run.out) == []
    assert any("killed shard writers" in line and f"shard-{FAULT_SHARDS['write-mid']:05d}" in line
               for line in faulted_run.logs), faulted_run.logs


def test_a_job_in_a_caller_started_ray_leaves_it_connected(faulted_run):
    assert faulted_run.initialized_after is True
