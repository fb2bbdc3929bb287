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
