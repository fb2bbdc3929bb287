"""The teacher split per family: late(early(x)) is the model's own final token map and logits."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from scalekd.dc import dc_removed
from scalekd.targets import OnlineTargets
from scalekd.teacher import split_teacher

# name, timm kwargs, family, (mid tokens incl. prefix, mid channels), (final tokens, final channels), prefix
TEACHERS = {
    "swin": ("swin_tiny_patch4_window7_224", {}, "swin", (196, 384), (49, 768), 0),
    "swinv2": ("swinv2_tiny_window8_256", dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), img_size=128,
                                               window_size=4, num_classes=7), "swin", (64, 96), (16, 192), 0),
    "vit": ("vit_tiny_patch16_224", {}, "vit", (197, 192), (196, 192), 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, "vit", (198, 192), (196, 192), 2),
    "beit": ("beit_base_patch16_224", dict(depth=3, embed_dim=96, num_heads=3), "vit", (197, 96), (196, 96), 1),
    "eva02": ("eva02_tiny_patch14_224", dict(num_classes=10), "vit", (257, 192), (256, 192), 1),
    "eva_large": ("eva_large_patch14_196", dict(depth=3, embed_dim=96, num_heads=3, img_size=224), "vit", (257, 96), (256, 96), 1),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=112, depth=4, num_classes=10), "vit", (69, 384), (64, 384), 5),
    "effnet_lite0": ("tf_efficientnet_lite0", {}, "cnn", (196, 112), (49, 1280), 0),
    "convnext": ("convnext_atto", {}, "cnn", (196, 160), (49, 320), 0),
}
VIT_KEYS = [k for k, v in TEACHERS.items() if v[2] == "vit"]


def _build(key, **split_kwargs):
    name, kwargs, *_ = TEACHERS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    return model, split_teacher(model, name, **split_kwargs)


def _own_final_tokens(model, split, x):
    """The model's own forward_features as (B, N, C) tokens with prefix tokens dropped."""
    ff = model.forward_features(x)
    if split.info.family == "swin":  # NHWC
        return ff.flatten(1, 2)
    if ff.ndim == 4:  # NCHW
        return ff.flatten(2).transpose(1, 2)
    return ff[:, split.info.num_prefix_tokens :]


@pytest.mark.parametrize("key", list(TEACHERS))
def test_late_of_early_equals_model_forward_features_and_logits(key):
    model, split = _build(key)
    name, _, family, mid_shape, final_shape, prefix = TEACHERS[key]
    info = split.info
    assert (info.family, info.num_prefix_tokens) == (family, prefix)
    x = torch.randn(2, *info.input_size)
    with torch.no_grad():
        mid = split.early(x)
        final, logits = split.late.forward_with_logits(mid)
        own_final = _own_final_tokens(model, split, x)
        own_logits = model(x)
    assert tuple(mid.shape) == (2, *mid_shape) and (info.mid_tokens, info.mid_channels) == mid_shape
    assert tuple(final.shape) == (2, *final_shape) and (info.final_tokens, info.final_channels) == final_shape
    torch.testing.assert_close(final, own_final, rtol=0, atol=0)
    torch.testing.assert_close(split.late(mid), own_final, rtol=0, atol=0)
    assert logits.shape == (2, info.num_classes)
    torch.testing.assert_close(logits, own_logits, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(TEACHERS))
def test_online_targets_are_final_its_phi_and_logits(key):
    model, split = _build(key)
    x = torch.randn(1, *split.info.input_size)
    t = OnlineTargets(split)(x)
    with torch.no_grad():
        own_final = _own_final_tokens(model, split, x)
        torch.testing.assert_close(t.final, own_final, rtol=0, atol=0)
        torch.testing.assert_close(t.final_dc_removed, own_final - own_final.mean(dim=1, keepdim=True))
        torch.testing.assert_close(t.logits, model(x), rtol=0, atol=0)
    assert not t.final.requires_grad


def test_swin_split_point_is_last_stage_with_14_to_7_merging():
    _, split = _build("swin")
    info = split.info
    assert info.split_point == "layers.3"
    assert (info.mid_hw, info.final_hw) == ((14, 14), (7, 7))
    assert info.late_modules == ["head", "layers.3", "norm"]


