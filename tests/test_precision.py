"""teacher.precision (fp32 | bf16 | fp16): checked in the job spec, part of the cache's configuration,
recorded in its manifest, used by the caching teacher, and by the trainer's online teacher, so that
cached ≡ online holds at every precision (the correctness anchor, per precision). fp16 needs CUDA:
on a CPU it is refused (scalekd.targets.teacher_precision says why); its online test runs on a GPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _cache_helpers import make_imagefolder, make_spec, manifest, replay, run, save_checkpoint
from pipeline.cache_job import CacheConfigError, TeacherForward
from pipeline.job_spec import TrainSpec, load_cache_spec
from pipeline.reader import CacheReader
from pipeline.train_data import collate_skipping
from pipeline.trainer import build_run
from scalekd.targets import OnlineTargets, Targets, teacher_precision
from scalekd.teacher import TeacherSplit

CPU_PRECISIONS = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
FP16 = {"final": "fp16", "logits": "fp16"}
FP32 = {"final": "fp32", "logits": "fp32"}


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEKD_WORK", str(tmp_path / "work"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a teacher checkpoint, and caches of it at each precision this machine runs (fp32 and fp16 stores)."""
    root = tmp_path_factory.mktemp("precision")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data", per_class=2, corrupt=False)
        ckpt = save_checkpoint(root / "teacher.safetensors")
        caches = {}
        for precision in CPU_PRECISIONS:
            for codec, roles in (("fp32", FP32), ("fp16", FP16)):
                spec = _cache_spec(data, root / f"cache-{precision}-{codec}", ckpt, precision, roles=roles)
                run(spec)
                caches[(precision, codec)] = spec.output
    return {"data": data, "ckpt": ckpt, "caches": caches}


def _cache_spec(data, out, ckpt, precision, **kw):
    spec = make_spec(data, out, ckpt, samples_per_shard=3, per_image=2, **kw)
    spec.teacher["precision"] = precision
    return spec


def test_an_unknown_precision_is_refused_naming_the_key_and_the_choices(tmp_path):
    with pytest.raises(ValueError) as e:
        load_cache_spec(None, name="t", dataset={"kind": "demo"}, output=str(tmp_path / "c"),
                        teacher={"name": "vit_tiny_patch16_224", "precision": "fp8"})
    assert "cache.teacher.precision" in str(e.value) and "'bf16'" in str(e.value) and "'fp8'" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on a CPU only")
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_fp16_on_a_cpu_is_refused_before_the_output_exists(world, tmp_path, engine, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: its teacher runs on this machine
    out = tmp_path / "c"
    with pytest.raises(ValueError, match=r"cache\.teacher\.precision: .*'fp16' needs a CUDA device.*'bf16'"):
        run(_cache_spec(world["data"], out, world["ckpt"], "fp16"), engine=engine)
    assert not out.exists()


def test_the_manifest_records_the_precision_and_only_a_non_fp32_one_changes_the_configuration(world):
    for precision in CPU_PRECISIONS:
        m = manifest(world["caches"][(precision, "fp32")])
        assert m["teacher"]["precision"] == precision
        # fp32 caches made before precision existed keep their configuration (and so resume)
        assert m["config"].get("teacher_precision") == (None if precision == "fp32" else precision)


def test_inspect_shards_shows_the_precision(world):
    from pipeline.inspect_cache import describe

    assert describe(world["caches"][("bf16", "fp16")])["teacher_precision"] == "bf16"
    assert describe(world["caches"][("fp32", "fp16")])["teacher_precision"] == "fp32"


def test_a_cache_of_another_precision_is_another_configuration(world, tmp_path):
    out = tmp_path / "c"
    run(_cache_spec(world["data"], out, world["ckpt"], "fp32", roles=FP32))
    with pytest.raises(CacheConfigError, match="teacher_precision: cache has None, this run 'bf16'"):
        run(_cache_spec(world["data"], out, world["ckpt"], "bf16", roles=FP32))


def test_stored_bf16_outputs_are_the_teacher_under_bf16_and_differ_from_fp32(world):
    from pipeline.weights import load_teacher
    from _cache_helpers import LATE_BLOCKS, TEACHER_KWARGS, TEACHER_NAME

    split, _ = load_teacher(TEACHER_NAME, checkpoint=world["ckpt"], late_blocks=LATE_BLOCKS, **TEACHER_KWARGS)
    reader = CacheReader(world["caches"][("bf16", "fp32")])
    fp32_reader = CacheReader(world["caches"][("fp32", "fp32")])
    for i in range(len(reader)):
        for v in range(2):
            stored = reader.read(i, v)["final"]
            with teacher_precision("cpu", "bf16"):
                _, live = replay(split, reader[i], v)
            rel_live = np.linalg.norm(stored - live["final"]) / np.linalg.norm(live["final"])
            rel_fp32 = np.linalg.norm(stored - fp32_reader.read(i, v)["final"]) / np.linalg.norm(live["final"])
            assert stored.dtype == np.float32
            assert rel_live < 1e-5, (i, v, rel_live)  # an fp32 store: the bf16 teacher's outputs as they were
            assert rel_fp32 > 1e-4, "the bf16 cache holds fp32 outputs: autocast was not applied"


def test_teacher_forward_casts_outputs_to_float32(world):
    from _cache_helpers import teacher_dict

    t = teacher_dict(world["ckpt"]) | {"precision": "bf16"}
    fwd = TeacherForward(t, str(world["ckpt"]), ["final", "logits"], batch_size=2, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), np.uint8)
    row = fwd({"shard": 0, "pixels": pixels, "samples": json.dumps([{}, {}])})
    assert row["final"].dtype == np.float32 and row["logits"].dtype == np.float32


