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
JOBS = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml")
              if "cache" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_job_spec_parses_and_its_teacher_splits(path):
    spec = load_cache_spec(path)
    info = teacher_info_for(spec.teacher)  # meta device: no weights, no download
    assert info.final_tokens > 0 and info.mid_channels > 0
    train = load_train_spec(path)
    assert train.cache == spec.output


def test_the_job_specs_are_the_demo_and_the_two_paper_teachers():
    assert {p.stem for p in JOBS} == {"demo", "swinl-imagenet", "eva-imagenet"}


def test_paper_specs_split_the_teachers_as_scalekd_md_says():
    by_name = {p.stem: load_cache_spec(p) for p in JOBS}
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
