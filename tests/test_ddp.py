"""Training on several processes: DistributedDataParallel on two CPU processes (gloo) gives the
single-process run of the same global batch, launched as a user does:

    torchrun --standalone --nproc_per_node=2 -m pipeline.cli distill JOB.yaml

BatchNorm-free pair where results are compared: timm's convnext_atto student (LayerNorm; its CAPs
patchify with LayerNorm2d, scalekd/student.py student_norm) and the tiny ViT teacher of
_cache_helpers. BatchNorm normalises each rank's local batch by that batch's own statistics
(SyncBatchNorm needs CUDA and NCCL), so a BN student on two ranks is, by design, not the
single-process run of the global batch; a BN student is only run (and its ranks must agree).

DC-view terms off (loss beta = 0) where weights are compared: at this random initialisation the
main path's CAP outputs are nearly the same at every token (|φ(F)|/|F| ≈ 6e-4), so φ is computed
through a cancellation that turns float rounding into ~1e-4 relative noise in those CAPs'
gradients, and it grows step by step: with the full loss the same single-process run on 2 threads
instead of 1 ends 1.7 % of its update away after 9 steps, the DDP run 1.1 %. With beta = 0 the
DDP run agrees to ~2e-8 of the weights (~1e-5 of the update).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import RandomSampler

from _cache_helpers import PYTHON, ROOT, make_imagefolder, make_spec, run, save_checkpoint
from pipeline.distributed import GlobalBatchSlices, local_batch_size
from pipeline.job_spec import TrainSpec
from pipeline.trainer import build_run, evaluate, train

STUDENT = "convnext_atto"
BASE = {"name": "ddp", "student": STUDENT, "student_input_size": 64, "recipe": "r50-traditional", "lr": 0.002,
        "epochs": 2, "batch_size": 4, "workers": 0, "device": "cpu", "loss": {"beta": 0.0}}
TOLERANCE = 1e-5  # relative, on the weights and on every loss term


def _torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def _one_thread():
    """Single-process references on one thread, as torchrun gives each rank (and fast on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single(spec: dict) -> dict:
    with _one_thread():
        return train(TrainSpec(**spec), progress=False, log=lambda m: None)


def _trainable(run_dir) -> dict:
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)["trainable"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _trainable_at_start(spec: dict) -> dict:
    _, _, distiller, _, _ = build_run(TrainSpec(**spec), torch.device("cpu"))
    return {f"{part}.{k}": v for part in ("student", "caps")
            for k, v in getattr(distiller, part).state_dict().items() if v.is_floating_point()}


def _rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    apart = sum((a[k] - b[k]).double().norm() ** 2 for k in a) ** 0.5
    return float(apart / sum(a[k].double().norm() ** 2 for k in a) ** 0.5)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _max_rel_loss_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b)
    return max(abs(x["train"][k] - y["train"][k]) / max(abs(x["train"][k]), 1e-12)
               for x, y in zip(a, b) for k in x["train"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 images (3 steps of 4 an epoch), a teacher checkpoint, a cache of 2 views; a second cache
    whose one image went bad after caching; the single-process reference run."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_imagefolder(root / "data", per_class=4, corrupt=False)
    ckpt = save_checkpoint(root / "teacher.safetensors")
    run(make_spec(data, root / "cache", ckpt, samples_per_shard=5, per_image=2))
    shutil.copytree(data, root / "data-bad")
    run(make_spec(root / "data-bad", root / "cache-bad", ckpt, samples_per_shard=5, per_image=2))
    (root / "data-bad" / "dog" / "dog001.jpg").write_bytes(b"no longer an image")
    spec = BASE | {"cache": str(root / "cache"), "output": str(root / "single")}
    _single(spec)
    return {"root": root, "data": data, "spec": spec, "single": root / "single"}


def test_each_rank_reads_a_contiguous_slice_of_the_single_process_global_batch():
    for n, batch, ranks in ((12, 4, 2), (12, 6, 3), (10, 4, 2), (7, 7, 1)):
        order = list(RandomSampler(range(n), generator=torch.Generator().manual_seed(5)))
        parts = [list(GlobalBatchSlices(order, batch, r, ranks)) for r in range(ranks)]
        local = batch // ranks
        for r, part in enumerate(parts):
            assert len(part) == len(GlobalBatchSlices(order, batch, r, ranks)) == n // batch * local
        for step in range(n // batch):  # the ranks' batches at a step, in rank order, are the global batch
            joined = sum((part[step * local : (step + 1) * local] for part in parts), [])
            assert joined == order[step * batch : (step + 1) * batch]
    with pytest.raises(ValueError, match=r"batch_size 5 \(the global batch\) does not divide among 2 processes"):
        local_batch_size(5, 2)


def test_two_gloo_processes_train_the_single_process_student_of_the_same_global_batch(world, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"distill": world["spec"] | {"output": str(tmp_path / "ddp")}}))
    done = _torchrun("-m", "pipeline.cli", "distill", str(job))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("student:") == 1, done.stdout  # rank 0 alone reports
    single, ddp = _trainable(world["single"]), _trainable(tmp_path / "ddp")
    start = _trainable_at_start(world["spec"])
    moved = _rel_diff(single, start)
    assert moved > 1e-3, "training did not move the weights"
    assert _rel_diff(single, ddp) < TOLERANCE
    assert _rel_diff(single, ddp) < 1e-3 * moved
    assert max((single[k] - ddp[k]).abs().max().item() for k in single) < 1e-5
    a, b = _metrics(world["single"]), _metrics(tmp_path / "ddp")
    assert [m["epoch"] for m in b] == [1, 2] and [m["samples"] for m in b] == [12, 12]  # one line an epoch, all samples
    assert _max_rel_loss_diff(a, b) < TOLERANCE


# Several runs in ONE torchrun launch (one process group, which train() uses as it is) to keep the
# start-up cost of two fresh interpreters once.
_RUNS = r"""
import json, sys
import torch.distributed as dist
from pipeline import distributed
from pipeline.job_spec import TrainSpec
from pipeline.trainer import train

specs = json.loads(sys.argv[1])
quiet = dict(progress=False, log=lambda m: None)
dist.init_process_group("gloo")
rank = dist.get_rank()
report = {}
try:
    train(TrainSpec(**specs["indivisible"]), **quiet)
except ValueError as e:
    report["indivisible"] = str(e)
report["stopped"] = train(TrainSpec(**specs["resumed"]), stop_after_steps=4, **quiet)
report["resumed"] = train(TrainSpec(**specs["resumed"]), resume=True, **quiet)["rank"]
train(TrainSpec(**specs["skipping"]), **quiet)
train(TrainSpec(**specs["bn"]), **quiet)
train(TrainSpec(**specs["ema"]), **quiet)
original = distributed.GlobalBatchSlices
class SameSlice(original):  # the bug the sampler exists to prevent: every rank reads rank 0's samples
    def __init__(self, order, global_batch, rank, world_size):
        super().__init__(order, global_batch, 0, world_size)
distributed.GlobalBatchSlices = SameSlice
train(TrainSpec(**specs["same_samples"]), **quiet)
import gc, torch
# no run's DDP wrapper outlives it (one left for the interpreter's exit aborted the process in gloo)
report["ddp_alive"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
with open(specs["report"] + f".{rank}", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def runs(world):
    """The launch of _RUNS: its specs and folders, and each rank's report."""
    root, spec = world["root"], world["spec"]
    specs = {
        "indivisible": spec | {"batch_size": 3, "output": str(root / "indivisible")},
        "resumed": spec | {"output": str(root / "resumed")},
        "skipping": spec | {"cache": str(root / "cache-bad"), "on_corrupt": "skip", "output": str(root / "skipping")},
        "bn": spec | {"student": "test_resnet", "loss": {}, "epochs": 1, "val": {"kind": "imagefolder", "root": str(world["data"])},
                      "output": str(root / "bn")},
        "ema": spec | {"student": "test_resnet", "loss": {}, "epochs": 1, "recipe": "demo-advanced", "lr": 0.002,
                       "check_views": False, "val": {"kind": "imagefolder", "root": str(world["data"])},
                       "output": str(root / "ema")},
        "same_samples": spec | {"output": str(root / "same")},
        "report": str(root / "report"),
    }
    script = root / "runs.py"
    script.write_text(_RUNS)
    done = _torchrun(str(script), json.dumps(specs))
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(Path(f"{specs['report']}.{r}").read_text()) for r in range(2)]
    return {"specs": specs, "reports": reports}