@pytest.mark.parametrize("late_blocks, split_point", [(1, "blocks.11"), (2, "blocks.10"), (5, "blocks.7"), (11, "blocks.1")])
def test_vit_late_blocks_sets_split_point_and_stays_exact(late_blocks, split_point):
    model, split = _build("vit", late_blocks=late_blocks)
    info = split.info
    assert (info.split_point, info.late_blocks) == (split_point, late_blocks)
    first = 12 - late_blocks
    assert {m for m in info.late_modules if m.startswith("blocks.")} == {f"blocks.{i}" for i in range(first, 12)}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(split.late(split.early(x)), _own_final_tokens(model, split, x), rtol=0, atol=0)
        # mid is the output of block first-1: the model's own blocks from `first` on finish the job
        ref = model.blocks[:first](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        torch.testing.assert_close(split.early(x), ref, rtol=0, atol=0)


def test_vit_default_late_blocks_is_two():
    _, split = _build("vit")
    assert (split.info.late_blocks, split.info.split_point) == (2, "blocks.10")


def test_non_vit_teachers_ignore_late_blocks():
    _, split = _build("convnext", late_blocks=5)
    assert (split.info.late_blocks, split.info.split_point) == (None, "stages.3")
    _, split = _build("effnet_lite0")
    assert split.info.split_point == "blocks.5"  # the last stride-2 stage (7×7) starts at blocks.5


@pytest.mark.parametrize("key", list(TEACHERS))
def test_drop_early_keeps_exactly_late_keys_and_late_still_exact_from_stored_mid(key):
    model, split = _build(key)
    x = torch.randn(2, *split.info.input_size)
    with torch.no_grad():
        mid = split.early(x).clone()  # "stored" mid, as the cache would hold it
        final, logits = split.late.forward_with_logits(mid)
    late_keys = split.late_keys()
    counts = split.parameter_counts()
    assert counts["late"] > 0 and counts["early"] > 0
    late = split.drop_early()
    assert split.early is None
    assert sorted(model.state_dict()) == sorted(late_keys)
    assert sorted(late.state_dict()) == sorted(f"model.{k}" for k in late_keys)
    assert sum(p.numel() for p in model.parameters()) == counts["late"]
    with torch.no_grad():
        final2, logits2 = late.forward_with_logits(mid)
    torch.testing.assert_close(final2, final, rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


def _hand_prefix(model):
    """A ViT's input-level prefix tokens, from its parameters: [cls, dist, reg], position added
    unless the model embeds position into patches only (no_embed_class)."""
    pieces = [getattr(model, a, None) for a in ("cls_token", "dist_token", "reg_token")]
    prefix = torch.cat([t for t in pieces if t is not None], dim=1)
    pos = getattr(model, "pos_embed", None)
    if pos is not None and not getattr(model, "no_embed_class", False):
        prefix = prefix + pos[:, : prefix.shape[1]]
    return prefix


@pytest.mark.parametrize("key", VIT_KEYS)
def test_vit_late_on_patch_tokens_prepends_the_input_level_prefix(key):
    model, split = _build(key)
    p = split.info.num_prefix_tokens
    x = torch.randn(2, *split.info.input_size)
    with torch.no_grad():
        patches = split.early(x)[:, p:]  # what TPP's proxy path gives late: patch tokens only
        expected_prefix = _hand_prefix(model)
        assert expected_prefix.shape == (1, p, split.info.mid_channels)
        full = torch.cat((expected_prefix.expand(2, -1, -1), patches), dim=1)
        torch.testing.assert_close(split.late(patches), split.late(full), rtol=0, atol=0)


# Found while writing this suite: drop_early swapped patch_embed for nn.Identity while the ViT proxy
# path still read model.patch_embed.grid_size (AttributeError); fixed in 852f8f6 (late uses info.mid_hw).
@pytest.mark.parametrize("key", list(TEACHERS))
def test_drop_early_late_still_runs_proxy_path_on_patch_tokens(key):
    _, split = _build(key)
    p = split.info.num_prefix_tokens
    x = torch.randn(2, *split.info.input_size)
    with torch.no_grad():
        patches = split.early(x)[:, p:]
        before = split.late(patches)
        late = split.drop_early()
        after = late(patches)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


# --------------------------------------------------------------------------- the real demo teacher


def _chelsea_224_half_norm() -> torch.Tensor:
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.chelsea()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    return (x - 0.5) / 0.5


def test_real_efficientnet_lite0_weights_classify_chelsea_as_a_cat():
    from pipeline.weights import efficientnet_lite0_state_dict

    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(efficientnet_lite0_state_dict())  # strict: every key and shape
    split = split_teacher(model, "tf_efficientnet_lite0")
    assert (split.info.mean, split.info.std, split.info.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    x = _chelsea_224_half_norm()
    out = split.targets(x)
    top = int(out["logits"].argmax())
    assert 281 <= top <= 285, f"top-1 class {top} is not a cat (281–285)"
    assert torch.softmax(out["logits"], -1)[0, 281:286].sum().item() > 0.5
    torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)
    # the cached path: only late's weights, fed the stored mid, gives the same cat
    mid = out["mid"].clone()
    late = split.drop_early()
    final, logits = late.forward_with_logits(mid)
    torch.testing.assert_close(logits, out["logits"], rtol=0, atol=0)
    torch.testing.assert_close(final, out["final"], rtol=0, atol=0)
    torch.testing.assert_close(dc_removed(final), final - final.mean(1, keepdim=True))


def test_load_teacher_from_exported_demo_safetensors_matches_direct_weights(tmp_path):
    from pipeline.weights import efficientnet_lite0_state_dict, export_demo_teacher, file_sha256, load_teacher

    path = export_demo_teacher(tmp_path / "lite0.safetensors")
    split, sha = load_teacher("tf_efficientnet_lite0", checkpoint=path)
    assert sha == file_sha256(path) and len(sha) == 64
    ref = timm.create_model("tf_efficientnet_lite0")
    ref.load_state_dict(efficientnet_lite0_state_dict())
    sd = split.model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    top = int(split.targets(_chelsea_224_half_norm())["logits"].argmax())
    assert 281 <= top <= 285
