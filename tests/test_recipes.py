"""The named recipes are the release's (RECIPES.md), pair by pair, as the trainer builds them: optimizer and
its settings, which parameters go without weight decay, the per-iteration schedule, the clip, the task loss,
the EMA, the views and the student's drop-path rate."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm.optim
import torch
from torch import nn

from pipeline.late import CacheMismatchError
from pipeline.optimization import build_optimization, check_views
from pipeline.recipes import ALIASES, RECIPES, recipe

LB, SW, ML, TS = "LB", "SW", "ML", "TS"
R = ("rand-m8.75-mstd0.625-inc1", 0.25)
R_MINUS = ("rand-m8.75-mstd0.625-inc1", 0.0)
S = ("rand-m9-mstd0.5-inc1", 0.25)
M = ("rand-m8-mstd0.333-inc1", 0.25)
T = (None, 0.0)

# name: (shared piece, lr, weight decay, batch, epochs, clip, task loss, EMA (None | (decay, evaluated)), views,
#        drop-path rate), from RECIPES.md's table
EXPECTED = {
    "mbv1-advanced": (LB, 2e-3, 4e-3, 2048, 300, None, "ce_smooth", None, R_MINUS, None),
    "mbv1-traditional": (TS, 0.1, 1e-4, 256, 100, None, "ce_smooth", None, T, None),
    "r50-advanced": (LB, 5e-3, 0.02, 2048, 300, 5.0, "bce", None, R, 0.0),
    "r50-traditional": (TS, 0.1, 1e-4, 256, 100, None, "ce", None, T, None),
    "convnext-t": (SW, 1e-3, 0.05, 1024, 300, None, "ce_smooth", (0.9999, True), S, 0.1),
    "mixer-s16": (ML, 7e-4, 0.067, 768, 300, 1.0, "ce", (0.9999, False), M, 0.0),
    "mixer-b16": (ML, 7e-4, 0.067, 1536, 300, 1.0, "ce", None, M, 0.1),
    "vit-s16": (SW, 1e-3, 0.05, 1024, 300, 5.0, "ce_smooth", (0.9999, True), S, 0.0),
    "swin-t": (SW, 1e-3, 0.05, 512, 300, 5.0, "ce_smooth", (0.9999, True), S, 0.05),
    "vit-b16": (SW, 1e-3, 0.05, 512, 300, 5.0, "ce_smooth", (0.9999, True), S, 0.0),
    "mixer-b14": (ML, 7e-4, 0.067, 768, 300, 1.0, "ce_smooth", (0.9999, True), M, 0.1),
    "vit-b14": (SW, 1e-3, 0.05, 1024, 300, 5.0, "ce_smooth", None, S, 0.0),
    "eva02-s336": (SW, 1e-3, 0.05, 512, 300, None, "ce_smooth", (0.9999, True), S, 0.1),
    "demo": ("demo", 1e-3, 0.05, 32, 6, 5.0, "ce", None, T, None),
    "demo-advanced": ("demo", 1e-3, 0.05, 32, 6, 5.0, "ce", (0.9, True), S, None),
}
VIT_STUDENT_RECIPES = {"vit-s16", "vit-b16", "vit-b14", "eva02-s336"}  # SW plus cls_token, pos_embed
STEPS = 4  # optimizer steps per epoch in the schedule tests (even: the cosine has a middle step)


class _Tiny(nn.Module):
    """The distiller's shape, as build_optimization sees it: student.model and caps."""

    def __init__(self):
        super().__init__()
        self.student = nn.Module()
        self.student.model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        self.caps = nn.ModuleDict({"s3_direct": nn.Linear(3, 3)})


def _built(name):
    return build_optimization(recipe(name), _Tiny(), STEPS)


def _lr_after(optim, steps: int) -> float:
    optim.scheduler.step_update(steps)
    return optim.optimizer.param_groups[0]["lr"]


def test_there_is_one_recipe_per_distinct_release_recipe_and_the_demos():
    assert list(RECIPES) == list(EXPECTED)
    assert ALIASES == {"traditional": "r50-traditional", "advanced": "r50-advanced", "deit": "vit-b16"}
    assert recipe("traditional") == RECIPES["r50-traditional"]