def _train_spec(cache, output, **kw) -> TrainSpec:
    kw = {"recipe": "demo", "epochs": 1, "batch_size": 4, "workers": 0, "student_input_size": 64,
          "device": "cpu"} | kw
    return TrainSpec(name="t", cache=str(cache), student="test_resnet", output=str(output), **kw)


def _terms(spec, epoch):
    reader, data, distiller, online, _ = build_run(spec, torch.device("cpu"))
    data.set_epoch(epoch)
    b = collate_skipping([data[i] for i in range(4)])
    distiller.train()
    targets = (online(data.to_device(b, "teacher_image", "cpu")) if online is not None
               else Targets.from_final(b["final"].float(), b["logits"].float()))
    out = distiller(data.to_device(b, "image", "cpu"), targets, b["label"])
    return {k: v.item() for k, v in out.items() if k != "logits"}, targets, online


# The store's precision, whatever the teacher's: the teacher at one precision gives the same float32
# outputs in the cache job's batches and the trainer's (measured here: relative 0 on an fp32 store at
# fp32 and at bf16, 2.1e-4 on an fp16 store at either).
BOUNDS = {"fp32": 1e-5, "fp16": 1e-3}


@pytest.mark.parametrize("codec", ["fp32", "fp16"])
@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_cached_loss_terms_equal_online_at_the_caches_precision(world, tmp_path, precision, codec):
    cache, bound = world["caches"][(precision, codec)], BOUNDS[codec]
    for epoch in (0, 1):
        cached, t_cached, _ = _terms(_train_spec(cache, tmp_path / "c"), epoch)
        online, t_online, source = _terms(_train_spec(cache, tmp_path / "o", targets="online"), epoch)
        assert source.precision == precision  # the online teacher runs at the cache's precision
        rel = (t_cached.final - t_online.final).norm() / t_online.final.norm()
        assert rel < bound, f"final targets differ by relative {rel:.2e}"
        assert t_online.final.dtype == torch.float32 and t_online.final_dc_removed.dtype == torch.float32
        for k in cached:
            assert cached[k] == pytest.approx(online[k], rel=bound, abs=1e-6), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on a CPU only")
def test_online_targets_refuse_fp16_on_a_cpu():
    from pipeline.weights import load_teacher
    from _cache_helpers import LATE_BLOCKS, TEACHER_KWARGS, TEACHER_NAME

    split, _ = load_teacher(TEACHER_NAME, late_blocks=LATE_BLOCKS, **TEACHER_KWARGS)
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        OnlineTargets(split, "fp16")
    assert isinstance(split, TeacherSplit)


def test_recompute_reruns_the_teacher_at_the_caches_precision(world):
    """inspect-shards --recompute compares stored outputs with the teacher re-run as it was cached."""
    from pipeline.inspect_cache import recompute

    out = recompute(world["caches"][("bf16", "fp32")], n=2)
    assert out["views_checked"] == 2 and not out["fingerprint_mismatches"]
    assert max(out["max_rel_l2"].values()) < 1e-5, out["max_rel_l2"]


def test_a_run_that_asks_for_another_precision_is_refused_naming_it(world, tmp_path):
    from pipeline.late import CacheMismatchError

    cache = world["caches"][("bf16", "fp16")]
    with pytest.raises(CacheMismatchError, match="teacher precision = 'bf16', but this run asks for precision = 'fp32'"):
        build_run(_train_spec(cache, tmp_path / "r", teacher={"precision": "fp32"}), torch.device("cpu"))
    build_run(_train_spec(cache, tmp_path / "r", teacher={"precision": "bf16"}), torch.device("cpu"))


def test_check_late_reruns_late_at_the_caches_precision(world, tmp_path):
    """inspect-shards --check-late: late on stored mid against stored final, at the precision they were made."""
    from pipeline.inspect_cache import check_late

    out = tmp_path / "c"
    run(_cache_spec(world["data"], out, world["ckpt"], "bf16", roles={"final": "fp32", "mid": "fp32", "logits": "fp32"}))
    report = check_late(out, n=3)
    assert report["ok"] and max(report["max_rel_l2"].values()) < 1e-5, report


def test_an_fp32_teacher_on_a_gpu_runs_its_convolutions_without_tf32():
    """cuDNN's float32 convolutions are TF32 by default on a GPU: the fp32 context turns that off while
    the teacher runs and restores it after (the flags alone are set here; this machine has no GPU)."""
    from scalekd.targets import teacher_precision

    cudnn = torch.backends.cudnn
    before = (cudnn.allow_tf32, cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    assert before[0] is True  # torch's default
    with teacher_precision("cuda", "fp32"):
        assert (cudnn.allow_tf32, cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == (False, *before[1:])
    assert (cudnn.allow_tf32, cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == before
    with teacher_precision("cpu", "fp32"):
        assert cudnn.allow_tf32 is True
