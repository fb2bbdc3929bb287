"""The exported student: a timm model folder that plain timm (no project code) loads with the input
size and normalisation the student was trained and evaluated with, and the same logits."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from _cache_helpers import make_imagefolder, make_spec, run, save_checkpoint
from pipeline.export import eval_data_config, export_timm_folder
from pipeline.job_spec import TrainSpec
from pipeline.trainer import train
from scalekd.student import create_student

# Run in a fresh interpreter from an empty folder with no PYTHONPATH: the project cannot be imported.
_PLAIN_TIMM = r"""
import json, sys
import numpy as np, timm, torch
from timm.data import resolve_data_config
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
with torch.no_grad():
    np.save(sys.argv[3], model(torch.from_numpy(np.load(sys.argv[2]))).numpy())
print(json.dumps({"data_config": resolve_data_config(model=model), "class": type(model).__name__,
                  "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("scalekd", "pipeline"))}))
"""


def _plain_timm(folder: Path, x: torch.Tensor, tmp: Path) -> tuple[dict, torch.Tensor]:
    """(what plain timm reports about the folder, its logits for x), from a process that never imports the project."""
    np.save(tmp / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    empty = tmp / "elsewhere"
    empty.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _PLAIN_TIMM, str(folder), str(tmp / "x.npy"), str(tmp / "y.npy")],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["project_modules"] == []
    return report, torch.from_numpy(np.load(tmp / "y.npy"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _normal_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_a_trained_student_loads_in_plain_timm_at_its_training_size_with_the_same_logits(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=2, corrupt=False)
    cache = tmp_path / "cache"
    run(make_spec(data, cache, save_checkpoint(tmp_path / "teacher.safetensors"), samples_per_shard=6, per_image=1))
    spec = TrainSpec(name="t", cache=str(cache), student="test_resnet", output=str(tmp_path / "run"), recipe="demo",
                     epochs=1, batch_size=3, workers=0, student_input_size=64, device="cpu")
    result = train(spec, progress=False, log=lambda m: None)
    folder = Path(result["student_folder"])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    student = timm.create_model("test_resnet", num_classes=10)
    from safetensors.torch import load_file

    student.load_state_dict(load_file(result["student"]))  # the run folder's student.safetensors is kept
    student.eval()
    trained_with = eval_data_config(student, (3, 64, 64))  # what the trainer evaluated with
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    x = torch.randn(2, 3, 64, 64)
    report, logits = _plain_timm(folder, x, tmp_path)
    assert report["data_config"] == json.loads(json.dumps(trained_with))
    with torch.no_grad():
        torch.testing.assert_close(logits, student(x), rtol=1e-5, atol=1e-6)
    for f in (folder / "config.json", folder / "model.safetensors", Path(result["student"])):
        assert _mode(f) == _normal_mode(), f  # safetensors alone would leave 0600


def test_a_student_only_this_project_names_is_exported_under_a_timm_name_that_rebuilds_it(tmp_path):
    """ViT-B/14 (registered by scalekd.student) → vit_base_patch16_224 with patch_size=14; a student
    input size other than 224 reaches the model as img_size."""
    taps = create_student("vit_base_patch14_224", num_classes=5, input_size=56, depth=4, embed_dim=32, num_heads=2)
    assert taps.model_args["img_size"] == 56 and taps.model.patch_embed.img_size == (56, 56)
    out = export_timm_folder(taps.model, tmp_path / "student", taps.input_size)
    assert out == {"folder": str(tmp_path / "student"), "architecture": "vit_base_patch16_224", "plain_timm": True}
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224"
    assert {k: config["model_args"][k] for k in ("patch_size", "depth", "embed_dim", "num_heads", "img_size")} == \
        {"patch_size": 14, "depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": [56, 56]}
    x = torch.randn(2, 3, 56, 56)
    report, logits = _plain_timm(tmp_path / "student", x, tmp_path)
    assert report["class"] == "VisionTransformer" and report["data_config"]["input_size"] == [3, 56, 56]
    taps.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, taps.model(x), rtol=1e-5, atol=1e-6)


def test_a_mixer_b14_student_is_exported_under_its_own_name_and_says_plain_timm_cannot_build_it(tmp_path):
    taps = create_student("mixer_b14_224", num_classes=5, num_blocks=4, embed_dim=32)
    out = export_timm_folder(taps.model, tmp_path / "student", taps.input_size)
    assert out["plain_timm"] is False and out["architecture"] == "mixer_b14_224"
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["architecture"] == "mixer_b14_224" and config["model_args"]["num_blocks"] == 4
    # with the project's registration, timm loads it back
    back = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    taps.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), taps.model(x), rtol=0, atol=0)


def test_an_export_never_removes_files_it_did_not_write(tmp_path):
    """A student folder holding a user's file is refused, the file kept; an earlier export is replaced."""
    import timm

    from pipeline.export import export_timm_folder

    model = timm.create_model("test_resnet", num_classes=3)
    folder = tmp_path / "student"
    export_timm_folder(model, folder)
    export_timm_folder(model, folder)  # its own earlier export: replaced
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files this export did not write"):
        export_timm_folder(model, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "student.tmp").exists()
    # its staging folder too: a killed export's leftovers are replaced, a user's folder of that name is kept
    (tmp_path / "other.tmp").mkdir()
    (tmp_path / "other.tmp" / "config.json").write_text("{}")
    export_timm_folder(model, tmp_path / "other")
    assert not (tmp_path / "other.tmp").exists()
    (tmp_path / "other.tmp").mkdir()
    (tmp_path / "other.tmp" / "data.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="other.tmp holds files this export did not write"):
        export_timm_folder(model, tmp_path / "other")
    assert (tmp_path / "other.tmp" / "data.csv").read_text() == "mine"
