"""Student stage taps through timm's own ``forward_intermediates``.

A student gives three things per batch: its stage-3 map, its stage-4 map (both (B, C, H, W); token
students are laid out on their patch grid with CLS/register tokens dropped, by timm) and its
logits. For hierarchical students (ResNet, MobileNet, ConvNeXt, Swin) stage 3 and 4 are the last
two of timm's ``feature_info``; for isotropic ones (ViT/DeiT, Mixer) they are the blocks at 3/4
depth and the last block, as the four "stages" of a 12-block ViT end at blocks 3, 6, 9, 12
(1-based: the release taps blocks 9 and 12 of ViT/DeiT, RECIPES.md; forward_intermediates indices 8, 11).

Stage 4 after the final norm (``stage4_norm``): the release takes a ViT/DeiT student's block 12 after
the final LayerNorm and a ConvNeXt's stage 4 after its final LayerNorm, a Mixer's un-normed
(RECIPES.md, "Common to every config"); that is the default for those classes
(``default_stage4_norm``). Other students keep the raw last stage (our choice; ResNet and
MobileNet have no final norm). Stage 3 is never normed.
"""
from __future__ import annotations

import timm
import torch
from timm.models import register_model
from torch import nn

__all__ = ["StudentTaps", "stage_indices", "student_norm", "default_stage4_norm", "final_norm", "create_student", "PLAIN_TIMM_EQUIVALENT"]

ISOTROPIC = ("VisionTransformer", "VisionTransformerDistilled", "MlpMixer", "Eva", "Beit")


def stage_indices(model: nn.Module) -> tuple[int, int]:
    """forward_intermediates indices of stage 3 and stage 4."""
    if type(model).__name__ in ISOTROPIC:
        depth = len(model.blocks)
        return round(3 * depth / 4) - 1, depth - 1
    n = len(model.feature_info)
    return n - 2, n - 1


def student_norm(model: nn.Module) -> str:
    """The CAP's patchify norm by the student's class, our rule (presets' style 'ours' and pairs the
    release did not publish): LayerNorm for ConvNeXt-like students, else BatchNorm. The release's
    pairs set it in their preset (LayerNorm2d for Swin-T only)."""
    return "ln" if type(model).__name__ == "ConvNeXt" else "bn"


# The classes whose stage-4 map the release takes after the final norm (RECIPES.md).
STAGE4_NORMED = ("VisionTransformer", "VisionTransformerDistilled", "ConvNeXt")


def default_stage4_norm(model: nn.Module) -> bool:
    """Whether this student's stage-4 tap is taken after its final norm unless told otherwise."""
    return type(model).__name__ in STAGE4_NORMED


def final_norm(model: nn.Module) -> nn.Module | None:
    """The student's final norm, the one after its last block/stage (None: it has none).

    ViT/DeiT, Mixer, Swin, EVA, BEiT: ``norm``, or ``fc_norm`` where timm puts the final LayerNorm
    after the pooling (global_pool='avg'); ConvNeXt: ``norm_pre`` (head_norm_first) or ``head.norm``."""
    if type(model).__name__ == "ConvNeXt":
        candidates = (getattr(model, "norm_pre", None), getattr(getattr(model, "head", None), "norm", None))
    else:
        candidates = (getattr(model, "norm", None), getattr(model, "fc_norm", None))
    return next((m for m in candidates if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)), None)


