"""The trainer: cached targets give the online loss (the correctness anchor), late alone, resume,
export, and clear refusals. Tiny ViT teacher (tests/_cache_helpers.py), timm's test_resnet student."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from _cache_helpers import TEACHER_KWARGS, TEACHER_NAME, make_imagefolder, make_spec, run, save_checkpoint
from pipeline.job_spec import TrainSpec
from pipeline.late import CacheMismatchError, build_late
from pipeline.reader import CacheReader
from pipeline.schema import ManifestError
from pipeline.train_data import collate_skipping
from pipeline.trainer import build_run, train
from pipeline.weights import file_sha256
from scalekd.targets import Targets

STUDENT = "test_resnet"
FP16 = {"final": "fp16", "mid": "fp16", "logits": "fp16"}
FP32 = {"final": "fp32", "mid": "fp32", "logits": "fp32"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a teacher checkpoint and four caches of it (fp32/fp16 × zarr/webdataset)."""
    root = tmp_path_factory.mktemp("trainer")
    data = make_imagefolder(root / "data", per_class=4, corrupt=False)
    ckpt = save_checkpoint(root / "teacher.safetensors")
    caches = {}
    for fmt in ("zarr", "webdataset"):
        for name, roles in (("fp32", FP32), ("fp16", FP16)):
            out = root / f"cache-{fmt}-{name}"
            run(make_spec(data, out, ckpt, fmt=fmt, roles=roles, samples_per_shard=5, per_image=2))
            caches[(fmt, name)] = out
    return {"root": root, "data": data, "ckpt": ckpt, "caches": caches}


def _spec(world, cache, output, **kw) -> TrainSpec:
    kw = {"recipe": "demo", "epochs": 2, "batch_size": 4, "workers": 0, "student_input_size": 64,
          "device": "cpu"} | kw
    return TrainSpec(name="t", cache=str(cache), student=STUDENT, output=str(output), **kw)


def _batch(data, indices):
    return collate_skipping([data[i] for i in indices])


