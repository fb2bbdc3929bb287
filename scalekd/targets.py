"""What the distiller learns from, and the online source that makes it from a live teacher.

The distiller takes a ``Targets`` and cannot tell where it came from: ``OnlineTargets`` runs the
whole teacher on the batch; the cached source (``pipeline``) reads the same tensors from a store.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dc import dc_removed
from .teacher import TeacherSplit

__all__ = ["Targets", "OnlineTargets"]


@dataclass
class Targets:
    """Teacher targets for one batch of views.

    final: F^t, (B, N, C) tokens; final_dc_removed: φ(F^t), (B, N, C); logits: (B, classes).
    """

    final: torch.Tensor
    final_dc_removed: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def from_final(cls, final: torch.Tensor, logits: torch.Tensor) -> "Targets":
        return cls(final, dc_removed(final), logits)

    def to(self, device, dtype: torch.dtype | None = torch.float32, non_blocking: bool = False) -> "Targets":
        move = lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking)  # noqa: E731
        return Targets(move(self.final), move(self.final_dc_removed), move(self.logits))


class OnlineTargets:
    """Runs the whole frozen teacher live: teacher images (B, 3, Ht, Wt) → Targets."""

    def __init__(self, split: TeacherSplit):
        self.split = split

    @torch.no_grad()
    def __call__(self, teacher_images: torch.Tensor) -> Targets:
        out = self.split.targets(teacher_images)
        return Targets.from_final(out["final"], out["logits"])
