"""The CLI: choices that help and completion list, --version, -h, --json, exit codes (1: the command
ran and failed; 2: the command line or job spec is wrong), one vocabulary across commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from _cache_helpers import TEACHER_NAME, make_imagefolder, save_checkpoint, teacher_dict
from pipeline.cli import app
from pipeline.recipes import ALIASES, RECIPES

WIDE = {"COLUMNS": "250", "TERM": "dumb"}


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A job spec of the tiny teacher, with a cache written through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = make_imagefolder(root / "data", per_class=2, corrupt=False)
    spec = {"cache": {"name": "cli", "dataset": {"kind": "imagefolder", "root": str(data)},
                      "teacher": teacher_dict(save_checkpoint(root / "teacher.safetensors")),
                      "views": {"per_image": 1}, "output": str(root / "cache"), "samples_per_shard": 4,
                      "roles": {"final": "fp16", "logits": "fp16"}},
            "distill": {"name": "cli", "cache": str(root / "cache"), "student": "test_resnet", "student_input_size": 64,
                        "output": str(root / "run"), "recipe": "demo", "epochs": 1, "batch_size": 3, "workers": 0,
                        "device": "cpu"}}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    made = _invoke("cache-teacher", path, "--engine", "local", "--json")
    assert made.exit_code == 0, made.output
    return {"root": root, "path": path, "summary": json.loads(made.stdout)}


def test_version_prints_the_package_version():
    from importlib.metadata import version

    r = _invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"scalekd-pipeline {version('scalekd-pipeline')}"


@pytest.mark.parametrize("command", [[], ["cache-teacher"], ["distill"], ["inspect-shards"], ["teacher-info"]])
def test_dash_h_is_help(command):
    r = _invoke(*command, "-h")
    assert r.exit_code == 0 and "Usage" in r.output and "--help" in r.output


@pytest.mark.parametrize("command, option, choices", [
    ("cache-teacher", "--format", "[zarr|webdataset]"), ("cache-teacher", "--engine", "[ray|local]"),
    ("distill", "--targets", "[cache|online]"), 
    ("distill", "--device", "[auto|cpu|cuda|cuda:N]"),
])
def test_help_lists_every_choice(command, option, choices):
    r = _invoke(command, "-h")
    line = next(l for l in r.output.splitlines() if option in l)
    assert choices.strip("[]") in line.replace("<", "[").replace(">", "]"), line


def test_distill_help_names_every_recipe_and_earlier_name():
    text = _flat(_invoke("distill", "-h").output)
    assert "--recipe NAME" in text
    assert f"training recipe (pipeline/recipes.py): {', '.join(RECIPES)}; earlier names {', '.join(ALIASES)}" in text


@pytest.mark.parametrize("command, option, typed, offered", [
    ("cache-teacher", "--format", "w", ["webdataset"]), ("cache-teacher", "--engine", "", ["ray", "local"]),
    ("distill", "--targets", "c", ["cache"]), ("distill", "--recipe", "d", ["demo", "demo-advanced", "deit"]),
    ("distill", "--device", "cu", ["cuda", "cuda:0"]),
])
def test_completion_offers_the_choices(command, option, typed, offered):
    import click

    group = typer.main.get_command(app)
    cmd = group.commands[command]
    param = next(p for p in cmd.params if option in p.opts)
    ctx = click.Context(cmd, info_name=command)
    assert [c.value for c in param.shell_complete(ctx, typed)] == offered


@pytest.mark.parametrize("args, found", [
    (["cache-teacher", "--format", "tar"], "'tar' is not one of 'zarr', 'webdataset'"),
    (["cache-teacher", "--engine", "dask"], "'dask' is not one of 'ray', 'local'"),
    (["distill", "--targets", "disk"], "'disk' is not one of 'cache', 'online'"),
    (["distill", "--device", "gpu"], "'gpu' is not one of auto, cpu, cuda, cuda:N"),
])
def test_a_wrong_choice_is_a_usage_error(args, found):
    r = _invoke(*args)
    assert r.exit_code == 2 and found in _flat(r.output)


def test_a_command_that_runs_and_fails_exits_1_and_writes_nothing(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=1, corrupt=False)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"cache": {"name": "x", "dataset": {"kind": "imagefolder", "root": str(data)},
                                             "teacher": {"name": "eva02_tiny_patch14_224"}, "output": str(tmp_path / "c")}}))
    r = _invoke("cache-teacher", job, "--engine", "local")
    assert r.exit_code == 1 and "error: teacher eva02_tiny_patch14_224 has no classification head" in r.output
    assert not (tmp_path / "c").exists()


def test_distill_of_a_cache_that_does_not_exist_exits_1(job, tmp_path):
    r = _invoke("distill", job["path"], "--cache", tmp_path / "none", "-o", tmp_path / "run")
    assert r.exit_code == 1 and f"error: {tmp_path / 'none'} is not a teacher cache" in r.output


def test_distill_json_says_where_everything_is(job):
    r = _invoke("distill", job["path"], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert Path(out["student_folder"], "config.json").is_file() and Path(out["student"]).is_file()
    assert Path(out["job_spec"]).is_file() and Path(out["metrics"]).is_file() and out["last"]["epoch"] == 1


def test_cache_teacher_and_inspect_shards_use_one_name_for_the_compression_ratio_and_count_shards(job):
    summary = job["summary"]
    r = _invoke("inspect-shards", summary["cache"], "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    for key in ("compression_ratio", "shards", "shards_expected", "bytes_on_disk"):
        assert report[key] == summary[key], key
    assert (report["shards"], report["shards_expected"]) == (2, 2)
    assert "ratio_to_fp32" not in report and "ratio_to_fp32" not in summary


def test_teacher_info_of_the_tiny_teacher_is_plain_text_by_default():
    r = _invoke("teacher-info", TEACHER_NAME, "--kwargs", '{"depth": 2, "img_size": 64, "num_classes": 10}',
                "--late-blocks", "1")
    assert r.exit_code == 0 and "split_point: blocks.1" in _flat(r.stdout)
