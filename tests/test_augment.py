"""Replayable RandAugment, colour jitter and random erasing (pipeline/augment.py, pipeline/views.py).

Per op: the stored parameters replay the same pixels (bit for bit at the teacher's size, the
fingerprint included), and at another size the student's pixels equal the teacher's pixels
resized, within the tolerances below; a cache made with these ops recomputes with 0 mismatches
and its cached loss terms equal the online ones.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from pipeline.augment import (RandOp, apply_erasing, erase_boxes, rand_augment_table, sample_erasing,
                              sample_rand_augment)
from pipeline.views import (Erasing, ViewConfig, ViewParams, fingerprint, model_input, render_view, sample_views,
                            to_model_input, view_fields)

RA = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BOX = dict(top=0.1, left=0.15, height=0.7, width=0.6, flip=True)
IMAGE = Image.fromarray(skdata.astronaut())
TEACHER, STUDENT = (224, 224), (112, 112)

# mean |student − teacher resized| in uint8 levels at 112 vs 224 px, measured on skimage's astronaut (no op:
# 0.37, the two resizes' own difference). Threshold ops (posterize, solarize) flip pixels near a threshold
# that the resize moves; Sharpness's 3×3 kernel is in pixels, so it is the one op whose strength depends on
# the size (its own change is ~4 levels).
TOLERANCE = {"AutoContrast": 1, "Invert": 1, "ColorIncreasing": 1.5, "ContrastIncreasing": 2.5,
             "BrightnessIncreasing": 2.5, "Equalize": 3, "Rotate": 3, "ShearX": 2.5, "ShearY": 2.5,
             "TranslateXRel": 2.5, "TranslateYRel": 2.5, "SharpnessIncreasing": 4, "PosterizeIncreasing": 6,
             "SolarizeIncreasing": 7.5, "SolarizeAdd": 5}
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing"}


def _ops():
    return list(enumerate(op.name for op in rand_augment_table(RA).ops))


def _downsized(pixels: np.ndarray, size) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BICUBIC), dtype=np.float64)


def test_the_op_table_is_timms_increasing_set():
    assert [name for _, name in _ops()] == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
        "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
        "TranslateXRel", "TranslateYRel"]
    t = rand_augment_table(RA)
    assert (t.num_layers, t.magnitude, t.magnitude_std, t.magnitude_max, t.prob) == (2, 9.0, 0.5, 10.0, 0.5)
    assert rand_augment_table("rand-m8.75-mstd0.625-inc1").magnitude == 8.75  # the release's level 7 of 8


@pytest.mark.parametrize("index,name", _ops())
def test_each_ops_stored_level_is_one_of_the_two_timm_draws(index, name):
    """Our sign replaces timm's coin: over many timm draws the level takes exactly our two values."""
    from pipeline.augment import _level_args

    op = rand_augment_table(RA).ops[index]
    if op.level_fn is None:
        assert _level_args(op, 7.3, 1) == ()
        return
    random.seed(0)
    timm_draws = {op.level_fn(7.3, op.hparams) for _ in range(64)}
    ours = {_level_args(op, 7.3, 1), _level_args(op, 7.3, -1)}
    assert ours == timm_draws
    assert (len(ours) == 2) == (name in SIGNED)


@pytest.mark.parametrize("index,name", _ops())
@pytest.mark.parametrize("sign", [1, -1])
def test_each_op_replays_bit_for_bit_at_the_teacher_size_and_within_tolerance_at_another(index, name, sign):
    view = ViewParams(**BOX, ops=(RandOp(index, 9.0, sign, True),))
    stored = ViewParams.from_array(view.as_array(view_fields(ViewConfig(rand_augment=RA))),
                                   view_fields(ViewConfig(rand_augment=RA)))
    teacher = render_view(IMAGE, view, TEACHER, "bicubic", RA)
    replayed = render_view(IMAGE, stored, TEACHER, "bicubic", RA)
    assert np.array_equal(teacher, replayed) and fingerprint(teacher) == fingerprint(replayed, stored)
    student = render_view(IMAGE, stored, STUDENT, "bicubic", RA).astype(np.float64)
    error = np.abs(student - _downsized(teacher, STUDENT)).mean()
    assert error <= TOLERANCE[name], f"{name}: {error:.2f} levels"
    if name in SIGNED and name != "SharpnessIncreasing":  # the other sign is far off: the sign is replayed
        other = render_view(IMAGE, ViewParams(**BOX, ops=(RandOp(index, 9.0, -sign, True),)), STUDENT, "bicubic", RA)
        assert np.abs(other - _downsized(teacher, STUDENT)).mean() > 3 * error


