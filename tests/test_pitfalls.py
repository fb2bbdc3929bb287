"""timm pitfalls, each stopped early with a message that says what to change (pipeline/pitfalls.py,
pipeline/teacher_report.py, scalekd/student.py)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from _cache_helpers import TEACHER_KWARGS, TEACHER_NAME, make_imagefolder, make_spec, run, save_checkpoint
from pipeline import pitfalls
from pipeline.cli import app
from pipeline.teacher_report import describe_teacher, meta_split
from scalekd.student import create_student

NO_HEAD = ("teacher {name} has no classification head (num_classes=0 in timm's default for it), but the cache "
           "stores the teacher's logits and the KD loss needs them: give the number of classes of the checkpoint's "
           "head in the job spec, teacher: {{kwargs: {{num_classes: N}}}}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("pitfalls") / "data", per_class=1, corrupt=False)


# --- a teacher without a head


def test_a_teacher_without_a_head_is_refused_before_any_output_exists(data, tmp_path):
    spec = make_spec(data, tmp_path / "cache", None)
    spec.teacher = {"name": "eva02_tiny_patch14_224"}  # timm's default: the MIM checkpoint, num_classes=0
    with pytest.raises(ValueError) as e:
        run(spec)
    assert str(e.value) == NO_HEAD.format(name="eva02_tiny_patch14_224")
    assert not (tmp_path / "cache").exists()


def test_teacher_info_warns_about_a_teacher_without_a_head_and_takes_kwargs():
    r = CliRunner().invoke(app, ["teacher-info", "vit_small_patch14_reg4_dinov2", "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == "warning: " + NO_HEAD.format(name="vit_small_patch14_reg4_dinov2")
    assert json.loads(r.stdout)["num_classes"] == 0
    r = CliRunner().invoke(app, ["teacher-info", "vit_small_patch14_reg4_dinov2", "--json", "--kwargs", '{"num_classes": 7}'])
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["num_classes"] == 7


@pytest.mark.parametrize("text, found", [("{nope", "not valid JSON (Expecting property name enclosed in double quotes "
                                                   "at character 1): {nope"),
                                         ("[1]", "expected a JSON object such as '{\"num_classes\": 1000}', found [1]")])
def test_teacher_info_kwargs_that_are_not_a_json_object_are_a_usage_error(text, found):
    r = CliRunner().invoke(app, ["teacher-info", "vit_tiny_patch16_224", "--kwargs", text])
    assert r.exit_code == 2 and found in " ".join(r.output.replace("│", " ").split())


# --- teacher-info builds nothing real


def test_teacher_info_builds_the_teacher_on_the_meta_device():
    split = meta_split("swin_large_patch4_window7_224")
    assert all(p.is_meta for p in split.model.parameters())
    info, warnings = describe_teacher("swin_large_patch4_window7_224")
    assert warnings == [] and info["split_point"] == "layers.3" and info["checkpoint_sha256"] is None
    assert info["early_params"] + info["late_params"] == sum(p.numel() for p in split.model.parameters()) > 190e6


def test_teacher_info_checks_a_checkpoint_against_the_model_and_gives_its_sha(tmp_path):
    from pipeline.weights import file_sha256

    ckpt = save_checkpoint(tmp_path / "t.safetensors")
    info, _ = describe_teacher(TEACHER_NAME, checkpoint=ckpt, late_blocks=1, **TEACHER_KWARGS)
    assert info["checkpoint_sha256"] == file_sha256(ckpt) and info["num_classes"] == 10
    with pytest.raises(ValueError) as e:
        describe_teacher(TEACHER_NAME, checkpoint=ckpt, late_blocks=1, **(TEACHER_KWARGS | {"num_classes": 5}))
    assert str(e.value) == (f"teacher checkpoint {ckpt} does not fit {TEACHER_NAME}: head.weight: checkpoint (10, 192), "
                            f"model (5, 192); head.bias: checkpoint (10,), model (5,)")


# --- pretrained weights out of reach


def _offline_message(name: str, what: str, why: str) -> str:
    return (f"teacher {name}: pretrained: true downloads its weights from {what}, which is not in the local cache and "
            f"cannot be reached ({why}); nothing was written. Give the weights as a local file with checkpoint: PATH "
            f"(or seed: N instead of pretrained for random weights)")


def test_pretrained_with_hf_hub_offline_fails_before_anything_is_written(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pitfalls, "_reachable", lambda *a: pytest.fail("no connection is tried when offline"))
    spec = make_spec(data, tmp_path / "cache", None)
    spec.teacher = {"name": "tf_efficientnet_lite0", "pretrained": True}
    with pytest.raises(pitfalls.PretrainedUnreachable) as e:
        run(spec)
    assert str(e.value) == _offline_message("tf_efficientnet_lite0", "the Hugging Face Hub (timm/tf_efficientnet_lite0.in1k)",
                                            "HF_HUB_OFFLINE is set")
    assert not (tmp_path / "cache").exists()


def test_pretrained_with_no_route_to_the_hub_fails_with_the_reason(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pitfalls, "_reachable", lambda url, timeout: "cannot connect to huggingface.co: Name or service not known")
    from pipeline.weights import load_teacher

    with pytest.raises(pitfalls.PretrainedUnreachable) as e:
        load_teacher("vit_tiny_patch16_224", pretrained=True)
    assert str(e.value) == _offline_message("vit_tiny_patch16_224",
                                            "the Hugging Face Hub (timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k)",
                                            "cannot connect to huggingface.co: Name or service not known")


def test_pretrained_with_a_network_or_a_cached_copy_goes_on_to_timm(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pitfalls, "_reachable", lambda url, timeout: None)
    pitfalls.check_pretrained_reachable("vit_tiny_patch16_224")  # reachable: timm's own download runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pitfalls, "_source", lambda name: ("the Hugging Face Hub (x)", "https://huggingface.co", True))
    pitfalls.check_pretrained_reachable("vit_tiny_patch16_224")  # offline, but in the local cache


def test_the_connection_check_names_the_host_and_why():
    assert pitfalls._reachable("https://no-such-host.invalid", 0.5).startswith("cannot connect to no-such-host.invalid: ")


# --- a student built for one input size


@pytest.mark.parametrize("name, kwargs", [("vit_base_patch14_224", dict(depth=4, embed_dim=32, num_heads=2)),
                                          ("mixer_b14_224", dict(num_blocks=4, embed_dim=32)),
                                          ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1),
                                                                                num_heads=(1, 1, 1, 1), window_size=4))])
def test_a_student_built_for_one_size_is_built_for_the_student_input_size(name, kwargs):
    taps = create_student(name, num_classes=3, input_size=112, **kwargs)
    assert taps.input_size == (3, 112, 112) and taps.model_args["img_size"] == 112
    s3, s4, logits = taps(torch.zeros(2, 3, 112, 112))
    assert logits.shape == (2, 3)


def test_a_student_given_another_img_size_than_its_input_size_says_what_to_set():
    with pytest.raises(ValueError) as e:
        create_student("vit_base_patch14_224", num_classes=3, input_size=112, img_size=224, depth=4, embed_dim=32,
                       num_heads=2)
    assert str(e.value) == ("student vit_base_patch14_224 cannot run at input size 112x112 (it was built for 224x224): "
                            "build it for that size with student_kwargs: {img_size: 112}, or drop student_input_size; "
                            "timm said: Input height (112) doesn't match model (224).")
