"""The paper's 11 teacher/student pairs: the release's loss settings per pair (fast: teachers built on
the meta device), and at full size (random weights): build, one forward, shapes, presets.

The full-size tests are slow: Swin-L (197 M) and EVA-L/14 (304 M) teachers. One teacher is held at a
time (all Swin-L tests run first, then the Swin-L split is freed and EVA-L built); each student and
its distiller are freed after its test.
"""
from __future__ import annotations

import gc
import math

import pytest
import timm
import torch

import scalekd.student  # noqa: F401  (registers mixer_b14_224 and vit_base_patch14_224)
from scalekd.cap import LayerNorm2d
from scalekd.distiller import LOSS_TERMS, ScaleKDDistiller
from scalekd.presets import preset, release_row
from scalekd.student import create_student, default_stage4_norm
from scalekd.targets import OnlineTargets
from scalekd.teacher import split_teacher

SWIN_L = "swin_large_patch4_window7_224"
EVA_L = "eva_large_patch14_196"
TEACHER_KWARGS = {SWIN_L: {}, EVA_L: dict(img_size=224)}

# RECIPES.md, "Distillation settings": (teacher, student, softmax_scale)
PAIRS = [
    (SWIN_L, "mobilenetv1_100", 5.0),
    (SWIN_L, "resnet50", 5.0),
    (SWIN_L, "convnext_tiny", 1.0),
    (SWIN_L, "mixer_s16_224", 5.0),
    (SWIN_L, "mixer_b16_224", 5.0),
    (SWIN_L, "vit_small_patch16_224", 5.0),
    (SWIN_L, "swin_tiny_patch4_window7_224", 1.0),
    (SWIN_L, "vit_base_patch16_224", 5.0),
    (EVA_L, "resnet50", 0.2),
    (EVA_L, "mixer_b14_224", 1.0),
    (EVA_L, "vit_base_patch14_224", 1.0),
]
# RECIPES.md, "Distillation settings" and "Common to every config": (teacher, student) →
# (α, β, softmax_scale, heads s3, heads s4, CAP norm, stage 4 tapped after the final norm)
RELEASE = {
    (SWIN_L, "mobilenetv1_100"): (0.08, 0.06, 5.0, 16, 24, "bn", False),
    (SWIN_L, "resnet50"): (0.08, 0.06, 5.0, 16, 24, "bn", False),
    (SWIN_L, "resnet50d"): (0.08, 0.06, 5.0, 16, 24, "bn", False),  # the advanced recipe's R50-D
    (SWIN_L, "convnext_tiny"): (0.08, 0.06, 1.0, 8, 16, "bn", True),
    (SWIN_L, "mixer_s16_224"): (0.08, 0.06, 5.0, 8, 8, "bn", False),
    (SWIN_L, "mixer_b16_224"): (0.08, 0.06, 5.0, 8, 8, "bn", False),
    (SWIN_L, "vit_small_patch16_224"): (0.08, 0.06, 5.0, 8, 8, "bn", True),
    (SWIN_L, "deit_small_patch16_224"): (0.08, 0.06, 5.0, 8, 8, "bn", True),
    (SWIN_L, "swin_tiny_patch4_window7_224"): (0.08, 0.06, 1.0, 24, 48, "ln", False),
    (SWIN_L, "vit_base_patch16_224"): (0.08, 0.06, 5.0, 8, 8, "bn", True),
    (SWIN_L, "deit_base_patch16_224"): (0.08, 0.06, 5.0, 8, 8, "bn", True),
    (EVA_L, "resnet50"): (0.016, 0.008, 0.2, 8, 8, "bn", False),
    (EVA_L, "resnet50d"): (0.016, 0.008, 0.2, 8, 8, "bn", False),
    (EVA_L, "mixer_b14_224"): (0.016, 0.008, 1.0, 8, 8, "bn", False),
    (EVA_L, "vit_base_patch14_224"): (0.016, 0.008, 1.0, 8, 8, "bn", True),
}
assert {(t, s) for t, s, _ in PAIRS} <= set(RELEASE)
ALPHA_BETA = {SWIN_L: (0.08, 0.06), EVA_L: (0.016, 0.008)}
# teacher → (mid (tokens incl. prefix, C), final (tokens, C), mid grid)
SHAPES = {SWIN_L: ((196, 768), (49, 1536), (14, 14)), EVA_L: ((257, 1024), (256, 1024), (16, 16))}
CNN_STUDENTS = ("mobilenetv1_100", "resnet50")


_meta_infos: dict[str, object] = {}