@pytest.mark.parametrize("magnitude", [0.0, 7.4, 7.6, 10.0])
def test_posterize_at_every_magnitude_keeps_its_bits_and_zero_bits_is_black(magnitude):
    """timm's PosterizeIncreasing keeps 4 − int(m·4/10) bits: 0 from m = 7.5, which Pillow refuses."""
    index = [name for _, name in _ops()].index("PosterizeIncreasing")
    out = render_view(IMAGE, ViewParams(**BOX, ops=(RandOp(index, magnitude, 1, True),)), TEACHER, "bicubic", RA)
    bits = 4 - int(magnitude / 10 * 4)
    plain = render_view(IMAGE, ViewParams(**BOX), TEACHER, "bicubic")
    assert np.array_equal(out, plain & np.uint8((0xFF << (8 - bits)) & 0xFF))


def test_every_op_renders_at_every_magnitude_and_sign():
    for index, name in _ops():
        for magnitude in (0.0, 2.5, 5.0, 7.5, 10.0):
            for sign in (1, -1):
                out = render_view(IMAGE, ViewParams(**BOX, ops=(RandOp(index, magnitude, sign, True),)), STUDENT,
                                  "bilinear", RA)
                assert out.shape == (*STUDENT, 3) and out.dtype == np.uint8, (name, magnitude, sign)


def test_an_op_not_applied_leaves_the_crop_alone():
    plain = render_view(IMAGE, ViewParams(**BOX), TEACHER, "bicubic")
    skipped = render_view(IMAGE, ViewParams(**BOX, ops=(RandOp(3, 9.0, 1, False), RandOp(2, 9.0, 1, False))),
                          TEACHER, "bicubic", RA)
    assert np.array_equal(plain, skipped)


def test_colour_jitter_replays_at_another_size_within_tolerance():
    cfg = ViewConfig(color_jitter=0.4)
    (view,) = sample_views("k", IMAGE.size, ViewConfig(per_image=1, color_jitter=0.4))
    assert view.jitter is not None and sorted(view.jitter[:4]) == [0, 1, 2, 3]
    assert all(0.6 <= f <= 1.4 for f in view.jitter[4:7]) and view.jitter[7] == 0.0
    stored = ViewParams.from_array(view.as_array(view_fields(cfg)), view_fields(cfg))
    teacher = render_view(IMAGE, stored, TEACHER, "bicubic")
    assert np.array_equal(teacher, render_view(IMAGE, view, TEACHER, "bicubic"))
    student = render_view(IMAGE, stored, STUDENT, "bicubic").astype(np.float64)
    assert np.abs(student - _downsized(teacher, STUDENT)).mean() <= 1.0


def test_erasing_boxes_are_pixel_exact_at_the_teacher_size_and_scaled_at_another():
    rng = np.random.default_rng(3)
    placed = 0
    for _ in range(50):
        seed, boxes = sample_erasing(rng, TEACHER, 1.0, (0.02, 1 / 3), (0.3, 1 / 0.3), 1)
        for (t, l, h, w), rel in zip(erase_boxes(boxes, TEACHER), boxes):
            placed += 1
            assert (t, l, h, w) == tuple(int(round(v * 224)) for v in rel)  # integers of the 224 grid
            assert 0.02 * 224 * 224 * 0.9 <= h * w <= 224 * 224 / 3 * 1.1
            (t2, l2, h2, w2), = erase_boxes((rel,), STUDENT)
            assert max(abs(2 * t2 - t), abs(2 * l2 - l), abs(2 * (t2 + h2) - (t + h)), abs(2 * (l2 + w2) - (l + w))) <= 1
    assert placed == 50


