"""The loss terms of ScaleKD, exactly as SCALEKD.md writes them (release form)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy

from .dc import dc_removed

__all__ = ["feature_loss", "dual_view_loss", "kd_loss", "task_loss", "TASK_LOSSES"]


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L(a, b): L2-normalise both over channels at every token, then the sum of squared
    differences over tokens and channels, divided by the batch size.

    student, teacher: (B, N, C) → scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature_loss: student tokens {tuple(student.shape)} do not match teacher tokens "
            f"{tuple(teacher.shape)} (expected the same (batch, tokens, channels))"
        )
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return (s - t).pow(2).sum() / student.shape[0]


def dual_view_loss(
    direct: torch.Tensor,
    dc_view: torch.Tensor,
    final: torch.Tensor,
    final_dc_removed: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DFM on one path: (α·L(direct, F^t), β·L(φ(dc_view), φ(F^t))).

    direct, dc_view: the outputs of the direct-view and DC-view CAPs (or proxy paths), (B, N, C).
    final, final_dc_removed: F^t and φ(F^t), (B, N, C).
    """
    return alpha * feature_loss(direct, final), beta * feature_loss(dc_removed(dc_view.float()), final_dc_removed)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_kd = 0.5·T²·soft cross-entropy(softmax(t/T), log_softmax(s/T)), mean over the batch."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} do not match teacher logits "
            f"{tuple(teacher_logits.shape)}; the student must have the teacher's number of classes"
        )
    t = temperature
    p_teacher = torch.softmax(teacher_logits.float() / t, dim=-1)
    log_p_student = torch.log_softmax(student_logits.float() / t, dim=-1)
    return 0.5 * t * t * -(p_teacher * log_p_student).sum(dim=-1).mean()


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


# Label smoothing 0.1 in mmcls's 'original' mode: targets (1 - ε)·one_hot + ε/K, cross-entropy, mean over
# the batch; timm's LabelSmoothingCrossEntropy is that formula.
_ce_smooth = LabelSmoothingCrossEntropy(smoothing=0.1)
# The release's BCE (ResNet-50-D advanced): sigmoid BCE on one-hot targets, summed over classes and divided by
# the batch. timm's BinaryCrossEntropy averages over batch AND classes by default; sum_classes=True is the
# release's reduction (K times the default's value).
_bce_one_hot = BinaryCrossEntropy(smoothing=0.0, sum_classes=True)


def _ce_smooth_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _ce_smooth(logits.float(), labels)


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _bce_one_hot(logits.float(), labels)


TASK_LOSSES = {"ce": _ce, "ce_smooth": _ce_smooth_loss, "bce": _bce}


def task_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_task: 'ce' (traditional), 'ce_smooth' (label smoothing 0.1), 'bce' (advanced ResNet:
    Σ over classes of sigmoid BCE on one-hot targets, / batch)."""
    try:
        fn = TASK_LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown task loss {kind!r}; expected one of {sorted(TASK_LOSSES)}") from None
    return fn(logits, labels)
