"""Every job spec under jobs/ parses, names a teacher the split covers, and pairs a student with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache_job import teacher_info_for
from pipeline.datasets import DatasetError, list_dataset
from pipeline.job_spec import load_cache_spec, load_train_spec

import yaml

# job specs have a cache: section (jobs/ also holds the Ray runtime environment)
ROOT = Path(__file__).resolve().parents[1] / "jobs"
JOBS = sorted(p for p in ROOT.glob("**/*.yaml") if "cache" in (yaml.safe_load(p.read_text()) or {}))
NAMES = [p.relative_to(ROOT).with_suffix("").as_posix() for p in JOBS]

# Table 3's published pairs (RECIPES.md): job file → (student, recipe)
TABLE3 = {
    "swinl-imagenet/mbv1": ("mobilenetv1_100", "mbv1-advanced"),
    "swinl-imagenet/mbv1-traditional": ("mobilenetv1_100", "mbv1-traditional"),
    "swinl-imagenet/r50": ("resnet50d", "r50-advanced"),
    "swinl-imagenet/r50-traditional": ("resnet50", "r50-traditional"),
    "swinl-imagenet/convnext-t": ("convnext_tiny", "convnext-t"),
    "swinl-imagenet/mixer-s16": ("mixer_s16_224", "mixer-s16"),
    "swinl-imagenet/mixer-b16": ("mixer_b16_224", "mixer-b16"),
    "swinl-imagenet/vit-s16": ("deit_small_patch16_224", "vit-s16"),
    "swinl-imagenet/swin-t": ("swin_tiny_patch4_window7_224", "swin-t"),
    "swinl-imagenet/vit-b16": ("deit_base_patch16_224", "vit-b16"),
    "eva-imagenet/r50": ("resnet50d", "r50-advanced"),
    "eva-imagenet/mixer-b14": ("mixer_b14_224", "mixer-b14"),
    "eva-imagenet/vit-b14": ("vit_base_patch14_224", "vit-b14"),
}


@pytest.mark.parametrize("path", JOBS, ids=NAMES)
def test_job_spec_parses_and_its_teacher_splits(path):
    spec = load_cache_spec(path)
    info = teacher_info_for(spec.teacher)  # meta device: no weights, no download
    assert info.final_tokens > 0 and info.mid_channels > 0
    train = load_train_spec(path)
    assert train.cache == spec.output


def test_the_job_specs_are_the_demos_the_two_paper_teachers_and_each_table3_pair():
    assert set(NAMES) == {"demo", "demo-advanced", "swinl-imagenet", "eva-imagenet"} | set(TABLE3)


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_each_table3_job_trains_its_student_with_its_recipe_from_a_cache_of_the_recipes_views(name):
    from pipeline.recipes import RECIPES

    path = ROOT / f"{name}.yaml"
    cache, train = load_cache_spec(path), load_train_spec(path)
    assert (train.student, train.recipe) == TABLE3[name]
    wanted = RECIPES[train.recipe]["views"]
    assert (cache.views.rand_augment, cache.views.erasing) == (wanted["rand_augment"], wanted["erasing"])
    assert cache.teacher["name"] == load_cache_spec(ROOT / f"{name.split('/')[0]}.yaml").teacher["name"]


def test_jobs_that_name_one_cache_folder_describe_one_cache():
    """cache-teacher on a complete cache of the same configuration does nothing: the pairs share caches."""
    by_output: dict[str, list] = {}
    for path in JOBS:
        spec = load_cache_spec(path)
        by_output.setdefault(spec.output, []).append(spec)
    assert len(by_output) == 2 + 5 + 4  # the two demos; Swin-L: T, S, M, R, R−; EVA: T, S, M, R
    for specs in by_output.values():
        assert all(s == specs[0] for s in specs[1:])


def test_paper_specs_split_the_teachers_as_scalekd_md_says():
    by_name = {n: load_cache_spec(p) for n, p in zip(NAMES, JOBS)}
    swin = teacher_info_for(by_name["swinl-imagenet"].teacher)
    assert (swin.mid_hw, swin.mid_channels, swin.final_hw, swin.final_channels) == ((14, 14), 768, (7, 7), 1536)
    eva = teacher_info_for(by_name["eva-imagenet"].teacher)
    assert (eva.mid_hw, eva.final_hw, eva.final_channels, eva.num_prefix_tokens) == ((16, 16), (16, 16), 1024, 1)
    assert eva.split_point == "blocks.22"


def test_unknown_spec_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {name: x, dataset: {kind: demo, root: d}, teacher: {name: swin_tiny_patch4_window7_224}, "
                   "output: o, sampels_per_shard: 3}\n")
    with pytest.raises(ValueError, match="sampels_per_shard"):
        load_cache_spec(bad)


def test_class_index_json_pins_labels(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "x.png")
    refs, _, _ = list_dataset({"kind": "imagefolder", "root": str(tmp_path), "split": "train"})
    assert [r.label for r in refs] == [0, 1]
    (tmp_path / "class_index.json").write_text(json.dumps({"a": 285, "b": 967}))
    refs, _, _ = list_dataset({"kind": "imagefolder", "root": str(tmp_path), "split": "train"})
    assert [r.label for r in refs] == [285, 967]
    (tmp_path / "class_index.json").write_text(json.dumps({"a": 285}))
    with pytest.raises(DatasetError, match=r"class_index.json gives no label for class folder\(s\) \['b'\]"):
        list_dataset({"kind": "imagefolder", "root": str(tmp_path), "split": "train"})


def test_demo_labels_are_the_teachers_imagenet_classes(tmp_path):
    from pipeline.datasets import DEMO_LABELS

    refs, classes, _ = list_dataset({"kind": "demo", "root": str(tmp_path / "demo"), "split": "val"})
    assert {r.key.split("/")[0]: r.label for r in refs} == DEMO_LABELS
    assert DEMO_LABELS["coffee"] == 967 and DEMO_LABELS["chelsea"] == 285
