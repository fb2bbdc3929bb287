"""Loss weights, attention scales, CAP heads and CAP norm per teacher → student pair.

Two styles; ``preset(..., style="release")`` is the default:

- ``"release"``: the authors' release config for the pair (RECIPES.md, "Distillation settings"),
  because the release produced the published numbers. A pair is the release's when the teacher is
  Swin-L (``swin_large*``) or EVA-L/14 (``eva_large_patch14*``) and the student belongs to a family
  the release distilled into from that teacher (a family row serves every member: ``resnet50d`` and
  ``resnet18`` both take the R50 row):

  | teacher | student family (row)           | α / β       | softmax scale | heads s3 / s4 | CAP norm |
  |---------|--------------------------------|-------------|---------------|---------------|----------|
  | Swin-L  | ``mobilenetv1*`` (MBv1)        | .08 / .06   | 5             | 16 / 24       | bn       |
  | Swin-L  | ``resnet*`` (R50)              | .08 / .06   | 5             | 16 / 24       | bn       |
  | Swin-L  | ``convnext*`` (ConvNeXt-T)     | .08 / .06   | 1             | 8 / 16        | bn       |
  | Swin-L  | ``mixer*`` (Mixer-S/16, -B/16) | .08 / .06   | 5             | 8 / 8         | bn       |
  | Swin-L  | ``vit_*``, ``deit*`` (ViT-S/B) | .08 / .06   | 5             | 8 / 8         | bn       |
  | Swin-L  | ``swin*`` (Swin-T)             | .08 / .06   | 1             | 24 / 48       | ln       |
  | EVA-L   | ``resnet*`` (R50)              | .016 / .008 | 0.2           | 8 / 8         | bn       |
  | EVA-L   | ``mixer*`` (Mixer-B/14)        | .016 / .008 | 1             | 8 / 8         | bn       |
  | EVA-L   | ``vit_*``, ``deit*`` (ViT-B/14)| .016 / .008 | 1             | 8 / 8         | bn       |
  | EVA-L   | ``eva02_small*`` (EVA-02-S)    | .008 / .004 | 1             | 8 / 8         | bn       |

  Only R50/MBv1 (loss v2) set 16/24 heads, ConvNeXt-T 8/16 and Swin-T 24/48; every other (v1)
  config keeps the loss's default of 8. LayerNorm2d in the CAP only for Swin-T.
- ``"ours"`` (the rule this module had before, and the fallback for every pair the release did not
  publish: other teachers, other student families): α, β by teacher family (ViT family .016/.008,
  Swin and CNN teachers .08/.06); softmax scale 0.2 / 1.0 (EVA-like teacher → CNN / other) and
  1.0 / 5.0 (other teachers → ConvNeXt or Swin / other); heads from head sizes 48 (stage 3) and 64
  (stage 4) for Swin and CNN teachers, 64 / 64 for ViT teachers; CAP norm by the student's class
  (``student.student_norm``: LayerNorm2d for ConvNeXt, else BatchNorm).

Not in the loss config: which stage-4 map the student taps (before or after its final norm) is a
student option (``create_student(..., stage4_norm=...)``); ``LossConfig.stage4_norm`` records the
choice a run's student was built with, and the distiller refuses a student that disagrees.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .cap import default_num_heads
from .teacher import TeacherInfo

__all__ = ["LossConfig", "preset", "release_row", "STYLES"]

STYLES = ("release", "ours")


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
    # The CAPs' patchify norm, 'bn' or 'ln'; None: by the student's class (student.student_norm).
    cap_norm: str | None = None
    # The student's stage-4 tap after its final norm (True) or the raw last block (False); None: the
    # student's default (student.default_stage4_norm). Recorded so a resume builds the same taps.
    stage4_norm: bool | None = None

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


# (α, β, softmax_scale, heads s3, heads s4, CAP norm) by student-name prefix; RECIPES.md.
_SWIN_L_ROWS = {
    ("mobilenetv1",): (0.08, 0.06, 5.0, 16, 24, "bn"),
    ("resnet",): (0.08, 0.06, 5.0, 16, 24, "bn"),
    ("convnext",): (0.08, 0.06, 1.0, 8, 16, "bn"),
    ("mixer",): (0.08, 0.06, 5.0, 8, 8, "bn"),
    ("vit_", "deit"): (0.08, 0.06, 5.0, 8, 8, "bn"),
    ("swin",): (0.08, 0.06, 1.0, 24, 48, "ln"),
}
_EVA_L_ROWS = {
    ("resnet",): (0.016, 0.008, 0.2, 8, 8, "bn"),
    ("mixer",): (0.016, 0.008, 1.0, 8, 8, "bn"),
    ("vit_", "deit"): (0.016, 0.008, 1.0, 8, 8, "bn"),
    ("eva02_small",): (0.008, 0.004, 1.0, 8, 8, "bn"),
}
_RELEASE_TEACHERS = {("swin_large",): _SWIN_L_ROWS, ("eva_large_patch14",): _EVA_L_ROWS}


def release_row(teacher: TeacherInfo, student_name: str) -> dict | None:
    """The release's settings for this pair ({alpha, beta, softmax_scale, heads_stage3, heads_stage4,
    cap_norm}), or None when the release published no pair of this teacher and student family."""
    teacher_base, student_base = teacher.name.split(".")[0], student_name.split(".")[0]
    for teacher_prefixes, rows in _RELEASE_TEACHERS.items():
        if teacher_base.startswith(teacher_prefixes):
            for student_prefixes, row in rows.items():
                if student_base.startswith(student_prefixes):
                    return dict(zip(("alpha", "beta", "softmax_scale", "heads_stage3", "heads_stage4", "cap_norm"), row))
    return None


def _ours(teacher: TeacherInfo, kind: str) -> dict:
    if teacher.family == "vit":
        alpha, beta, scale, head_dims = 0.016, 0.008, (0.2 if kind == "cnn" else 1.0), (64, 64)
    else:  # swin, and CNN teachers by our choice
        alpha, beta, scale, head_dims = 0.08, 0.06, (1.0 if kind in ("convnext", "swin") else 5.0), (48, 64)
    return dict(alpha=alpha, beta=beta, softmax_scale=scale,
                heads_stage3=default_num_heads(teacher.mid_channels, head_dims[0]),
                heads_stage4=default_num_heads(teacher.final_channels, head_dims[1]), cap_norm=None)


def preset(teacher: TeacherInfo, student_name: str, style: str = "release", **overrides) -> LossConfig:
    """The loss configuration for this teacher → student pair; keyword overrides win.

    style: 'release' (default): the release's values where it published the pair, else 'ours';
    'ours': the head-size rule this module had before, for every pair (module docstring)."""
    if style not in STYLES:
        raise ValueError(f"unknown preset style {style!r}; expected one of {list(STYLES)}")
    kind = _student_kind(student_name)
    values = (release_row(teacher, student_name) if style == "release" else None) or _ours(teacher, kind)
    cfg = LossConfig(**values, task_loss="ce" if kind == "cnn" else "ce_smooth")
    unknown = set(overrides) - set(cfg.to_dict())
    if unknown:
        raise ValueError(f"unknown loss settings {sorted(unknown)}; expected some of {sorted(cfg.to_dict())} "
                         f"(or style: one of {list(STYLES)})")
    return LossConfig(**{**cfg.to_dict(), **overrides})