@pytest.mark.parametrize("name", EXPECTED)
def test_recipe_builds_the_releases_optimizer_and_settings(name):
    piece, lr, wd, batch, epochs, clip, _, _, _, dp = EXPECTED[name]
    rec, optim = recipe(name), _built(name)
    opt = optim.optimizer
    assert (rec["batch_size"], rec["epochs"], rec["drop_path_rate"]) == (batch, epochs, dp)
    assert optim.grad_clip == clip
    assert {g["lr"] for g in opt.param_groups} == {lr * rec["warmup_factor"]}  # step 0, before any update
    assert max(g["weight_decay"] for g in opt.param_groups) == wd
    d = opt.defaults
    if piece == LB:
        assert type(opt) is timm.optim.Lamb
        assert (d["betas"], d["eps"], d["max_grad_norm"], d["trust_clip"], d["always_adapt"]) == (
            (0.9, 0.999), 1e-6, 1.0, False, False)  # LAMB's built-in global grad-norm clip of 1.0
    elif piece == TS:
        assert type(opt) is torch.optim.SGD
        assert (d["momentum"], d["nesterov"], d["dampening"]) == (0.9, False, 0)
    else:  # SW, ML, the demo
        assert type(opt) is torch.optim.AdamW
        assert (tuple(d["betas"]), d["eps"], d["amsgrad"]) == ((0.9, 0.999), 1e-8, False)


@pytest.fixture(scope="module")
def vit_distiller():
    """A ViT student (cls_token, pos_embed, norms, biases) with its four CAPs (each with a pos_embed)."""
    import timm as _timm

    from scalekd.distiller import ScaleKDDistiller
    from scalekd.presets import preset
    from scalekd.student import create_student
    from scalekd.teacher import split_teacher

    torch.manual_seed(0)
    split = split_teacher(_timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64, num_classes=10),
                          "vit_tiny_patch16_224", late_blocks=1)
    student = create_student("vit_tiny_patch16_224", 10, img_size=64, embed_dim=48, num_heads=2)
    return ScaleKDDistiller(student, split.late, preset(split.info, "vit_tiny_patch16_224"))


def _undecayed(opt, trainable) -> set[str]:
    names = {id(p): n for n, p in trainable.named_parameters()}
    return {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}


@pytest.mark.parametrize("name", EXPECTED)
def test_the_no_weight_decay_group_holds_exactly_the_recipes_parameters(name, vit_distiller):
    piece = EXPECTED[name][0]
    optim = build_optimization(recipe(name), vit_distiller, STEPS)
    params = dict(optim.trainable.named_parameters())
    assert "student.model.cls_token" in params and "caps.s3_direct.pos_embed" in params
    one_d = {n for n, p in params.items() if p.ndim <= 1 or n.endswith(".bias")}  # norms, biases, 1-D
    tables = {n for n in params if "cls_token" in n or "pos_embed" in n}  # the student's and the CAPs'
    expected = {LB: set(), TS: set(), ML: tables, "demo": one_d,
                SW: one_d | tables if name in VIT_STUDENT_RECIPES else one_d}[piece]
    assert _undecayed(optim.optimizer, optim.trainable) == expected
    assert sum(len(g["params"]) for g in optim.optimizer.param_groups) == len(params)  # every parameter, once
    if piece == ML:  # norms and biases ARE decayed
        assert "student.model.norm.weight" not in expected and "caps.s3_direct.pos_embed" in expected


def _cosine(base, floor, t, total):
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("name", EXPECTED)
def test_the_schedule_warms_up_per_iteration_then_decays_to_its_floor(name):
    rec = recipe(name)
    piece, lr, epochs = EXPECTED[name][0], EXPECTED[name][1], EXPECTED[name][4]
    factor, warmup, floor = {LB: (0.25, 5, 0.0), SW: (1e-3, 20, 1e-5), ML: (1e-6, 20, 0.0), TS: (1.0, 0, 0.0),
                             "demo": (0.01, 1, 0.0)}[piece]
    optim = _built(name)
    assert _lr_after(optim, 0) == pytest.approx(lr * factor, rel=1e-9)
    if warmup:  # linear per iteration: half way through the warm-up, half way from start to peak
        half = warmup * STEPS // 2
        assert _lr_after(optim, half) == pytest.approx(lr * factor + (lr - lr * factor) * half / (warmup * STEPS),
                                                       rel=1e-9)
    if rec["sched"] == "multistep":  # ×0.1 at epochs 30, 60, 90
        for epoch, value in ((30, 0.1), (60, 0.01), (90, 1e-3), (epochs, 1e-4)):
            assert _lr_after(optim, epoch * STEPS - 1) == pytest.approx(value, rel=1e-9)
            assert _lr_after(optim, epoch * STEPS) == pytest.approx(value * 0.1 if epoch < epochs else value, rel=1e-9)
        return
    if name.startswith("demo"):  # timm's warm-up within the cosine's span (the recorded demo results')
        assert _lr_after(optim, warmup * STEPS) == pytest.approx(_cosine(lr, floor, warmup, epochs), rel=1e-9)
    else:  # the release: the cosine starts at the peak when the warm-up ends and spans the remaining epochs
        assert _lr_after(optim, warmup * STEPS) == pytest.approx(lr, rel=1e-9)
        middle = warmup * STEPS + (epochs - warmup) * STEPS // 2
        assert _lr_after(optim, middle) == pytest.approx((lr + floor) / 2, rel=1e-9)
    assert _lr_after(optim, epochs * STEPS) == pytest.approx(floor, abs=1e-15)