def _meta_info(name):
    """The real TeacherInfo of a paper teacher, split on the meta device (no weights, seconds)."""
    if name not in _meta_infos:
        with torch.device("meta"):
            model = timm.create_model(name, **TEACHER_KWARGS[name])
        _meta_infos[name] = split_teacher(model, name).info
    return _meta_infos[name]


@pytest.mark.parametrize("teacher_name, student_name", sorted(RELEASE))
def test_preset_gives_the_release_settings_of_each_published_pair(teacher_name, student_name):
    alpha, beta, scale, heads3, heads4, norm, stage4_norm = RELEASE[teacher_name, student_name]
    cfg = preset(_meta_info(teacher_name), student_name)
    assert (cfg.alpha, cfg.beta, cfg.softmax_scale) == (alpha, beta, scale)
    assert (cfg.heads_stage3, cfg.heads_stage4) == (heads3, heads4)
    assert cfg.cap_norm == norm
    assert cfg.stage4_norm is None  # the student's own default, which is the release's tap:
    with torch.device("meta"):
        student = timm.create_model(student_name, num_classes=1000)
    assert default_stage4_norm(student) is stage4_norm


@pytest.mark.parametrize("teacher_name, student_name, before", [
    # the head-size rule (48 / 64 for Swin-L, 64 / 64 for EVA-L) and the CAP norm by class
    (SWIN_L, "resnet50", (5.0, 16, 24, None)),
    (SWIN_L, "convnext_tiny", (1.0, 16, 24, None)),
    (SWIN_L, "vit_small_patch16_224", (5.0, 16, 24, None)),
    (SWIN_L, "swin_tiny_patch4_window7_224", (1.0, 16, 24, None)),
    (EVA_L, "resnet50", (0.2, 16, 16, None)),
    (EVA_L, "vit_base_patch14_224", (1.0, 16, 16, None)),
])
def test_preset_style_ours_keeps_the_head_size_rule(teacher_name, student_name, before):
    cfg = preset(_meta_info(teacher_name), student_name, style="ours")
    assert (cfg.softmax_scale, cfg.heads_stage3, cfg.heads_stage4, cfg.cap_norm) == before
    assert (cfg.alpha, cfg.beta) == ALPHA_BETA[teacher_name]


def test_unpublished_pairs_take_our_rule_and_overrides_win():
    swin_l, eva_l = _meta_info(SWIN_L), _meta_info(EVA_L)
    # a student family the release never distilled into: our rule, by default
    assert release_row(swin_l, "regnety_040") is None
    assert preset(swin_l, "regnety_040") == preset(swin_l, "regnety_040", style="ours")
    assert release_row(eva_l, "swin_tiny_patch4_window7_224") is None  # EVA → Swin-T was not published
    # EVA-02-S at 336 px from EVA-L (RECIPES x1): its own weights
    cfg = preset(eva_l, "eva02_small_patch14_336")
    assert (cfg.alpha, cfg.beta, cfg.softmax_scale, cfg.heads_stage3, cfg.heads_stage4) == (0.008, 0.004, 1.0, 8, 8)
    cfg = preset(swin_l, "resnet50", heads_stage3=4, cap_norm="ln", stage4_norm=False)
    assert (cfg.heads_stage3, cfg.heads_stage4, cfg.cap_norm, cfg.stage4_norm) == (4, 24, "ln", False)
    with pytest.raises(ValueError, match="unknown preset style 'paper'"):
        preset(swin_l, "resnet50", style="paper")


_held: dict[str, object] = {}


def _teacher(name):
    """One teacher split at a time: asking for another frees the one held first. The test functions
    are ordered Swin-L first, then EVA-L, so each teacher is built once."""
    if name not in _held:
        _held.clear()
        gc.collect()
        torch.manual_seed(0)
        _held[name] = split_teacher(timm.create_model(name, **TEACHER_KWARGS[name]), name)
    return _held[name]


@pytest.fixture(scope="module", autouse=True)
def _free_teacher_at_end():
    yield
    _held.clear()
    gc.collect()


