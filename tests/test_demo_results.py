"""bench/demo_results.py without training: its aggregation, its configurations and the specs it derives."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import demo_results as dr  # noqa: E402


def test_aggregate_mean_min_max_n():
    a = dr.aggregate([70.0, 80.0, 75.0])
    assert a["n"] == 3
    assert a["mean"] == pytest.approx(75.0)
    assert (a["min"], a["max"]) == (70.0, 80.0)
    assert a["std"] == pytest.approx(5.0)
    one = dr.aggregate([62.5])
    assert (one["n"], one["mean"], one["min"], one["max"], one["std"]) == (1, 62.5, 62.5, 62.5, None)
    assert dr.aggregate([])["n"] == 0 and dr.aggregate([None])["mean"] is None


def test_aggregate_runs_groups_by_config():
    runs = [{"config": "kd", "seed": 0, "top1": 50.0, "top5": 90.0, "seconds": 10.0, "samples_per_s": 30.0},
            {"config": "kd", "seed": 1, "top1": 60.0, "top5": 100.0, "seconds": 12.0, "samples_per_s": 28.0},
            {"config": "student", "seed": 0, "top1": 40.0, "top5": 80.0, "seconds": 9.0, "samples_per_s": 31.0}]
    agg = dr.aggregate_runs(runs, ["student", "kd"])
    assert list(agg) == ["student", "kd"]
    assert agg["kd"]["n_seeds"] == 2 and agg["kd"]["seeds"] == [0, 1]
    assert agg["kd"]["top1"] == {"n": 2, "mean": 55.0, "min": 50.0, "max": 60.0, "std": pytest.approx(7.0711, 1e-4)}
    assert agg["kd"]["top5"]["mean"] == 95.0 and agg["kd"]["seconds"]["max"] == 12.0
    assert agg["student"]["n_seeds"] == 1 and agg["student"]["top1"]["min"] == agg["student"]["top1"]["max"] == 40.0
    assert dr.paired_differences(runs, "kd", "student") == [10.0]


def test_five_configs_with_their_loss_targets_and_cache():
    cs = {c.name: c for c in dr.configs(4)}
    assert list(cs) == ["student", "kd", "scalekd-cache", "scalekd-online", "scalekd-cache-k1"]
    assert cs["student"].loss == {"features": False, "kd_weight": 0.0}
    assert cs["kd"].loss == {"features": False}
    for name in ("scalekd-cache", "scalekd-online", "scalekd-cache-k1"):
        assert cs[name].loss == {}  # the preset: CAP feature terms and logit KD
    assert [c.name for c in cs.values() if c.targets == "online"] == ["scalekd-online"]
    assert {n: c.overrides("cache/demo", "cache/demo-k1")["cache"] for n, c in cs.items()} == {
        "student": "cache/demo", "kd": "cache/demo", "scalekd-cache": "cache/demo",
        "scalekd-online": "cache/demo", "scalekd-cache-k1": "cache/demo-k1"}


def test_specs_derive_from_the_demo_job():
    cache, k1, base = dr.load_specs(str(ROOT / "jobs/demo.yaml"))
    assert cache.views.per_image >= 4 and k1.views.per_image == 1
    assert k1.views.seed == cache.views.seed and k1.output == dr.K1_CACHE and k1.output != cache.output
    assert (k1.teacher, k1.dataset, k1.roles, k1.format) == (cache.teacher, cache.dataset, cache.roles, cache.format)
    specs = {c.name: dr.run_spec(base, c, seed=3, epochs=2, output=f"out/{c.name}", k4_cache=cache.output,
                                 k1_cache=k1.output, max_steps=2, device="cpu") for c in dr.configs(4)}
    for name, s in specs.items():
        assert (s.student, s.student_input_size, s.recipe, s.val) == (base.student, base.student_input_size,
                                                                      base.recipe, base.val)
        assert (s.seed, s.epochs, s.max_steps_per_epoch, s.workers, s.batch_size) == (3, 2, 2, base.workers,
                                                                                      base.batch_size)
    assert specs["scalekd-online"].targets == "online" and specs["scalekd-cache"].targets == "cache"
    assert specs["scalekd-cache-k1"].cache == k1.output and specs["scalekd-cache"].cache == cache.output
    assert specs["student"].loss == {"features": False, "kd_weight": 0.0}


def test_estimate_adds_up():
    est = dr.estimate_seconds(["student", "scalekd-cache"], seeds=2, epochs=3, samples_per_epoch=224)
    cal = dr.CALIBRATION
    one = cal["run_overhead_s"] + 3 * (224 / cal["samples_per_s"]["scalekd-cache"] + cal["eval_s"])
    assert est["per_config"]["scalekd-cache"] == pytest.approx(2 * one)
    assert est["total"] == pytest.approx(sum(est["per_config"].values()) + cal["teacher_eval_s"])
