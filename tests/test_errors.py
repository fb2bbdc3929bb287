"""Clear errors for wrong input, naming what was expected and what was found; safe checkpoint loading."""
from __future__ import annotations

import os
import pickle
import re
import shlex

import pytest
import timm
import torch

from scalekd.cap import CrossAttentionProjector
from scalekd.losses import feature_loss, kd_loss, task_loss
from scalekd.presets import preset
from scalekd.targets import OnlineTargets, Targets
from scalekd.teacher import SUPPORTED_TEACHERS, split_teacher, teacher_family

# --------------------------------------------------------------------------- teachers


@pytest.mark.parametrize(
    "name", ["resnet50", "resnet50.a1_in1k", "regnety_040", "convnextv2_atto", "swinv2_cr_tiny_224", "swin_s3_tiny_224", "mobilenetv3_large_100"]
)
def test_unsupported_teacher_name_raises_listing_supported_families(name):
    with pytest.raises(ValueError) as e:
        teacher_family(name)
    msg = str(e.value)
    assert repr(name) in msg
    for prefixes in SUPPORTED_TEACHERS.values():
        for p in prefixes:
            assert f"{p}*" in msg


@pytest.mark.parametrize("name, family", [("swin_large_patch4_window7_224.ms_in22k", "swin"), ("eva_large_patch14_196", "vit"),
                                          ("beit_large_patch16_224", "vit"), ("deit_base_patch16_224", "vit"),
                                          ("tf_efficientnet_lite0", "cnn"), ("convnext_tiny", "cnn")])
def test_supported_teacher_names_map_to_their_family(name, family):
    assert teacher_family(name) == family


def test_split_teacher_refuses_unsupported_model_before_splitting():
    with pytest.raises(ValueError, match=r"unsupported teacher 'resnet18'.*supported families: swin_\*"):
        split_teacher(timm.create_model("resnet18"), "resnet18")


def test_load_teacher_refuses_unsupported_name_before_building(monkeypatch):
    from pipeline import weights

    def no_build(*a, **k):
        raise AssertionError("a model was built for an unsupported teacher")

    monkeypatch.setattr(weights.timm, "create_model", no_build)
    with pytest.raises(ValueError, match=r"unsupported teacher 'resnet50'"):
        weights.load_teacher("resnet50")


def test_supported_cnn_name_on_an_unknown_class_is_refused():
    with pytest.raises(ValueError, match=r"no teacher split for timm class ResNet \(family cnn\)"):
        split_teacher(timm.create_model("resnet18"), "convnext_tiny")


def test_vit_named_teacher_without_an_adapter_raises_value_error():
    model = timm.create_model("vit_relpos_small_patch16_224", depth=3)
    with pytest.raises(ValueError, match="VisionTransformerRelPos|vit_relpos"):
        split_teacher(model, "vit_relpos_small_patch16_224")


@pytest.mark.parametrize("late_blocks", [0, 3, -1])
def test_vit_late_blocks_out_of_range_raises_with_range_and_value(late_blocks):
    model = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64)
    with pytest.raises(ValueError) as e:
        split_teacher(model, "vit_tiny_patch16_224", late_blocks=late_blocks)
    assert "[1, 2]" in str(e.value) and f"got {late_blocks}" in str(e.value)


def test_teacher_late_wrong_mid_shape_names_expected_and_found():
    split = split_teacher(timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64), "vit_tiny_patch16_224", late_blocks=1)
    for bad in (torch.randn(2, 17, 96), torch.randn(2, 20, 192), torch.randn(17, 192)):
        with pytest.raises(ValueError) as e:
            split.late(bad)
        msg = str(e.value)
        assert "(B, 17 or 16, 192)" in msg and str(tuple(bad.shape)) in msg


# --------------------------------------------------------------------------- distiller inputs


@pytest.fixture
def tiny(make_distiller):
    distiller, split = make_distiller()
    targets = OnlineTargets(split)(torch.randn(2, 3, 64, 64))
    return distiller, split, targets


def test_wrong_student_input_size_names_expected_and_found(tiny):
    distiller, _, targets = tiny
    with pytest.raises(ValueError) as e:
        distiller(torch.randn(2, 3, 224, 224), targets, torch.tensor([0, 1]))
    msg = str(e.value)
    assert "(B, 3, 160, 160)" in msg and "(2, 3, 224, 224)" in msg