def test_erasing_fills_from_its_seed_at_each_size():
    boxes = ((0.25, 0.5, 0.5, 0.25),)
    x = torch.zeros(3, 224, 224)
    a, b, c = apply_erasing(x, boxes, 7), apply_erasing(x, boxes, 7), apply_erasing(x, boxes, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    inside = a[:, 56:168, 112:168]
    assert inside.abs().min() > 0 and abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    assert a.abs().sum() == inside.abs().sum()  # nothing outside the box changed
    small = apply_erasing(torch.zeros(3, 112, 112), boxes, 7)
    assert (small != 0).sum() == 3 * 56 * 28  # the same box at half the size, its own noise
    assert torch.equal(apply_erasing(x, boxes, 7, "const"), x)
    per_channel = apply_erasing(x, boxes, 7, "rand")[:, 56:168, 112:168]
    assert (per_channel == per_channel[:, :1, :1]).all()


def test_an_erased_views_fingerprint_covers_its_box_and_seed():
    pixels = render_view(IMAGE, ViewParams(**BOX), TEACHER, "bicubic")
    erased = ViewParams(**BOX, erase=((0.1, 0.1, 0.3, 0.2),), erase_seed=5)
    assert fingerprint(pixels, ViewParams(**BOX)) == fingerprint(pixels)  # crop-and-flip caches keep theirs
    assert len({fingerprint(pixels), fingerprint(pixels, erased),
                fingerprint(pixels, ViewParams(**BOX, erase=erased.erase, erase_seed=6))}) == 3
    x = model_input(pixels, erased, MEAN, STD)
    # rows round(0.1·224) = 22 … round(0.4·224) = 90, columns 22 … round(0.3·224) = 67
    assert (x != model_input(pixels, ViewParams(**BOX), MEAN, STD)).sum() == 3 * 68 * 45


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_a_batch_erased_on_its_device_is_bit_for_bit_each_views_own_input(mode):
    """The trainer's path (uint8 batch and Erasing.cat'ed boxes, normalised and pasted where the model runs,
    here the CPU) against each view's own model_input (normalised, then apply_erasing), in either layout."""
    rng = np.random.default_rng(11)
    views = [ViewParams(**BOX)] + [ViewParams(**BOX, erase=boxes, erase_seed=seed) for seed, boxes in
                                   (sample_erasing(rng, TEACHER, 1.0, (0.02, 1 / 3), (0.3, 1 / 0.3), 3) for _ in range(3))]
    assert sum(len(v.erase) for v in views) >= 4  # several boxes, one view with none
    pixels = [render_view(IMAGE, v, STUDENT, "bicubic") for v in views]
    # each view's own input: (x / 255 − mean) / std, then apply_erasing (the per-view fill of erase_fills)
    plain = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    plain = (plain / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    own = torch.stack([apply_erasing(x, v.erase, v.erase_seed, mode) for x, v in zip(plain, views)])
    erasing = Erasing.cat([Erasing.of_view(v, STUDENT, mode) for v in views])
    assert erasing.rows[:, 0].tolist() == [i for i, v in enumerate(views) for _ in v.erase]
    for layout in (torch.contiguous_format, torch.channels_last):
        x = to_model_input(torch.from_numpy(np.stack(pixels)), erasing, MEAN, STD, memory_format=layout)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=layout)
        assert torch.equal(x, own)
    for p, v, x in zip(pixels, views, own):  # the one-view form the cache inspection uses
        assert torch.equal(model_input(p, v, MEAN, STD, mode), x)
    assert torch.equal(own[0], plain[0])
    assert all((own[i] != plain[i]).any() for i in (1, 2, 3))  # the erased views are erased


def test_the_k_views_of_an_image_draw_different_ops_and_the_rows_round_trip():
    cfg = ViewConfig(per_image=8, rand_augment=RA, erasing=0.5, erasing_count=2, color_jitter=(0.4, 0.4, 0.4, 0.1))
    fields = view_fields(cfg)
    assert len(fields) == 5 + 2 * 4 + 8 + 2 + 2 * 4
    views = sample_views("n01440764_10026", IMAGE.size, cfg)
    assert len({v.ops for v in views}) == 8
    assert 0 < sum(bool(v.erase) for v in views) < 8
    for v in views:
        assert ViewParams.from_array(v.as_array(fields), fields) == v
        for op in v.ops:
            assert 0 <= op.magnitude <= 10 and op.sign in (-1, 1)
    again = sample_views("n01440764_10026", IMAGE.size, cfg)
    assert again == views  # seeded by the key: the same views on every run


def test_sampling_follows_timms_distribution():
    rng = np.random.default_rng(0)
    slots = [s for _ in range(4000) for s in sample_rand_augment(rng, rand_augment_table(RA))]
    counts = np.bincount([s.op for s in slots], minlength=15)
    assert counts.min() > 8000 / 15 * 0.8  # uniform choice with replacement
    assert abs(np.mean([s.applied for s in slots]) - 0.5) < 0.02
    mags = np.array([s.magnitude for s in slots])
    assert abs(mags.mean() - 9.0) < 0.05 and abs(mags.std() - 0.5) < 0.05 and mags.max() <= 10


def test_a_crop_and_flip_configuration_keeps_its_manifest_and_views():
    cfg = ViewConfig(per_image=2, seed=3)
    assert view_fields(cfg) == ("top", "left", "height", "width", "flip")
    assert set(cfg.to_dict()) == {"per_image", "seed", "scale", "ratio", "flip", "convention"}
    with_ra = ViewConfig(per_image=2, seed=3, rand_augment=RA)
    plain, augmented = sample_views("k", (500, 375), cfg), sample_views("k", (500, 375), with_ra)
    assert [(v.top, v.left, v.height, v.width, v.flip) for v in plain] != [] and plain[0].ops == ()
    assert ViewConfig.from_manifest(with_ra.to_dict() | {"fields": list(view_fields(with_ra))}) == with_ra


@pytest.mark.parametrize("bad,match", [
    ({"rand_augment": "rand-x9"}, "timm"), ({"rand_augment": "auto"}, "RandAugment"),
    ({"erasing": 1.5}, "erasing"), ({"erasing_area": (0.5, 0.1)}, "erasing_area"),
    ({"color_jitter": (0.1, 0.2)}, "color_jitter")])
def test_a_bad_augmentation_setting_is_refused_by_name(bad, match):
    with pytest.raises(Exception, match=match):
        ViewConfig(**bad)


# --------------------------------------------------------------------------- a cache made with them


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    from _cache_helpers import make_imagefolder, make_spec, run, save_checkpoint, view_config

    root = tmp_path_factory.mktemp("augmented")
    data = make_imagefolder(root / "data", per_class=3, corrupt=False)
    ckpt = save_checkpoint(root / "teacher.safetensors")
    views = view_config(2, rand_augment=RA, erasing=0.6, color_jitter=0.3)
    cache = root / "cache"
    run(make_spec(data, cache, ckpt, samples_per_shard=4, per_image=2, views=views))
    return {"root": root, "cache": cache, "views": views}


def test_an_augmented_cache_recomputes_with_no_mismatch(augmented):
    from pipeline.inspect_cache import recompute
    from pipeline.reader import CacheReader

    reader = CacheReader(augmented["cache"])
    m = reader.manifest
    assert m["views"]["rand_augment"] == RA and m["views"]["erasing"] == 0.6
    assert tuple(m["views"]["fields"]) == view_fields(augmented["views"])
    rows = [ViewParams.from_array(r, m["views"]["fields"]) for i in range(len(reader)) for r in reader.views(i)]
    assert any(v.erase for v in rows) and any(op.applied for v in rows for op in v.ops)
    from pipeline.inspect_cache import describe

    assert describe(augmented["cache"])["view_ops"] == (
        "crop scale [0.25, 1.0] ratio [0.75, 1.3333] → flip 0.5 → RandAugment rand-m9-mstd0.5-inc1 → colour jitter "
        "0.3 → erasing 0.6 (pixel, up to 1 box)")
    report = recompute(augmented["cache"], n=8)
    assert report["views_checked"] == 8 and report["fingerprint_mismatches"] == []
    assert max(report["max_rel_l2"].values()) < 1e-5


def test_cached_loss_terms_equal_online_on_randaugment_and_erasing_views(augmented, tmp_path):
    from test_trainer import _spec, _terms

    world, kw = {}, {"check_views": False}  # the demo recipe on this cache's views (jitter, erasing .6)
    for epoch in (0, 1):
        cached, t_cached = _terms(_spec(world, augmented["cache"], tmp_path / "c", **kw), epoch=epoch)
        online, t_online = _terms(_spec(world, augmented["cache"], tmp_path / "o", targets="online", **kw),
                                  epoch=epoch)
        assert (t_cached.final - t_online.final).abs().max() < 1e-5
        assert set(cached) == set(online)
        for k in cached:
            assert cached[k] == pytest.approx(online[k], rel=1e-5, abs=1e-7), k


def test_forked_loader_workers_hand_on_uint8_pixels_and_erasing_giving_the_in_process_input(augmented):
    """Through a DataLoader's forked workers (shared memory, Erasing pickled across) the batch's model input
    is bit for bit the in-process one, and the pixels travel as uint8."""
    from torch.utils.data import DataLoader

    from pipeline.reader import CacheReader
    from pipeline.train_data import ModelInput, ViewDataset, collate_skipping

    data = ViewDataset(CacheReader(augmented["cache"]), ModelInput((64, 64), "bicubic", MEAN, STD),
                       ModelInput((224, 224), "bicubic", MEAN, STD), targets="online")
    n = len(data)
    forked = list(DataLoader(data, batch_size=n, num_workers=1, collate_fn=collate_skipping,
                             multiprocessing_context="fork"))[0]
    here = collate_skipping([data[i] for i in range(n)])
    assert forked["image"].dtype == torch.uint8 and forked["image"].shape == (n, 64, 64, 3)
    assert len(forked["image_erasing"].rows) == len(here["image_erasing"].rows) > 0
    for key in ("image", "teacher_image"):
        x = data.to_device(forked, key, "cpu")
        assert torch.equal(x, data.to_device(here, key, "cpu"))
    erased = int(forked["teacher_image_erasing"].rows[0, 0])
    assert not torch.equal(data.to_device(forked, "teacher_image", "cpu")[erased],
                           to_model_input(forked["teacher_image"][erased:erased + 1], None, MEAN, STD)[0])
