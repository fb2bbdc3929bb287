"""What the distiller learns from, and the online source that makes it from a live teacher.

The distiller takes a ``Targets`` and cannot tell where it came from: ``OnlineTargets`` runs the
whole teacher on the batch; the cached source (``pipeline``) reads the same tensors from a store.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .dc import dc_removed
from .teacher import TeacherSplit

__all__ = ["Targets", "OnlineTargets", "PRECISIONS", "teacher_precision"]

# The teacher's arithmetic while it makes targets (caching or online); its outputs are float32 either way.
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_precision(device: torch.device | str, precision: str = "fp32"):
    """A context that runs the teacher at ``precision`` on ``device``: autocast (matmuls and convs in
    bf16/fp16, norms and softmax in float32, the weights untouched); fp32 runs as it is, with
    cuDNN's TF32 convolutions off on a GPU.

    fp16 is refused on a CPU: torch's CPU autocast accepts it, but CPUs without native fp16
    arithmetic run its matmuls emulated (measured on an AVX-512 EPYC: a 1024² matmul 34× slower
    than fp32, bf16 3.3× faster), and a CPU fp16 cache would not reproduce a GPU's fp16 rounding
    either; bf16 is the CPU's fast precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"teacher precision {precision!r}; expected one of {list(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        # On a GPU, cuDNN runs float32 convolutions as TF32 by default (matmuls stay IEEE): a teacher's fp32
        # is fp32 in its convolutions too (the patch embedding of Swin/EVA, all of a ConvNeXt).
        if device.type != "cuda":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, benchmark_limit=cudnn.benchmark_limit,
                           deterministic=cudnn.deterministic, allow_tf32=False)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"teacher precision 'fp16' needs a CUDA device, this teacher runs on {device.type!r}: CPUs "
                         f"emulate fp16 matmuls (tens of times slower than fp32); use precision 'bf16' or 'fp32' on "
                         f"a CPU, or run on a GPU")
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


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
    """Runs the whole frozen teacher live: teacher images (B, 3, Ht, Wt) → Targets (float32).

    precision: the teacher's arithmetic (``teacher_precision``); the cache's, so that online targets
    are the cached ones."""

    def __init__(self, split: TeacherSplit, precision: str = "fp32"):
        self.split, self.precision = split, precision
        teacher_precision(next(split.model.parameters()).device, precision)  # refused here, not on the first step

    @torch.no_grad()
    def __call__(self, teacher_images: torch.Tensor) -> Targets:
        with teacher_precision(teacher_images.device, self.precision):
            out = self.split.targets(teacher_images)
        return Targets.from_final(out["final"].float(), out["logits"].float())