LOGITS = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0]])
LABELS = np.array([0, 2])


def _hand_task_loss(kind):
    z, k, n = LOGITS, LOGITS.shape[1], LOGITS.shape[0]
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    one_hot = np.eye(k)[LABELS]
    if kind == "ce":
        return -(one_hot * log_p).sum() / n
    if kind == "ce_smooth":  # (1 - 0.1)·one_hot + 0.1/K
        return -((0.9 * one_hot + 0.1 / k) * log_p).sum() / n
    sig = 1 / (1 + np.exp(-z))  # bce: summed over classes, divided by the batch
    return -(one_hot * np.log(sig) + (1 - one_hot) * np.log(1 - sig)).sum() / n


@pytest.mark.parametrize("name", EXPECTED)
def test_the_task_loss_is_the_recipes_formula(name):
    kind = EXPECTED[name][6]
    assert recipe(name)["task_loss"] == kind
    got = _built(name).task_loss(torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(LABELS))
    assert got.item() == pytest.approx(_hand_task_loss(kind), rel=1e-6)


@pytest.mark.parametrize("name", EXPECTED)
def test_the_ema_is_the_recipes(name):
    ema_expected = EXPECTED[name][7]
    rec, optim = recipe(name), _built(name)
    if ema_expected is None:
        assert rec["ema"] is False and optim.ema is None
        return
    decay, evaluated = ema_expected
    assert (rec["ema"], rec["ema_eval"]) == (True, evaluated)
    assert (optim.ema.decay, optim.ema.use_warmup, optim.ema.exclude_buffers) == (decay, False, True)
    student = _Tiny().student.model
    optim.ema.module.load_state_dict(student.state_dict())
    before = [p.detach().clone() for p in optim.ema.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    optim.ema.update(student)  # one step: ema ← decay·ema + (1 − decay)·student
    for b, p in zip(before, optim.ema.module.parameters()):
        torch.testing.assert_close(p, b + (1 - decay) * 1.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", EXPECTED)
def test_each_recipes_views_are_the_releases_augmentation(name):
    ra, erasing = EXPECTED[name][8]
    assert recipe(name)["views"] == {"rand_augment": ra, "erasing": erasing}


def test_a_cache_of_other_views_is_refused_naming_recipe_cache_and_both_values():
    manifest = {"views": {"per_image": 4, "rand_augment": None, "erasing": 0.0}}
    check_views("r50-traditional", recipe("r50-traditional"), "/c", manifest)
    check_views("demo", recipe("demo"), "/c", {"views": {"per_image": 4}})  # made before views recorded them
    with pytest.raises(CacheMismatchError) as e:
        check_views("vit-b16", recipe("vit-b16"), "/c", {"views": {"per_image": 4}})
    assert str(e.value) == (
        "recipe 'vit-b16' trains on views with rand_augment 'rand-m9-mstd0.5-inc1' and erasing 0.25, but cache /c "
        "holds views with rand_augment None and erasing 0.0 (its manifest.json 'views'); make a cache with the "
        "recipe's views, choose a recipe whose views are the cache's, or set check_views: false in the distill "
        "section to train on this cache anyway")
    with pytest.raises(CacheMismatchError, match="erasing 0.0, but cache /c holds views with rand_augment "
                                                 "'rand-m8.75-mstd0.625-inc1' and erasing 0.25"):
        check_views("mbv1-advanced", recipe("mbv1-advanced"), "/c", {"views": dict(zip(("rand_augment", "erasing"), R))})
