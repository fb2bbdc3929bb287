"""Shared fixtures: a fixed seed for every test, and a factory for a tiny distiller."""
from __future__ import annotations

import pytest
import timm
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture
def make_distiller():
    """Factory for a tiny ScaleKD distiller on random weights (seeded).

    Defaults: a 3-block ViT-Tiny teacher at 64 px (mid 1+4×4 tokens × 192, final 4×4 × 192,
    10 classes, late = its last block) and timm's `test_resnet` student at 160 px.
    Returns (distiller, teacher split).
    """
    from scalekd.distiller import ScaleKDDistiller
    from scalekd.presets import preset
    from scalekd.student import create_student
    from scalekd.teacher import split_teacher

    def build(teacher="vit_tiny_patch16_224", teacher_kwargs=None, student="test_resnet", student_kwargs=None,
              late_blocks=1, num_classes=None, **overrides):
        torch.manual_seed(0)
        if teacher_kwargs is None:
            teacher_kwargs = dict(depth=3, img_size=64, num_classes=10) if teacher.startswith("vit_tiny") else {}
        split = split_teacher(timm.create_model(teacher, **teacher_kwargs), teacher, late_blocks=late_blocks)
        taps = create_student(student, num_classes or split.info.num_classes, **(student_kwargs or {}))
        return ScaleKDDistiller(taps, split.late, preset(split.info, student, **overrides)), split

    return build