def test_no_runs_ddp_wrapper_outlives_it_on_any_rank(runs):
    assert [r["ddp_alive"] for r in runs["reports"]] == [0, 0]


def test_a_batch_the_processes_cannot_share_equally_is_refused_on_every_rank(runs):
    for report in runs["reports"]:
        assert "batch_size 3 (the global batch) does not divide among 2 processes; use a multiple of 2" in report["indivisible"]
    assert not (Path(runs["specs"]["indivisible"]["output"]) / "checkpoint.pt").exists()


def test_a_killed_and_resumed_two_process_run_gives_the_single_process_student(world, runs):
    assert [r["stopped"] for r in runs["reports"]] == [{"stopped": True, "epoch": 1, "step": 1, "rank": r, "world_size": 2}
                                                       for r in range(2)]
    assert [r["resumed"] for r in runs["reports"]] == [0, 1]
    out = runs["specs"]["resumed"]["output"]
    assert _rel_diff(_trainable(world["single"]), _trainable(out)) < TOLERANCE
    assert _max_rel_loss_diff(_metrics(world["single"]), _metrics(out)) < TOLERANCE


def test_skipped_samples_leave_the_ranks_short_batches_weighed_as_one_global_batch(world, runs):
    """One image of the cache went bad: the rank whose slice holds it learns from one sample, the
    other from two, and the step is still the single process's mean over the three."""
    spec = runs["specs"]["skipping"]
    single = _single(spec | {"output": str(world["root"] / "skipping-single")})
    assert [m["samples"] for m in _metrics(Path(single["metrics"]).parent)] == [11, 11]
    assert _rel_diff(_trainable(Path(single["checkpoint"]).parent), _trainable(spec["output"])) < TOLERANCE
    assert _max_rel_loss_diff(_metrics(Path(single["metrics"]).parent), _metrics(spec["output"])) < TOLERANCE


