"""Student stage taps: which blocks, and stage 4 before or after the student's final norm.

The release (RECIPES.md, "Common to every config") taps a ViT/DeiT student at blocks 9 and 12 (block
12 after the final LayerNorm), a ConvNeXt at stages 3 and 4 (4 after the final LayerNorm) and a
Mixer un-normed. Each expected map here is computed by hand from the timm model's own modules
(random weights), not through forward_intermediates.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import scalekd.student  # noqa: F401  (registers mixer_b14_224 and vit_base_patch14_224)
from scalekd.distiller import ScaleKDDistiller
from scalekd.student import create_student

TINY_VIT = dict(img_size=32, patch_size=8, depth=12, embed_dim=32, num_heads=2)  # a 4×4 grid, 12 blocks


def _vit_block_tokens(model, images):
    """Every block's output tokens (B, L, C), prefix tokens included, by hand."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    out = []
    for block in model.blocks:
        x = block(x)
        out.append(x)
    return out


def _to_map(tokens, prefix, hw):
    b, _, c = tokens.shape
    return tokens[:, prefix:].reshape(b, *hw, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name, kwargs", [
    ("deit_small_patch16_224", {}),  # CLS token, final norm on the tokens (model.norm)
    ("vit_base_patch14_224", dict(class_token=False, global_pool="avg")),  # the release's GAP student: fc_norm
])
@pytest.mark.parametrize("stage4_norm", [True, False])
def test_vit_taps_block_9_raw_and_block_12_after_or_before_the_final_norm(name, kwargs, stage4_norm):
    torch.manual_seed(0)
    taps = create_student(name, num_classes=5, input_size=32, stage4_norm=stage4_norm, **TINY_VIT, **kwargs).eval()
    model = taps.model
    assert taps.indices == (8, 11)  # 0-based: blocks 9 and 12 counted from 1, as the release
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        s3, s4, logits = taps(images)
        blocks = _vit_block_tokens(model, images)
        norm = model.fc_norm if kwargs else model.norm
        assert type(norm).__name__ == "LayerNorm" and type(model.norm if kwargs else model.fc_norm).__name__ == "Identity"
        prefix = model.num_prefix_tokens
        assert prefix == (0 if kwargs else 1)
        block12 = blocks[11][:, prefix:]
        expected4 = F.layer_norm(block12, (32,), norm.weight, norm.bias, norm.eps) if stage4_norm else block12
        torch.testing.assert_close(s4, _to_map(expected4, 0, (4, 4)), rtol=0, atol=1e-6)
        torch.testing.assert_close(s3, _to_map(blocks[8], prefix, (4, 4)), rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, model(images), rtol=0, atol=1e-6)  # the tap never changes the logits
    assert taps.stage4_norm is stage4_norm
    if stage4_norm:  # the norm is no no-op at these weights, so the two taps differ
        assert (s4 - _to_map(block12, 0, (4, 4))).abs().max().item() > 0.1


def test_vit_and_deit_tap_after_the_final_norm_by_default_mixer_resnet_swin_before():
    torch.manual_seed(0)
    assert create_student("deit_small_patch16_224", 5, input_size=32, **TINY_VIT).stage4_norm is True
    assert create_student("vit_base_patch14_224", 5, input_size=28, depth=4, embed_dim=32, num_heads=2).stage4_norm is True
    assert create_student("mixer_b14_224", 5, input_size=28, num_blocks=4, embed_dim=32).stage4_norm is False
    assert create_student("resnet18", 5, input_size=64).stage4_norm is False
    assert create_student("swin_tiny_patch4_window7_224", 5, input_size=224, depths=(1, 1, 1, 1), embed_dim=24,
                          num_heads=(1, 1, 1, 1)).stage4_norm is False


@pytest.mark.parametrize("stage4_norm", [None, True, False])
def test_convnext_taps_stage_4_after_the_head_layernorm_by_default(stage4_norm):
    torch.manual_seed(0)
    taps = create_student("convnext_atto", num_classes=5, input_size=64, stage4_norm=stage4_norm).eval()
    model = taps.model
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        s3, s4, _ = taps(images)
        x = model.stem(images)
        stages = []
        for stage in model.stages:
            x = stage(x)
            stages.append(x)
        norm = model.head.norm  # timm's LayerNorm2d before the classifier (head_norm_first=False)
        expected = F.layer_norm(x.permute(0, 2, 3, 1), (320,), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
        torch.testing.assert_close(s3, stages[2], rtol=0, atol=1e-6)
        torch.testing.assert_close(s4, expected if stage4_norm is not False else x, rtol=0, atol=1e-5)
    assert s4.shape == (2, 320, 2, 2) and taps.stage4_norm is (stage4_norm is not False)


def test_mixer_taps_stage_4_un_normed_by_default_and_after_its_norm_on_request():
    torch.manual_seed(0)
    kwargs = dict(input_size=28, num_blocks=4, embed_dim=32)
    raw, normed = (create_student("mixer_b14_224", 5, stage4_norm=v, **kwargs).eval() for v in (None, True))
    normed.load_state_dict(raw.state_dict())
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        x = raw.model.stem(images)
        for block in raw.model.blocks:
            x = block(x)
        norm = raw.model.norm
        torch.testing.assert_close(raw(images)[1], _to_map(x, 0, (2, 2)), rtol=0, atol=1e-6)
        torch.testing.assert_close(normed(images)[1], _to_map(F.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps), 0, (2, 2)),
                                   rtol=0, atol=1e-6)


def test_stage4_norm_on_a_student_without_a_final_norm_is_refused():
    with pytest.raises(ValueError, match="student ResNet has no final norm to tap stage 4 after; set stage4_norm: false"):
        create_student("resnet18", 5, input_size=64, stage4_norm=True)


def test_distiller_refuses_a_student_whose_tap_disagrees_with_the_loss_config(make_distiller):
    distiller, split = make_distiller(student="vit_tiny_patch16_224",
                                       student_kwargs=dict(stage4_norm=False, depth=4, img_size=64))
    assert distiller.student.stage4_norm is False
    with pytest.raises(ValueError, match="loss config stage4_norm=True but student VisionTransformer taps stage 4 before"):
        ScaleKDDistiller(distiller.student, split.late, type(distiller.config)(**(distiller.config.to_dict() | {"stage4_norm": True})))