def _check_teacher(teacher_name):
    split = _teacher(teacher_name)
    (mid_tokens, mid_c), (final_tokens, final_c), grid = SHAPES[teacher_name]
    info = split.info
    assert (info.mid_tokens, info.mid_channels, info.final_tokens, info.final_channels) == (mid_tokens, mid_c, final_tokens, final_c)
    assert info.mid_hw == grid and info.num_classes == 1000 and info.input_size == (3, 224, 224)
    if teacher_name == SWIN_L:
        assert (info.split_point, info.final_hw) == ("layers.3", (7, 7))
        n = sum(p.numel() for p in split.model.parameters())
        assert 190e6 < n < 200e6  # SCALEKD.md: 196.5 M
    else:
        assert (info.split_point, info.late_blocks, info.num_prefix_tokens) == ("blocks.22", 2, 1)
        n = sum(p.numel() for p in split.model.parameters())
        assert 300e6 < n < 310e6  # SCALEKD.md: 304.1 M
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = split.targets(x)
        torch.testing.assert_close(out["logits"], split.model(x), rtol=0, atol=0)
    assert out["mid"].shape == (1, mid_tokens, mid_c) and out["final"].shape == (1, final_tokens, final_c)


def _check_pair(teacher_name, student_name, softmax_scale):
    split = _teacher(teacher_name)
    info = split.info
    torch.manual_seed(0)
    student = create_student(student_name, info.num_classes)
    cfg = preset(info, student_name)

    # the release's settings for this pair (RECIPES.md)
    alpha, beta, scale, heads3, heads4, norm, stage4_norm = RELEASE[teacher_name, student_name]
    assert (cfg.alpha, cfg.beta, cfg.softmax_scale) == (alpha, beta, softmax_scale) == (*ALPHA_BETA[teacher_name], scale)
    assert (cfg.heads_stage3, cfg.heads_stage4) == (heads3, heads4)
    assert student.stage4_norm is stage4_norm
    assert cfg.task_loss in (("ce", "bce") if student_name in CNN_STUDENTS else ("ce_smooth",))
    assert (cfg.task_weight, cfg.kd_weight, cfg.temperature) == (0.5, 1.0, 1.0)

    distiller = ScaleKDDistiller(student, split.late, cfg)
    caps = distiller.caps
    for key in ("s3_direct", "s3_dc", "s4_direct", "s4_dc"):
        assert caps[key].softmax_scale == softmax_scale
        expected_norm = LayerNorm2d if norm == "ln" else torch.nn.BatchNorm2d  # LN for Swin-T only
        assert type(caps[key].patchify[1]) is expected_norm
    assert (caps["s3_direct"].num_heads, caps["s4_direct"].num_heads) == (cfg.heads_stage3, cfg.heads_stage4)
    assert caps["s3_direct"].student_channels == student.stage3_shape[0]
    assert caps["s4_direct"].student_channels == student.stage4_shape[0]

    images = torch.randn(1, 3, 224, 224)  # teacher and student see the same view
    targets = OnlineTargets(split)(images)
    distiller.train()
    out = distiller(images, targets, torch.tensor([281]))
    paths, logits = distiller.paths(images)
    (_, mid_c), (final_tokens, final_c), grid = SHAPES[teacher_name]
    with torch.no_grad():
        s3, _, _ = distiller.student(images)
        # CAP_s3 speaks the teacher's mid token space (patch tokens only): Swin-L (1, 196, 768), EVA (1, 256, 1024)
        assert caps["s3_direct"](s3).shape == (1, grid[0] * grid[1], mid_c)
    for key in ("proxy_direct", "proxy_dc", "main_direct", "main_dc"):
        assert paths[key].shape == (1, final_tokens, final_c), key
    assert logits.shape == (1, 1000)
    assert targets.final.shape == (1, final_tokens, final_c)
    assert all(math.isfinite(out[k].item()) for k in (*LOSS_TERMS, "loss"))
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in LOSS_TERMS), rel=1e-5)
    assert not distiller.late.training

    del distiller, student, out, paths, logits, targets
    gc.collect()


# pytest runs these in file order: every Swin-L test, then every EVA-L test.


@pytest.mark.slow
def test_swin_l_teacher_split_shapes_and_logits():
    _check_teacher(SWIN_L)


@pytest.mark.slow
@pytest.mark.parametrize("student_name, softmax_scale", [(s, k) for t, s, k in PAIRS if t == SWIN_L])
def test_swin_l_pair_builds_runs_one_step_and_matches_release_settings(student_name, softmax_scale):
    _check_pair(SWIN_L, student_name, softmax_scale)


@pytest.mark.slow
def test_eva_l_teacher_split_shapes_and_logits():
    _check_teacher(EVA_L)


@pytest.mark.slow
@pytest.mark.parametrize("student_name, softmax_scale", [(s, k) for t, s, k in PAIRS if t == EVA_L])
def test_eva_l_pair_builds_runs_one_step_and_matches_release_settings(student_name, softmax_scale):
    _check_pair(EVA_L, student_name, softmax_scale)