def _apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm over channels on an NCHW map: a ``*2d`` norm takes the map as is, a token norm
    (LayerNorm over the last dim) takes it channels-last."""
    if type(norm).__name__.endswith("2d"):
        return norm(x)
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class StudentTaps(nn.Module):
    """Wraps a timm student: images (B, 3, H, W) → (stage3 map, stage4 map, logits)."""

    def __init__(self, model: nn.Module, input_size: int | tuple[int, int] | None = None,
                 stage4_norm: bool | None = None):
        """input_size: the student's input (H, W) or side; default: timm's pretrained_cfg.
        stage4_norm: tap stage 4 after the student's final norm (True) or raw (False); None: the
        release's choice for this class (default_stage4_norm). Kept as ``self.stage4_norm``."""
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"student {type(model).__name__} has no timm forward_intermediates; cannot tap its stages")
        self.model = model
        self.indices = stage_indices(model)
        self.stage4_norm = default_stage4_norm(model) if stage4_norm is None else bool(stage4_norm)
        if self.stage4_norm and final_norm(model) is None:
            raise ValueError(f"stage4_norm: student {type(model).__name__} has no final norm to tap stage 4 after; "
                             f"set stage4_norm: false")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.input_size = tuple(cfg.get("input_size", (3, 224, 224)))
        if hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None):
            self.input_size = (3, *model.patch_embed.img_size)
        if input_size is not None:
            hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            self.input_size = (3, *hw)
        # Probe once for the tapped shapes, which the CAPs are built for.
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                s3, s4, _ = self(torch.zeros(1, *self.input_size, device=next(model.parameters()).device))
        except (AssertionError, RuntimeError) as e:  # timm's own check, 150 lines down: say what to change
            arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
            built = getattr(getattr(model, "patch_embed", None), "img_size", None)
            raise ValueError(
                f"student {arch} cannot run at input size {self.input_size[1]}x{self.input_size[2]}"
                + (f" (it was built for {built[0]}x{built[1]})" if built else "")
                + f": build it for that size with student_kwargs: {{img_size: {self.input_size[1]}}}, or drop "
                f"student_input_size; timm said: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:
            model.train(was_training)
        self.stage3_shape = tuple(s3.shape[1:])  # (C, H, W)
        self.stage4_shape = tuple(s4.shape[1:])

    def forward(self, images: torch.Tensor):
        if images.shape[1:] != self.input_size:
            raise ValueError(f"student expects inputs of shape (B, {', '.join(map(str, self.input_size))}), found {tuple(images.shape)}")
        final, (s3, s4) = self.model.forward_intermediates(
            images, indices=list(self.indices), norm=False, output_fmt="NCHW", intermediates_only=False
        )
        if self.stage4_norm:  # a norm over channels commutes with the token → map layout
            s4 = _apply_norm(final_norm(self.model), s4)
        return s3, s4, self.model.forward_head(final)


_MIXER_B14 = dict(patch_size=14, num_blocks=12, embed_dim=768)
_VIT_B14 = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12)

# The students this module registers → (a timm name whose entrypoint rebuilds them given these model
# args, or None where none can), so that an exported student loads in plain timm.
PLAIN_TIMM_EQUIVALENT = {
    "vit_base_patch14_224": ("vit_base_patch16_224", _VIT_B14),  # its args override the /16 defaults
    "mixer_b14_224": (None, _MIXER_B14),  # every timm Mixer entrypoint fixes patch_size (a second value is a TypeError)
}


@register_model
def mixer_b14_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Mixer-B/14 (the EVA → Mixer-B/14 pair of the paper; timm has only /16 and /32)."""
    from timm.models.mlp_mixer import _create_mixer

    return _create_mixer("mixer_b14_224", pretrained=pretrained, **dict(_MIXER_B14, **kwargs))


@register_model
def vit_base_patch14_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-B/14 at 224 px (the EVA → ViT-B/14 pair of the paper)."""
    from timm.models.vision_transformer import _create_vision_transformer

    return _create_vision_transformer("vit_base_patch14_224", pretrained=pretrained, **dict(_VIT_B14, **kwargs))


def takes_img_size(name: str, **kwargs) -> bool:
    """Whether the timm model ``name`` is built for one input size given as ``img_size`` (ViT, Swin,
    Mixer, ...): read off its class, built on the meta device (no weights are initialised)."""
    import inspect

    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
    except Exception:  # noqa: BLE001 — a model that cannot be built on meta is built for real below
        return False
    return "img_size" in inspect.signature(type(model).__init__).parameters


def create_student(name: str, num_classes: int, input_size: int | tuple[int, int] | None = None,
                   stage4_norm: bool | None = None, **kwargs) -> StudentTaps:
    """A timm student by name with the teacher's number of classes, wrapped with its taps.

    stage4_norm: tap stage 4 after the final norm or not (StudentTaps); None: the release's choice.

    input_size: (H, W) or a side the student runs at, instead of timm's default. A family built for one
    input size (ViT, Swin, Mixer: their constructor takes img_size) is built for it, unless kwargs
    already give img_size. The arguments used are kept as ``taps.model_args``."""
    if input_size is not None and "img_size" not in kwargs and takes_img_size(name, num_classes=num_classes, **kwargs):
        kwargs["img_size"] = input_size if isinstance(input_size, int) else tuple(input_size)
    taps = StudentTaps(timm.create_model(name, num_classes=num_classes, **kwargs), input_size, stage4_norm)
    taps.model_args = dict(kwargs)
    return taps