def test_a_batchnorm_student_trains_on_two_processes_and_its_ranks_agree(world, runs):
    """Per-rank BN statistics (by design), averaged over the ranks at the end of the epoch; the
    validation, shared among the ranks, is that of the exported student."""
    spec = runs["specs"]["bn"]
    (record,) = _metrics(spec["output"])
    assert all(map(torch.isfinite, torch.tensor(list(record["train"].values()))))
    import timm
    from safetensors.torch import load_file

    weights = load_file(str(Path(spec["output"]) / "student.safetensors"))
    running = [k for k in weights if k.endswith("running_var")]
    assert running and all(torch.isfinite(weights[k]).all() and not torch.equal(weights[k], torch.ones_like(weights[k]))
                           for k in running)
    model = timm.create_model(spec["student"], num_classes=10)
    model.load_state_dict(weights)
    with _one_thread():
        alone = evaluate(model, spec["val"], torch.device("cpu"), (3, 64, 64))
    assert record["val"] == alone and alone["images"] == 12


def test_an_ema_of_a_batchnorm_student_on_two_processes_is_one_model_evaluated_and_exported(world, runs):
    """The EMA's BN statistics are averaged over the ranks with the student's: its shared validation is
    that of the EMA rank 0 exports."""
    import timm
    from safetensors.torch import load_file

    spec = runs["specs"]["ema"]
    (record,) = _metrics(spec["output"])
    state = torch.load(Path(spec["output"]) / "checkpoint.pt", map_location="cpu", weights_only=True)
    weights = load_file(str(Path(spec["output"]) / "student.safetensors"))
    assert weights.keys() == state["ema"].keys() and all(torch.equal(weights[k], state["ema"][k]) for k in weights)
    raw = state["trainable"]
    assert any(not torch.equal(weights[k], raw[f"student.model.{k}"]) for k in weights if weights[k].is_floating_point())
    # buffers are copied, not averaged, into the EMA (as the release's): after the epoch's mean over the ranks
    # they are the raw student's mean, not rank 0's own
    running = [k for k in weights if k.endswith(("running_mean", "running_var"))]
    assert running and all(torch.equal(weights[k], raw[f"student.model.{k}"]) for k in running)
    model = timm.create_model(spec["student"], num_classes=10)
    model.load_state_dict(weights)
    with _one_thread():
        alone = evaluate(model, spec["val"], torch.device("cpu"), (3, 64, 64))
    assert record["val_ema"] == alone and alone["images"] == 12


def test_ranks_that_read_the_same_samples_do_not_give_the_single_process_student(world, runs):
    """The comparison above can fail: a sampler that hands every rank the same slice is caught."""
    out = runs["specs"]["same_samples"]["output"]
    single = _trainable(world["single"])
    moved = _rel_diff(single, _trainable_at_start(world["spec"]))
    assert _rel_diff(single, _trainable(out)) > 0.3 * moved  # the right sampler: ~1e-5 of the update
    assert _max_rel_loss_diff(_metrics(world["single"]), _metrics(out)) > 1000 * TOLERANCE


def test_an_explicit_gpu_index_is_refused_for_several_processes():
    from pipeline.distributed import _rank_device

    with pytest.raises(ValueError) as e:
        _rank_device("cuda:1", local_rank=0)
    assert str(e.value) == ("device 'cuda:1' names one GPU, which every process would share; use 'cuda' or 'auto' "
                            "(each process takes cuda:LOCAL_RANK)")
    assert _rank_device("cpu", local_rank=1) == torch.device("cpu")