def test_student_built_for_another_input_size_names_it(make_distiller):
    from scalekd.student import create_student

    taps = create_student("test_resnet", 10, input_size=(96, 128))
    assert taps.input_size == (3, 96, 128) and taps.stage3_shape == (192, 6, 8) and taps.stage4_shape == (96, 3, 4)
    with pytest.raises(ValueError) as e:
        taps(torch.randn(1, 3, 160, 160))
    assert "(B, 3, 96, 128)" in str(e.value) and "(1, 3, 160, 160)" in str(e.value)
    s3, s4, logits = taps(torch.randn(1, 3, 96, 128))
    assert (s3.shape, s4.shape, logits.shape) == ((1, 192, 6, 8), (1, 96, 3, 4), (1, 10))


@pytest.mark.parametrize(
    "role, bad_shape, expected",
    [("final", (2, 49, 192), (2, 16, 192)), ("final", (2, 16, 96), (2, 16, 192)), ("final_dc_removed", (2, 16, 191), (2, 16, 192)),
     ("logits", (2, 1000), (2, 10)), ("logits", (3, 10), (2, 10))],
)
def test_mismatched_targets_shapes_name_role_expected_and_found(tiny, role, bad_shape, expected):
    distiller, _, targets = tiny
    fields = {"final": targets.final, "final_dc_removed": targets.final_dc_removed, "logits": targets.logits}
    fields[role] = torch.randn(bad_shape)
    with pytest.raises(ValueError) as e:
        distiller(torch.randn(2, 3, 160, 160), Targets(**fields), torch.tensor([0, 1]))
    msg = str(e.value)
    assert f"targets.{role}" in msg and str(expected) in msg and str(bad_shape) in msg


def test_targets_of_another_batch_size_are_refused(tiny):
    distiller, split, _ = tiny
    targets3 = OnlineTargets(split)(torch.randn(3, 3, 64, 64))
    with pytest.raises(ValueError, match=re.escape("expected shape (2, 16, 192)")):
        distiller(torch.randn(2, 3, 160, 160), targets3, torch.tensor([0, 1]))


def test_student_with_wrong_number_of_classes_names_both_counts(make_distiller):
    with pytest.raises(ValueError) as e:
        make_distiller(num_classes=7)
    msg = str(e.value)
    assert "has 7 classes" in msg and "has 10" in msg and "num_classes=10" in msg


def test_unknown_task_loss_names_it_and_the_known_ones():
    with pytest.raises(ValueError) as e:
        task_loss("focal", torch.randn(2, 3), torch.tensor([0, 1]))
    assert "'focal'" in str(e.value) and "['bce', 'ce', 'ce_smooth']" in str(e.value)


def test_unknown_task_loss_in_config_fails_the_distiller_step_with_the_same_message(make_distiller):
    distiller, split = make_distiller(task_loss="ce_smoothing")
    targets = OnlineTargets(split)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=re.escape("unknown task loss 'ce_smoothing'; expected one of ['bce', 'ce', 'ce_smooth']")):
        distiller(torch.randn(1, 3, 160, 160), targets, torch.tensor([0]))


def test_unknown_preset_override_names_it_and_the_known_settings():
    split = split_teacher(timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64), "vit_tiny_patch16_224", late_blocks=1)
    with pytest.raises(ValueError) as e:
        preset(split.info, "resnet50", gamma=0.5, alpha=1.0)
    msg = str(e.value)
    assert "['gamma']" in msg and "alpha" in msg and "softmax_scale" in msg and "heads_stage3" in msg
    assert preset(split.info, "resnet50", alpha=1.0).alpha == 1.0  # a known override wins


def test_feature_and_kd_loss_shape_mismatch_name_both_shapes():
    with pytest.raises(ValueError, match=re.escape("(2, 4, 8) do not match teacher tokens (2, 5, 8)")):
        feature_loss(torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=re.escape("(2, 10) do not match teacher logits (2, 1000)")):
        kd_loss(torch.randn(2, 10), torch.randn(2, 1000))


# --------------------------------------------------------------------------- CAP inputs


@pytest.mark.parametrize("bad", [(2, 16, 6, 6), (2, 8, 5, 6), (2, 8, 6, 5)])
def test_cap_wrong_student_map_names_expected_and_found(bad):
    cap = CrossAttentionProjector(8, (6, 6), 32, (2, 2), num_heads=4)
    with pytest.raises(ValueError) as e:
        cap(torch.randn(bad))
    msg = str(e.value)
    assert "8 channels at (6, 6)" in msg and f"found {bad[1]} channels at {bad[2:]}" in msg


