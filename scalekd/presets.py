"""The release's loss weights, attention scales and heads, per teacher family and student.

Release values (SCALEKD.md): Swin-L teacher α = 0.08, β = 0.06; EVA/BEiT-L teacher α = 0.016,
β = 0.008. softmax_scale 5.0 for Swin-L → ResNet/MobileNet/ViT/Mixer, 1.0 for Swin-L →
ConvNeXt/Swin and EVA → ViT/Mixer, 0.2 for EVA → ResNet-50. Heads 16 (stage-3 CAP, 768 dims) and
24 (stage-4 CAP, 1536 dims) for Swin-L, i.e. head sizes 48 and 64.

Not in the release, our choice (stated in docs/method.md): CNN teachers (the offline demo's
EfficientNet-Lite0, ConvNeXt) take the Swin-L values; EVA → students the release did not pair
take softmax_scale 1.0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .cap import default_num_heads
from .teacher import TeacherInfo

__all__ = ["LossConfig", "preset"]


@dataclass
class LossConfig:
    """Everything the distiller's loss depends on besides the models."""

    alpha: float
    beta: float
    softmax_scale: float
    heads_stage3: int
    heads_stage4: int
    task_loss: str = "ce"
    task_weight: float = 0.5
    kd_weight: float = 1.0
    temperature: float = 1.0
    # False: the baselines of an ablation — no CAP path is run and the four feature terms are 0
    # (kd_weight = 0 as well gives the student alone).
    features: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _student_kind(student_name: str) -> str:
    base = student_name.split(".")[0]
    for kind, prefixes in {
        "cnn": ("resnet", "resnext", "wide_resnet", "mobilenet", "efficientnet", "tf_efficientnet", "regnet"),
        "convnext": ("convnext",),
        "swin": ("swin",),
        "vit": ("vit_", "deit", "mixer", "eva", "beit"),
    }.items():
        if base.startswith(prefixes):
            return kind
    return "other"


def preset(teacher: TeacherInfo, student_name: str, **overrides) -> LossConfig:
    """The release's loss configuration for this teacher → student pair; keyword overrides win."""
    kind = _student_kind(student_name)
    if teacher.family == "vit":
        alpha, beta = 0.016, 0.008
        scale = 0.2 if kind == "cnn" else 1.0
        head_dims = (64, 64)
    else:  # swin, and CNN teachers by our choice
        alpha, beta = 0.08, 0.06
        scale = 1.0 if kind in ("convnext", "swin") else 5.0
        head_dims = (48, 64)
    task = "ce" if kind == "cnn" else "ce_smooth"
    cfg = LossConfig(
        alpha=alpha,
        beta=beta,
        softmax_scale=scale,
        heads_stage3=default_num_heads(teacher.mid_channels, head_dims[0]),
        heads_stage4=default_num_heads(teacher.final_channels, head_dims[1]),
        task_loss=task,
    )
    unknown = set(overrides) - set(cfg.to_dict())
    if unknown:
        raise ValueError(f"unknown loss settings {sorted(unknown)}; expected some of {sorted(cfg.to_dict())}")
    return LossConfig(**{**cfg.to_dict(), **overrides})
