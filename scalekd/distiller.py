"""ONE distiller for online and cached targets: the whole ScaleKD loss from (images, targets, labels).

Wiring (SCALEKD.md, TPP with DFM in both paths), per view v ∈ {direct, dc}:
    proxy:  F^st_v = late(CAP_s3_v(student stage 3))            # through the frozen teacher late
    main:   F^s_v  = CAP_s4_v(student stage 4, queries=F^st_v)   # queries not detached
    loss  = task_weight·L_task + kd_weight·L_kd
          + α·L(F^st_direct, F^t) + β·L(φ(F^st_dc), φ(F^t))     # proxy path
          + α·L(F^s_direct,  F^t) + β·L(φ(F^s_dc),  φ(F^t))     # main path
"""
from __future__ import annotations

import torch
from torch import nn

from .cap import CrossAttentionProjector
from .losses import dual_view_loss, kd_loss, task_loss
from .presets import LossConfig
from .student import StudentTaps, student_norm
from .targets import Targets
from .teacher import TeacherLate

__all__ = ["ScaleKDDistiller", "LOSS_TERMS"]

LOSS_TERMS = ("task", "kd", "proxy_direct", "proxy_dc", "main_direct", "main_dc")


class ScaleKDDistiller(nn.Module):
    """student + four CAPs + the frozen teacher ``late`` part.

    forward(images (B, 3, H, W), targets, labels (B,)) → dict of scalar loss terms (LOSS_TERMS,
    each already weighted) plus 'loss', their sum, and 'logits', the student's.
    """

    def __init__(self, student: StudentTaps, late: TeacherLate, config: LossConfig, batch_late: bool = True):
        super().__init__()
        self.student, self.late, self.config = student, late, config
        self.batch_late = batch_late
        info = late.info
        c3, *hw3 = student.stage3_shape
        c4, *hw4 = student.stage4_shape
        norm = config.cap_norm or student_norm(student.model)
        if config.stage4_norm is not None and config.stage4_norm != student.stage4_norm:
            raise ValueError(
                f"loss config stage4_norm={config.stage4_norm} but student {type(student.model).__name__} taps stage 4 "
                f"{'after' if student.stage4_norm else 'before'} its final norm; build the student with "
                f"stage4_norm={config.stage4_norm}"
            )
        scale = config.softmax_scale

        def cap(cs, hw, ct, thw, heads, trainable):
            return CrossAttentionProjector(cs, tuple(hw), ct, tuple(thw), heads, scale, trainable, norm)

        self.caps = nn.ModuleDict(
            {
                "s3_direct": cap(c3, hw3, info.mid_channels, info.mid_hw, config.heads_stage3, True),
                "s3_dc": cap(c3, hw3, info.mid_channels, info.mid_hw, config.heads_stage3, True),
                "s4_direct": cap(c4, hw4, info.final_channels, info.final_hw, config.heads_stage4, False),
                "s4_dc": cap(c4, hw4, info.final_channels, info.final_hw, config.heads_stage4, False),
            }
        )
        num_classes = getattr(student.model, "num_classes", None)
        if num_classes != info.num_classes:
            raise ValueError(
                f"student {type(student.model).__name__} has {num_classes} classes but teacher {info.name} has "
                f"{info.num_classes}; build the student with num_classes={info.num_classes}"
            )

    def _check_targets(self, targets: Targets, batch: int) -> None:
        info = self.late.info
        expected = {
            "final": (batch, info.final_tokens, info.final_channels),
            "final_dc_removed": (batch, info.final_tokens, info.final_channels),
            "logits": (batch, info.num_classes),
        }
        for role, shape in expected.items():
            found = tuple(getattr(targets, role).shape)
            if found != shape:
                raise ValueError(f"targets.{role}: expected shape {shape} for teacher {info.name}, found {found}")

    def paths(self, images: torch.Tensor):
        """The student's outputs on the four paths: ({'proxy_direct', ..., 'main_dc'} → (B, N, C), logits)."""
        s3, s4, logits = self.student(images)
        views = ("direct", "dc")
        queries = [self.caps[f"s3_{v}"](s3) for v in views]
        if self.batch_late:
            # Both proxy views through late in ONE pass of twice the batch: late is frozen and in
            # eval(), so every sample's output depends on that sample alone — the same numbers,
            # half the passes.
            proxies = self.late(torch.cat(queries)).chunk(2)
        else:
            proxies = [self.late(q) for q in queries]
        out = {}
        for v, proxy in zip(views, proxies):
            out[f"proxy_{v}"] = proxy
            out[f"main_{v}"] = self.caps[f"s4_{v}"](s4, queries=proxy)
        return out, logits

    def forward(self, images: torch.Tensor, targets: Targets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_targets(targets, images.shape[0])
        cfg = self.config
        if not cfg.features:  # a baseline: the student's logits only
            logits = self.student(images)[2]
            zero = logits.new_zeros(())
            terms = {k: zero for k in LOSS_TERMS[2:]}
            terms["task"] = cfg.task_weight * task_loss(cfg.task_loss, logits, labels)
            terms["kd"] = cfg.kd_weight * kd_loss(logits, targets.logits, cfg.temperature) if cfg.kd_weight else zero
            terms["loss"] = terms["task"] + terms["kd"]
            terms["logits"] = logits
            return terms
        paths, logits = self.paths(images)
        terms = {
            "task": cfg.task_weight * task_loss(cfg.task_loss, logits, labels),
            "kd": cfg.kd_weight * kd_loss(logits, targets.logits, cfg.temperature),
        }
        for path in ("proxy", "main"):
            direct, dc = dual_view_loss(
                paths[f"{path}_direct"], paths[f"{path}_dc"], targets.final, targets.final_dc_removed, cfg.alpha, cfg.beta
            )
            terms[f"{path}_direct"], terms[f"{path}_dc"] = direct, dc
        terms["loss"] = sum(terms[k] for k in LOSS_TERMS)
        terms["logits"] = logits
        return terms

    def trainable_parameters(self):
        """Student and CAP parameters (the teacher's late part is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]