def _terms(spec, indices=(0, 1, 2, 3), epoch=0):
    """Loss terms of one batch of views through build_run's distiller (same seed → same student)."""
    reader, data, distiller, online, _ = build_run(spec, torch.device("cpu"))
    data.set_epoch(epoch)
    b = _batch(data, list(indices))
    distiller.train()
    if online is not None:
        targets = online(data.to_device(b, "teacher_image", "cpu"))
    else:
        targets = Targets.from_final(b["final"].float(), b["logits"].float())
    out = distiller(data.to_device(b, "image", "cpu"), targets, b["label"])
    return {k: v.item() for k, v in out.items() if k != "logits"}, targets


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("codec,bound", [("fp32", 1e-5), ("fp16", 1e-3)])
def test_cached_loss_terms_equal_online_within_store_precision(world, tmp_path, fmt, codec, bound):
    cache = world["caches"][(fmt, codec)]
    for epoch in (0, 1):  # both stored views
        cached, t_cached = _terms(_spec(world, cache, tmp_path / "c"), epoch=epoch)
        online, t_online = _terms(_spec(world, cache, tmp_path / "o", targets="online"), epoch=epoch)
        rel = (t_cached.final - t_online.final).norm() / t_online.final.norm()
        assert rel < bound, f"final targets differ by relative {rel:.2e}"
        assert set(cached) == set(online)
        for k in cached:
            assert cached[k] == pytest.approx(online[k], rel=bound, abs=1e-7), k
    if codec == "fp32":  # a lossless store is exact, not merely close
        assert (t_cached.final - t_online.final).abs().max() < 1e-5


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("codec,bound", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_a_few_steps_from_cache_give_the_online_student(world, tmp_path, codec, bound):
    """SGD, whose step is proportional to the gradient, so the students' distance measures the
    targets' difference. (Adam divides by the gradient's own scale: on parameters whose gradient is
    ~0 it turns 1e-9 of float noise into steps of ±lr, in either mode, so it cannot show this.)"""
    cache = world["caches"][("zarr", codec)]
    kw = {"epochs": 1, "recipe": "r50-traditional", "lr": 0.05}
    a = train(_spec(world, cache, tmp_path / "cached", **kw), progress=False, log=lambda m: None)
    b = train(_spec(world, cache, tmp_path / "online", targets="online", **kw), progress=False, log=lambda m: None)
    _, _, distiller, _, _ = build_run(_spec(world, cache, tmp_path / "init", **kw), torch.device("cpu"))
    start = distiller.student.model.state_dict()
    wa, wb = _weights(a["student"]), _weights(b["student"])
    floats = [k for k in wa if wa[k].is_floating_point()]
    moved = sum((wa[k] - start[k]).norm() ** 2 for k in floats) ** 0.5
    apart = sum((wa[k] - wb[k]).norm() ** 2 for k in floats) ** 0.5
    assert moved > 1e-3, "training did not change the student"
    assert apart / moved < bound, f"students differ by {apart / moved:.2e} of their update after {a['last']['samples']} samples"


def test_trainer_holds_no_teacher_early_weights(world):
    from pipeline.weights import load_teacher

    teacher = CacheReader(world["caches"][("zarr", "fp32")]).manifest["teacher"]
    late = build_late(teacher)
    full, _ = load_teacher(TEACHER_NAME, checkpoint=world["ckpt"], late_blocks=1, **TEACHER_KWARGS)
    early_keys = set(full.model.state_dict()) - set(full.late_keys())
    kept = set(late.model.state_dict())
    assert early_keys and not (kept & early_keys)
    assert kept == set(full.late_keys())
    assert isinstance(late.model.patch_embed, torch.nn.Identity)
    assert isinstance(late.model.blocks[0], torch.nn.Identity)
    # the late weights are the checkpoint's, exactly
    for k, v in late.model.state_dict().items():
        assert torch.equal(v, full.model.state_dict()[k]), k
    n_late = sum(p.numel() for p in late.parameters())
    assert n_late == full.parameter_counts()["late"] < sum(p.numel() for p in full.model.parameters())


def test_late_alone_of_a_swin_teacher_rebuilds_its_constructed_buffers(tmp_path):
    """Swin's late owns non-persistent buffers (relative position index, attention mask)."""
    from safetensors.torch import save_file

    from pipeline.weights import load_teacher

    kwargs = {"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 3, 4), "num_classes": 7}
    torch.manual_seed(3)
    model = timm.create_model("swin_tiny_patch4_window7_224", **kwargs)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    split, sha = load_teacher("swin_tiny_patch4_window7_224", checkpoint=path, **kwargs)
    teacher = split.info.to_dict() | {"checkpoint": str(path), "checkpoint_sha256": sha, "kwargs": kwargs}
    late = build_late(teacher)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        mid = split.early(x)
        torch.testing.assert_close(late(mid), split.late(mid), rtol=0, atol=0)


@pytest.fixture(scope="module")
def straight(world):
    """An uninterrupted 3-epoch run from the zarr fp16 cache: what every resumed run must reproduce."""
    cache = world["caches"][("zarr", "fp16")]
    return train(_spec(world, cache, world["root"] / "straight", epochs=3), progress=False, log=lambda m: None)


def _same_student(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit: the same machine and thread count


def _epochs(metrics) -> list[int]:
    return [json.loads(line)["epoch"] for line in Path(metrics).read_text().splitlines()]


def _results(metrics) -> list[dict]:
    """Each epoch's record without its timings."""
    drop = ("seconds", "samples_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in Path(metrics).read_text().splitlines()]


def test_resume_after_a_stop_gives_the_uninterrupted_weights(world, tmp_path, straight):
    cache = world["caches"][("zarr", "fp16")]
    # killed in the middle of epoch 2 (after epoch 1's checkpoint), then resumed
    spec = _spec(world, cache, tmp_path / "killed", epochs=3)
    steps_per_epoch = len(CacheReader(cache)) // 4
    stopped = train(spec, progress=False, log=lambda m: None, stop_after_steps=steps_per_epoch + 1)
    assert stopped["stopped"] and stopped["epoch"] == 1
    resumed = train(spec, resume=True, progress=False, log=lambda m: None)
    _same_student(straight["student"], resumed["student"])
    lines = [json.loads(l) for l in Path(resumed["metrics"]).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]  # as on the console and the plot
    assert [m["view"] for m in lines] == [0, 1, 0]  # view e mod K, K = 2


# --- a trainer really killed (SIGKILL in a subprocess), then resumed

_KILLABLE_TRAINER = r"""
import io, json, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

spec, progress_file, hold_after_step, half_checkpoint = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
progress = open(progress_file, "a")

def after_step(optimizer, args, kwargs):
    progress.write("step\n"); progress.flush()
    time.sleep(hold_after_step)  # the kill lands here, between two steps
register_optimizer_step_post_hook(after_step)

if half_checkpoint:
    real_save = torch.save
    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 1:  # the second epoch's checkpoint: half of it, then wait
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
            progress.write("half-checkpoint\n"); progress.flush()
            time.sleep(600)
        return real_save(obj, f, *a, **k)
    torch.save = save

from pipeline.job_spec import TrainSpec
from pipeline.trainer import train
train(TrainSpec(**spec), progress=False, log=lambda m: None)
print("FINISHED", flush=True)
"""


def _kill_trainer_when(spec, progress: Path, until, hold: float, half_checkpoint: bool) -> None:
    """Train in a subprocess; SIGKILL it as soon as until(lines of progress) holds."""
    import subprocess

    from _cache_helpers import PYTHON, ROOT, sigkill_when

    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([PYTHON, "-c", _KILLABLE_TRAINER, json.dumps(spec.to_dict()), str(progress), str(hold),
                             "1" if half_checkpoint else "0"], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = lambda: progress.read_text().splitlines() if progress.exists() else []  # noqa: E731
    sigkill_when(lambda: until(lines()), proc, "the trainer", timeout=120)


def _checkpoint_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]


def test_trainer_sigkilled_mid_epoch_resumes_to_the_uninterrupted_weights(world, tmp_path, straight):
    cache = world["caches"][("zarr", "fp16")]
    run_dir = tmp_path / "killed"
    spec = _spec(world, cache, run_dir, epochs=3)
    steps = len(CacheReader(cache)) // 4
    _kill_trainer_when(spec, tmp_path / "progress", lambda lines: len(lines) >= steps + 2, hold=0.5,
                       half_checkpoint=False)
    # killed two steps into epoch 2: epoch 1 is checkpointed, nothing of epoch 2 is
    assert _checkpoint_epoch(run_dir) == 0 and _epochs(run_dir / "metrics.jsonl") == [1]
    logs = []
    resumed = train(spec, resume=True, progress=False, log=logs.append)
    assert logs[0] == f"resuming t at epoch 2 of 3 from {run_dir}/checkpoint.pt"
    _same_student(straight["student"], resumed["student"])
    assert _results(resumed["metrics"]) == _results(straight["metrics"])


def test_trainer_sigkilled_while_writing_its_checkpoint_resumes_from_the_previous_one(world, tmp_path, straight):
    cache = world["caches"][("zarr", "fp16")]
    run_dir = tmp_path / "killed"
    spec = _spec(world, cache, run_dir, epochs=3)
    _kill_trainer_when(spec, tmp_path / "progress", lambda lines: "half-checkpoint" in lines, hold=0.0,
                       half_checkpoint=True)
    # half of epoch 2's checkpoint sits in checkpoint.pt.tmp; checkpoint.pt is still epoch 1's, whole
    assert (run_dir / "checkpoint.pt.tmp").stat().st_size > 0
    assert _checkpoint_epoch(run_dir) == 0
    assert _epochs(run_dir / "metrics.jsonl") == [1, 2]  # written before the checkpoint
    resumed = train(spec, resume=True, progress=False, log=lambda m: None)
    _same_student(straight["student"], resumed["student"])
    assert _epochs(resumed["metrics"]) == [1, 2, 3]  # epoch 2 again, not twice
    assert _results(resumed["metrics"]) == _results(straight["metrics"])
    assert not (run_dir / "checkpoint.pt.tmp").exists()


def test_a_full_disk_at_the_checkpoint_stops_clearly_and_resumes(world, tmp_path, straight, monkeypatch):
    import errno

    cache = world["caches"][("zarr", "fp16")]
    run_dir = tmp_path / "full"
    spec = _spec(world, cache, run_dir, epochs=3)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if obj["epoch"] == 1:
            f.write(b"\0" * 4096)  # some bytes land first
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    from pipeline.trainer import CheckpointWriteError

    with pytest.raises(CheckpointWriteError) as e:
        train(spec, progress=False, log=lambda m: None)
    assert str(e.value) == (f"cannot write checkpoint.pt for epoch 2 in {run_dir}: No space left on device; "
                            f"checkpoint.pt is as it was before this epoch: free space, then run again with --resume")
    assert _checkpoint_epoch(run_dir) == 0 and not (run_dir / "checkpoint.pt.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    resumed = train(spec, resume=True, progress=False, log=lambda m: None)
    _same_student(straight["student"], resumed["student"])
    assert _epochs(resumed["metrics"]) == [1, 2, 3]


def test_exported_student_loads_in_plain_timm_with_the_same_logits(world, tmp_path):
    cache = world["caches"][("webdataset", "fp16")]
    spec = _spec(world, cache, tmp_path / "run", epochs=1)
    result = train(spec, progress=False, log=lambda m: None)
    # num_classes in the overlay too: timm drops a checkpoint's classifier whose class count differs from the cfg's
    plain = timm.create_model(STUDENT, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=result["student"], num_classes=10)).eval()
    _, data, distiller, _, _ = build_run(spec, torch.device("cpu"))
    distiller.student.model.load_state_dict(_weights(result["student"]))
    distiller.eval()
    x = data.to_device(_batch(data, [0, 1, 2]), "image", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), distiller.student(x)[2], rtol=0, atol=0)
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(Path(result["metrics"]).read_text().splitlines()[-1])
    assert set(record["train"]) >= {"task", "kd", "proxy_direct", "proxy_dc", "main_direct", "main_dc", "loss"}


def test_a_cache_of_another_teacher_is_refused_naming_both_values(world, tmp_path):
    cache = world["caches"][("zarr", "fp16")]
    sha = CacheReader(cache).manifest["teacher"]["checkpoint_sha256"]
    for wanted, cached in ((("name", "swin_large_patch4_window7_224"), "'vit_tiny_patch16_224'"),
                           (("checkpoint_sha256", "abc"), repr(sha)),
                           (("mean", [0.485, 0.456, 0.406]), "[0.5, 0.5, 0.5]"),
                           (("input_size", [3, 224, 224]), "[3, 64, 64]")):
        key, value = wanted
        with pytest.raises(CacheMismatchError) as e:
            build_run(_spec(world, cache, tmp_path / "r", teacher={key: value}), torch.device("cpu"))
        assert str(e.value) == (f"cache {cache} was made with teacher {key} = {cached}, but this run asks for "
                                f"{key} = {value!r}; make a cache for this teacher or drop the setting")


def test_a_changed_checkpoint_file_is_refused(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["caches"][("zarr", "fp16")], cache)
    ckpt = tmp_path / "teacher.safetensors"
    shutil.copy(world["ckpt"], ckpt)
    m = json.loads((cache / "manifest.json").read_text())
    m["teacher"]["checkpoint"] = str(ckpt)
    (cache / "manifest.json").write_text(json.dumps(m))
    save_checkpoint(ckpt, seed=1)  # other weights under the same name
    with pytest.raises(CacheMismatchError) as e:
        build_run(_spec(world, cache, tmp_path / "r"), torch.device("cpu"))
    assert str(e.value) == (f"teacher checkpoint {ckpt} has sha256 {file_sha256(ckpt)}, but the cache was made from "
                            f"sha256 {m['teacher']['checkpoint_sha256']}")


def test_a_cache_missing_a_role_the_loss_needs_is_refused(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["caches"][("zarr", "fp16")], cache)
    m = json.loads((cache / "manifest.json").read_text())
    del m["roles"]["logits"]
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheMismatchError) as e:
        build_run(_spec(world, cache, tmp_path / "r"), torch.device("cpu"))
    assert str(e.value) == f"cache {cache} does not store role(s) ['logits'], which the loss needs"


def test_a_corrupt_shard_stops_training_naming_shard_and_sample_and_keeps_the_checkpoint(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["caches"][("zarr", "fp16")], cache)
    spec = _spec(world, cache, tmp_path / "run", epochs=2)
    steps_per_epoch = len(CacheReader(cache)) // 4
    first = train(spec, progress=False, log=lambda m: None, stop_after_steps=steps_per_epoch + 1)  # killed in epoch 2
    assert first["epoch"] == 1
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    # garble the zarr shard file of `final` in shard-00001
    final_file = cache / "shard-00001" / "final" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(final_file.read_bytes())
    raw[: len(raw) // 2] = b"\x00" * (len(raw) // 2)
    final_file.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"shard-00001.*sample '.+'"):
        train(spec, resume=True, progress=False, log=lambda m: None)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint
    # asked to skip, the run goes on without those samples
    skipping = TrainSpec(**(spec.to_dict() | {"on_corrupt": "skip"}))
    result = train(skipping, resume=True, progress=False, log=lambda m: None)
    last = json.loads(Path(result["metrics"]).read_text().splitlines()[-1])
    assert last["epoch"] == 2 and 0 < last["samples"] < steps_per_epoch * 4


def test_fingerprint_verification_catches_a_changed_image(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    cache = tmp_path / "cache"
    spec = make_spec(data, cache, world["ckpt"], samples_per_shard=5, per_image=2)
    run(spec)
    reader = CacheReader(cache)
    victim = Path(reader[0]["source"])
    from PIL import Image

    Image.fromarray(255 - np.asarray(Image.open(victim).convert("RGB"))).save(victim)
    from pipeline.train_data import ReplayError

    _, ds, _, _, _ = build_run(_spec(world, cache, tmp_path / "r", verify_fingerprints=True), torch.device("cpu"))
    with pytest.raises(ReplayError, match=reader[0]["key"]):
        ds[0]
    ds[1]  # untouched images replay to their fingerprints


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_cached_dc_removed_view_plus_dc_is_the_final_features_with_zero_spatial_mean(world, fmt, codec):
    from scalekd.dc import dc_component

    reader = CacheReader(world["caches"][(fmt, codec)])
    for i in range(len(reader)):
        for v in range(reader.num_views):
            stored = reader.read(i, v, ["final", "logits"])
            t = Targets.from_final(torch.from_numpy(stored["final"])[None], torch.from_numpy(stored["logits"])[None])
            torch.testing.assert_close(t.final_dc_removed + dc_component(t.final), t.final, rtol=0, atol=1e-6)
            assert t.final_dc_removed.mean(dim=1).abs().max() < 1e-6  # per channel, over the token grid


def test_distill_cli_trains_and_prints_where_the_files_are(world, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"distill": {"name": "cli", "cache": str(world["caches"][("zarr", "fp16")]),
                                               "student": STUDENT, "student_input_size": 64, "output": str(tmp_path / "run"),
                                               "recipe": "demo", "epochs": 1, "batch_size": 4, "workers": 0}}))
    result = CliRunner().invoke(app, ["distill", str(job), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for label, name in (("weights:", "student.safetensors"), ("metrics:", "metrics.jsonl"), ("plot:", "curves.png"),
                        ("job spec:", "job.yaml")):
        line = next(l for l in result.output.splitlines() if l.startswith(label))
        assert line.split()[-1].endswith(name) and Path(line.split()[-1]).is_file()
    line = next(l for l in result.output.splitlines() if l.startswith("student:"))
    assert Path(line.split()[-1], "config.json").is_file()
    bad = CliRunner().invoke(app, ["distill", str(job), "--recipe", "nope"])
    from pipeline.recipes import ALIASES, RECIPES

    names = ", ".join(f"'{n}'" for n in (*RECIPES, *ALIASES))
    assert bad.exit_code == 2 and f"'nope' is not one of {names}" in " ".join(bad.output.replace("│", " ").split())
    assert CliRunner().invoke(app, ["distill", "--help"]).exit_code == 0


def test_channels_last_gives_the_same_loss_and_gradients_within_float_rounding(world, tmp_path):
    """channels_last (the trainer's CUDA default) changes the convolutions' memory layout, not the
    math: one step's loss terms and gradients match the contiguous layout's up to summation order.
    (Whole runs are not compared: AdamW turns the rounding noise of near-zero gradients, e.g. of BN
    biases, into full-size steps, so weights drift apart by chance under any change of float order.)"""
    import copy

    cache = world["caches"][("zarr", "fp32")]
    _, data, distiller, _, _ = build_run(_spec(world, cache, tmp_path / "r"), torch.device("cpu"))
    b = _batch(data, range(4))
    targets = Targets.from_final(b["final"].float(), b["logits"].float())
    nhwc = copy.deepcopy(distiller)
    nhwc.student.to(memory_format=torch.channels_last)
    nhwc.caps.to(memory_format=torch.channels_last)
    results = []
    images = data.to_device(b, "image", "cpu")
    nhwc_images = data.to_device(b, "image", "cpu", memory_format=torch.channels_last)
    assert nhwc_images.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc_images, images)
    for model, images in ((distiller, images), (nhwc, nhwc_images)):
        model.train()
        terms = model(images, targets, b["label"])
        terms["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((terms, grads))
    (ta, ga), (tb, gb) = results
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in nhwc.student.parameters())  # the layout really changed
    from scalekd.distiller import LOSS_TERMS

    for k in (*LOSS_TERMS, "loss"):
        assert tb[k].item() == pytest.approx(ta[k].item(), rel=1e-5, abs=1e-7), k
    # 1.4e-4 measured: at a random start φ(F) of the CAP output is ~1e-3 of F, so removing the DC
    # cancels most of it and magnifies rounding in those CAPs' gradients (tests/test_ddp.py saw the same)
    assert ((ga - gb).norm() / ga.norm()).item() < 1e-3


def test_a_checkpoint_that_is_not_this_trainers_is_refused_by_name(tmp_path):
    from pipeline.trainer import _read_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, path)  # loads safely, but is a plain state dict
    with pytest.raises(ValueError) as e:
        _read_checkpoint(path, TrainSpec(name="t", cache="c", student=STUDENT, output=str(tmp_path)))
    assert str(e.value) == (f"checkpoint {path} is not this trainer's checkpoint (no 'spec' entry); remove it or "
                            f"start a new output folder")


# --- the recipe's moving average (EMA) and views, in the trainer


def _ema_spec(world, output, **kw):
    # demo-advanced's views are RandAugment + erasing; these caches are crop and flip (the EMA is the point here)
    kw = {"recipe": "demo-advanced", "check_views": False, "val": {"kind": "imagefolder", "root": str(world["data"])}} | kw
    return _spec(world, world["caches"][("zarr", "fp16")], output, **kw)


def test_ema_resumed_after_a_stop_is_bitwise_the_uninterrupted_one_and_is_what_is_exported(world, tmp_path):
    straight = train(_ema_spec(world, tmp_path / "straight"), progress=False, log=lambda m: None)
    spec = _ema_spec(world, tmp_path / "killed")
    steps_per_epoch = len(CacheReader(world["caches"][("zarr", "fp16")])) // 4
    stopped = train(spec, progress=False, log=lambda m: None, stop_after_steps=steps_per_epoch + 1)
    assert stopped["epoch"] == 1  # epoch 1 checkpointed (with its EMA), epoch 2 begun
    resumed = train(spec, resume=True, progress=False, log=lambda m: None)
    a, b = (torch.load(r["checkpoint"], map_location="cpu", weights_only=True) for r in (straight, resumed))
    assert a["ema"].keys() == b["ema"].keys()
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    _same_student(straight["student"], resumed["student"])
    assert _results(resumed["metrics"]) == _results(straight["metrics"])
    assert all(set(m["val_ema"]) == {"top1", "top5", "images"} for m in _results(straight["metrics"]))
    # the EMA is what was exported, and it is neither the raw student nor its initial weights
    assert straight["exported"] == "ema"
    exported = _weights(straight["student"])
    raw = {k.removeprefix("student.model."): v for k, v in a["trainable"].items() if k.startswith("student.model.")}
    _, _, distiller, _, _ = build_run(_ema_spec(world, tmp_path / "init"), torch.device("cpu"))
    init = distiller.student.model.state_dict()
    for k, v in a["ema"].items():
        assert torch.equal(exported[k], v), k
    floats = [k for k in exported if exported[k].is_floating_point() and "running" not in k]
    assert all(torch.equal(exported[k], raw[k]) for k in exported if "running" in k)  # buffers copied, not averaged
    assert sum((exported[k] - raw[k]).norm() for k in floats) > 1e-4
    assert sum((exported[k] - init[k]).norm() for k in floats) > 1e-4


def test_a_recipe_evaluating_the_raw_student_exports_it_and_keeps_the_ema_in_the_checkpoint(world, tmp_path,
                                                                                            monkeypatch):
    from pipeline import recipes

    monkeypatch.setitem(recipes.RECIPES, "demo-ema-raw", recipes.RECIPES["demo-advanced"] | {"ema_eval": False})
    result = train(_ema_spec(world, tmp_path / "run", recipe="demo-ema-raw", epochs=1), progress=False,
                   log=lambda m: None)
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert result["exported"] == "student" and "ema" in state
    exported = _weights(result["student"])
    for k, v in state["trainable"].items():
        if k.startswith("student.model."):
            assert torch.equal(exported[k.removeprefix("student.model.")], v), k


def test_the_job_spec_turns_the_ema_on_with_its_decay(world, tmp_path):
    result = train(_spec(world, world["caches"][("zarr", "fp16")], tmp_path / "run", epochs=1, ema=True,
                         ema_decay=0.5), progress=False, log=lambda m: None)
    assert result["exported"] == "ema"
    plain = train(_spec(world, world["caches"][("zarr", "fp16")], tmp_path / "plain", epochs=1), progress=False,
                  log=lambda m: None)
    assert plain["exported"] == "student"
    assert "ema" not in torch.load(plain["checkpoint"], map_location="cpu", weights_only=True)


def test_a_recipe_whose_views_the_cache_lacks_is_refused_unless_the_run_opts_out(world, tmp_path):
    cache = world["caches"][("zarr", "fp16")]
    with pytest.raises(CacheMismatchError) as e:
        build_run(_spec(world, cache, tmp_path / "r", recipe="vit-b16"), torch.device("cpu"))
    assert str(e.value) == (
        f"recipe 'vit-b16' trains on views with rand_augment 'rand-m9-mstd0.5-inc1' and erasing 0.25, but cache "
        f"{cache} holds views with rand_augment None and erasing 0.0 (its manifest.json 'views'); make a cache with "
        f"the recipe's views, choose a recipe whose views are the cache's, or set check_views: false in the distill "
        f"section to train on this cache anyway")
    _, _, distiller, _, rec = build_run(_spec(world, cache, tmp_path / "r", recipe="vit-b16", check_views=False),
                                        torch.device("cpu"))
    assert rec["views"]["rand_augment"] == "rand-m9-mstd0.5-inc1"


def test_the_recipes_drop_path_rate_reaches_the_student_unless_student_kwargs_sets_it(world, tmp_path):
    cache = world["caches"][("zarr", "fp16")]
    kw = {"check_views": False, "recipe": "swin-t"}
    _, _, d, _, _ = build_run(_spec(world, cache, tmp_path / "r", **kw), torch.device("cpu"))
    assert d.student.model_args["drop_path_rate"] == 0.05
    _, _, d, _, _ = build_run(_spec(world, cache, tmp_path / "r", student_kwargs={"drop_path_rate": 0.2}, **kw),
                              torch.device("cpu"))
    assert d.student.model_args["drop_path_rate"] == 0.2


@pytest.mark.parametrize("codec,dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_the_loader_hands_targets_as_stored_and_they_convert_exactly(world, tmp_path, codec, dtype):
    """Half the bytes to copy, collate and pin for an fp16 cache; the trainer's .float() on its device
    gives exactly the float32 the reader decodes."""
    cache = world["caches"][("webdataset", codec)]
    _, data, _, _, _ = build_run(_spec(world, cache, tmp_path / "r"), torch.device("cpu"))
    reader = CacheReader(cache)
    for i in (0, 3):
        item = data[i]
        assert item["final"].dtype == dtype and item["logits"].dtype == dtype
        stored = reader.read(i, 0)  # float32 by default, whatever the store holds
        assert stored["final"].dtype == np.float32 and stored["logits"].dtype == np.float32
        assert torch.equal(item["final"].float(), torch.from_numpy(stored["final"]))
        assert torch.equal(item["logits"].float(), torch.from_numpy(stored["logits"]))


def test_resuming_a_checkpoint_of_other_cap_modules_is_refused_with_how_to_proceed(world, tmp_path, monkeypatch):
    """A run made before the per-pair presets (another CAP norm or heads) under the same spec."""
    import pipeline.trainer as trainer_module

    cache = world["caches"][("zarr", "fp16")]
    spec = _spec(world, cache, tmp_path / "run", epochs=2)
    train(spec, progress=False, log=lambda m: None, stop_after_steps=len(CacheReader(cache)) // 4 + 1)  # epoch 1 saved
    real = trainer_module.preset
    monkeypatch.setattr(trainer_module, "preset", lambda *a, **k: real(*a, **k | {"cap_norm": "ln"}))
    with pytest.raises(ValueError, match=r"holds other student/CAP modules than this run builds .*style: ours"):
        train(spec, resume=True, progress=False, log=lambda m: None)


def test_distill_cache_first_makes_a_missing_cache_then_trains_and_leaves_a_complete_one_alone(world, tmp_path,
                                                                                               monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import pipeline.cache_job as cache_job
    from _cache_helpers import file_sums, teacher_dict, view_config
    from pipeline.cli import app

    calls = []
    real = cache_job.run_cache_job

    def local(spec, **kw):  # the local engine here: the same stages without starting a Ray
        calls.append(spec.output)
        return real(spec, **kw | {"engine": "local", "progress": False})

    monkeypatch.setattr(cache_job, "run_cache_job", local)
    cache = tmp_path / "cache"
    views = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(view_config(2)).items()}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "cache": {"name": "cf", "dataset": {"kind": "imagefolder", "root": str(world["data"])},
                  "teacher": teacher_dict(world["ckpt"]), "views": views, "output": str(cache),
                  "roles": {"final": "fp16", "logits": "fp16"}, "samples_per_shard": 5},
        "distill": {"name": "cf", "cache": str(cache), "student": STUDENT, "student_input_size": 64,
                    "output": str(tmp_path / "run"), "recipe": "demo", "epochs": 1, "batch_size": 4, "workers": 0}}))
    first = CliRunner().invoke(app, ["distill", str(job), "--device", "cpu", "--cache-first"])
    assert first.exit_code == 0, first.output
    assert calls == [str(cache)] and CacheReader(cache).manifest["complete"] is True
    made = file_sums(cache)
    again = CliRunner().invoke(app, ["distill", str(job), "--device", "cpu", "--cache-first", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert calls == [str(cache)] and file_sums(cache) == made  # complete: not run again, nothing rewritten


def _recording_forward(monkeypatch, nan_at: int | None = None):
    """Wrap the distiller's forward: record each step's terms and batch size; make step nan_at's loss NaN."""
    from scalekd.distiller import LOSS_TERMS, ScaleKDDistiller

    seen, forward = [], ScaleKDDistiller.forward

    def wrapped(self, images, targets, labels):
        terms = forward(self, images, targets, labels)
        if self.training:
            if nan_at is not None and len(seen) + 1 == nan_at:
                terms = terms | {"loss": terms["loss"] * float("nan")}
            seen.append(({k: terms[k].item() for k in (*LOSS_TERMS, "loss")}, images.shape[0]))
        return terms

    monkeypatch.setattr(ScaleKDDistiller, "forward", wrapped)
    return seen


@pytest.mark.parametrize("read_every", [1, 2, 20])
def test_the_logged_epoch_terms_are_the_batch_weighted_mean_of_every_steps_terms(world, tmp_path, monkeypatch,
                                                                               read_every):
    import pipeline.trainer as trainer

    monkeypatch.setattr(trainer, "READ_EVERY", read_every)
    steps = _recording_forward(monkeypatch)
    cache = world["caches"][("zarr", "fp16")]
    out = train(_spec(world, cache, tmp_path / "run", epochs=1), progress=False, log=lambda m: None)
    (record,) = _results(out["metrics"])
    assert len(steps) == 3 and record["samples"] == sum(n for _, n in steps) == 12
    for k, v in record["train"].items():  # the sums are float64: the same as summing the read-back floats
        assert v == pytest.approx(sum(t[k] * n for t, n in steps) / 12, rel=1e-12, abs=0), k


def test_a_nan_loss_stops_the_run_naming_its_first_step(world, tmp_path, monkeypatch):
    import pipeline.trainer as trainer

    monkeypatch.setattr(trainer, "READ_EVERY", 20)  # read at the epoch's end, after the NaN's step
    _recording_forward(monkeypatch, nan_at=2)
    cache = world["caches"][("zarr", "fp16")]
    with pytest.raises(FloatingPointError) as e:
        train(_spec(world, cache, tmp_path / "run", epochs=1), progress=False, log=lambda m: None)
    assert str(e.value) == "loss became nan at epoch 1, step 2 (read every 20 steps)"


def test_a_gpu_runs_checkpoint_carries_and_restores_the_gpus_random_stream(monkeypatch):
    """Drop-path masks are drawn on the GPU: its stream is saved and restored with the CPU's (the CUDA
    calls stand in here, as this machine has no GPU); a CPU run's checkpoint is as before."""
    from pipeline.trainer import _restore_rng, _rng_states

    gpu, calls = torch.device("cuda", 1), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, int(device.index)], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.tolist(), device)))
    assert list(_rng_states(torch.device("cpu"))) == ["rng"]
    state = _rng_states(gpu)
    assert torch.equal(state["rng"], torch.get_rng_state()) and state["cuda_rng"].tolist() == [7, 1]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    saved = _rng_states(gpu)
    torch.rand(5)
    _restore_rng(saved, gpu)
    assert torch.equal(torch.rand(3), expected) and calls == [([7, 1], gpu)]
    _restore_rng({"rng": saved["rng"]}, gpu)  # a CPU run's checkpoint resumed on a GPU: the GPU's stream as seeded
    assert len(calls) == 1


def test_a_numbered_gpu_becomes_the_current_one(monkeypatch):
    """--device cuda:1: the loader's pinning thread works on the current GPU, so it is made cuda:1 (the
    CUDA call stands in here; this machine has no GPU)."""
    from pipeline.trainer import _use

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for name in ("cpu", "cuda", "cuda:1"):
        assert _use(torch.device(name)) == torch.device(name)
    assert calls == [torch.device("cuda", 1)]