def test_cap_wrong_call_time_queries_name_expected_and_found():
    cap = CrossAttentionProjector(8, (6, 6), 32, (2, 2), num_heads=4, trainable_queries=False)
    with pytest.raises(ValueError) as e:
        cap(torch.randn(2, 8, 6, 6), queries=torch.randn(2, 9, 32))
    assert "(B, 4, 32)" in str(e.value) and "(2, 9, 32)" in str(e.value)
    with pytest.raises(ValueError, match="pass queries"):
        cap(torch.randn(2, 8, 6, 6))


def test_cap_trainable_queries_refuse_call_time_queries():
    cap = CrossAttentionProjector(8, (6, 6), 32, (2, 2), num_heads=4)
    with pytest.raises(ValueError, match="trainable queries"):
        cap(torch.randn(2, 8, 6, 6), queries=torch.randn(2, 4, 32))


def test_cap_heads_that_do_not_divide_channels_and_bad_norm_are_refused():
    with pytest.raises(ValueError, match="5 heads do not divide the teacher's 32 channels"):
        CrossAttentionProjector(8, (6, 6), 32, (2, 2), num_heads=5)
    with pytest.raises(ValueError, match="norm must be 'bn' or 'ln', got 'gn'"):
        CrossAttentionProjector(8, (6, 6), 32, (2, 2), norm="gn")


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _save_payloads(tmp_path, marker):
    torch_pkl = tmp_path / "evil.pt"
    torch.save(_Payload(marker), torch_pkl)
    wrapped = tmp_path / "evil_wrapped.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}, wrapped)
    plain = tmp_path / "evil.pkl"
    with open(plain, "wb") as f:
        pickle.dump({"w": torch.ones(2), "x": _Payload(marker)}, f, protocol=2)
    return [torch_pkl, wrapped, plain]


def test_read_state_dict_refuses_pickles_with_code_and_never_runs_it(tmp_path):
    from pipeline.weights import read_state_dict

    marker = tmp_path / "pwned"
    # evil.pkl is a plain pickle: its tensors pickle through a torch global that weights_only refuses too
    imported = ["posix.system", "posix.system", "torch.storage._load_from_bytes"]
    for path, name in zip(_save_payloads(tmp_path, marker), imported):
        with pytest.raises(ValueError) as e:
            read_state_dict(path)
        assert str(e.value) == (f"teacher checkpoint {path} cannot be loaded safely (weights_only=True refused it: it "
                                f"imports {name}; nothing in the file was run); save it as safetensors or a plain "
                                f"state dict")
        assert not marker.exists(), f"{path.name}: the pickle's code ran"


def test_payload_pickle_is_live_when_unpickled_unsafely(tmp_path):
    # control for the test above: the same payload, unpickled without weights_only, does run
    marker = tmp_path / "pwned"
    path = _save_payloads(tmp_path, marker)[2]
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.fixture
def state_dict():
    return {"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3), "bn.num_batches_tracked": torch.tensor(5)}


def _assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_read_state_dict_loads_safetensors(tmp_path, state_dict):
    from safetensors.torch import save_file

    from pipeline.weights import read_state_dict

    path = tmp_path / "w.safetensors"
    save_file(state_dict, str(path))
    _assert_same(read_state_dict(path), state_dict)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module", "module_prefix", "state_dict_and_module_prefix"])
def test_read_state_dict_loads_plain_and_wrapped_torch_files(tmp_path, state_dict, wrap):
    from pipeline.weights import read_state_dict

    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    obj = {
        "plain": state_dict,
        "state_dict": {"state_dict": state_dict, "epoch": 3, "meta": {"lr": 0.1}},
        "model": {"model": state_dict, "optimizer": {"step": 1}},
        "module": {"module": state_dict},
        "module_prefix": prefixed,
        "state_dict_and_module_prefix": {"state_dict": prefixed, "epoch": 1},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    _assert_same(read_state_dict(path), state_dict)


def test_read_state_dict_missing_file_and_non_tensor_content(tmp_path):
    from pipeline.weights import read_state_dict

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    path = tmp_path / "notes.pth"
    torch.save({"a": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        read_state_dict(path)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        read_state_dict(text)


def test_load_teacher_checkpoint_with_wrong_keys_names_them(tmp_path):
    from pipeline.weights import load_teacher

    name, kw = "vit_tiny_patch16_224", dict(depth=3, img_size=64)
    sd = timm.create_model(name, **kw).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    path = tmp_path / "t.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_teacher(name, checkpoint=path, **kw)
    assert "missing keys ['head.bias']" in str(e.value) and "unexpected keys ['extra.weight']" in str(e.value)
    with pytest.raises(ValueError, match="either a checkpoint file or pretrained=True"):
        load_teacher(name, checkpoint=path, pretrained=True, **kw)
