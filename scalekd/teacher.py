"""The teacher split: for a timm model, `early` and `late` such that

    late(early(x)) == the model's final token map   and   late.logits(early(x)) == model(x).

Every tensor crosses the split as tokens (B, L, C) on a recorded grid, whatever the family's own
layout (Swin NHWC, CNN NCHW, ViT sequences), so the cache, the CAPs and the trainer speak one form:
- ``mid``   = early's output = late's input. For plain ViTs it is the whole sequence, prefix
  (CLS/register) tokens first, L = P + H·W, so that late(mid) is exact.
- ``final`` = late's output with prefix tokens dropped, (B, H·W, C) — F^t in SCALEKD.md.

TPP's proxy path feeds late with CAP outputs, which are patch tokens only. For ViTs late then puts
the teacher's input-level prefix tokens (its CLS/register embeddings, position added) in front: the
live prefix at the split is early's output for that image, which the trainer does not have. The
release's plain-ViT path is broken, so this is our choice, stated here and in docs/method.md.

Family adapters are a few lines each; a name no adapter covers is an error listing the families.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = ["TeacherInfo", "TeacherSplit", "TeacherLate", "split_teacher", "teacher_family", "SUPPORTED_TEACHERS"]

# family → name prefixes (timm model names)
SUPPORTED_TEACHERS = {
    "swin": ("swin_", "swinv2_"),
    "vit": ("vit_", "deit_", "deit3_", "beit_", "beitv2_", "eva_", "eva02_"),
    "cnn": ("tf_efficientnet_lite", "efficientnet_lite", "convnext_"),
}


def teacher_family(name: str) -> str:
    """'swin', 'vit' or 'cnn' for a supported timm model name (a pretrained tag after '.' is ignored)."""
    base = name.split(".")[0]
    for family, prefixes in SUPPORTED_TEACHERS.items():
        if base.startswith(prefixes):
            # SwinV2-CR, Swin-S3 and BEiT-3 have other layouts; refuse them rather than guess.
            # (timm's SwinV2 has Swin V1's layout: patch_embed → layers (NHWC) → norm → head.)
            if base.startswith(("swinv2_cr_", "swin_s3_", "beit3_")):
                break
            return family
    supported = ", ".join(f"{p}*" for ps in SUPPORTED_TEACHERS.values() for p in ps)
    raise ValueError(f"unsupported teacher {name!r}: no teacher split covers it; supported families: {supported}")


@dataclass
class TeacherInfo:
    """What a reader of the cache needs to know about the split (all plain values)."""

    name: str
    family: str
    split_point: str  # e.g. "layers.3" — the first module of late
    late_modules: list[str]  # state-dict prefixes of the weights late needs
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    num_classes: int
    num_prefix_tokens: int
    mid_hw: tuple[int, int]
    mid_channels: int
    final_hw: tuple[int, int]
    final_channels: int
    late_blocks: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def mid_tokens(self) -> int:
        """L of mid: prefix tokens plus the grid."""
        return self.num_prefix_tokens + self.mid_hw[0] * self.mid_hw[1]

    @property
    def final_tokens(self) -> int:
        return self.final_hw[0] * self.final_hw[1]

    def to_dict(self) -> dict:
        return asdict(self)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class _AlwaysEval(nn.Module):
    """A frozen part of the teacher: stays in eval() (no dropout, no drop-path, BatchNorm statistics
    untouched) whatever mode its parent is put in."""

    def train(self, mode: bool = True):
        return super().train(False)


class TeacherEarly(_AlwaysEval):
    """images (B, 3, H, W) → mid tokens (B, L, C_mid)."""

    def __init__(self, model: nn.Module, adapter: "_Adapter"):
        super().__init__()
        self.model, self.adapter = model, adapter
        _frozen(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.early_grid(self.model, x)[0]


class TeacherLate(_AlwaysEval):
    """mid tokens (B, L, C_mid) → final tokens (B, N, C). Frozen; gradients pass through to its input.

    ``model`` holds the timm model; when built for training alone, its early modules are removed
    (see ``TeacherSplit.drop_early``), so the state dict holds only the weights late needs, under the
    checkpoint's own key names.
    """

    def __init__(self, model: nn.Module, adapter: "_Adapter", info: TeacherInfo):
        super().__init__()
        self.model, self.adapter, self.info = model, adapter, info
        _frozen(self)

    def _check(self, mid: torch.Tensor) -> None:
        info = self.info
        n = info.mid_hw[0] * info.mid_hw[1]
        if mid.ndim != 3 or mid.shape[-1] != info.mid_channels or mid.shape[1] not in (n, info.mid_tokens):
            raise ValueError(
                f"teacher late ({info.name}): expected mid tokens (B, {info.mid_tokens} or {n}, "
                f"{info.mid_channels}), found {tuple(mid.shape)}"
            )

    def forward(self, mid: torch.Tensor) -> torch.Tensor:
        return self.forward_with_logits(mid, logits=False)[0]

    def forward_with_logits(self, mid: torch.Tensor, logits: bool = True):
        """mid (B, L, C_mid) → (final (B, N, C), logits (B, classes) or None)."""
        self._check(mid)
        out = self.adapter.late(self.model, mid, self.info)
        final = self.adapter.final_tokens(out, self.info)
        return final, (self.adapter.head(self.model, out) if logits else None)


class TeacherSplit:
    """A frozen timm teacher cut in two. ``early`` and ``late`` are modules sharing ``model``."""

    def __init__(self, model: nn.Module, info: TeacherInfo, adapter: "_Adapter"):
        self.model, self.info, self.adapter = _frozen(model), info, adapter
        self.early = TeacherEarly(model, adapter)
        self.late = TeacherLate(model, adapter, info)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the cache stores for a batch of teacher inputs: mid, final, logits."""
        mid = self.early(images)
        final, logits = self.late.forward_with_logits(mid)
        return {"mid": mid, "final": final, "logits": logits}

    def late_keys(self) -> list[str]:
        """The model's state-dict keys that late needs (under the checkpoint's own names)."""
        early = set(self.adapter.early_modules(self.model, self.info))
        return [k for k in self.model.state_dict() if _owning_prefix(k, early) is not None]

    def parameter_counts(self) -> dict[str, int]:
        """{'early': n, 'late': n} parameters (late includes the head)."""
        late = set(self.late_keys())
        counts = {"early": 0, "late": 0}
        for k, p in self.model.named_parameters():
            counts["late" if k in late else "early"] += p.numel()
        return counts

    def drop_early(self) -> TeacherLate:
        """Remove every early module from the model so only late's weights remain; returns late."""
        for path in self.adapter.early_modules(self.model, self.info):
            parent, _, leaf = path.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            if leaf.isdigit():  # an entry of a Sequential/ModuleList: keep indices stable
                owner[int(leaf)] = nn.Identity()
            elif isinstance(getattr(owner, leaf), nn.Parameter):
                delattr(owner, leaf)
                setattr(owner, leaf, None)
            else:
                setattr(owner, leaf, nn.Identity())
        self.early = None
        return self.late


# --------------------------------------------------------------------------- family adapters


class _Adapter:
    def early_grid(self, model, x) -> tuple[torch.Tensor, tuple[int, int]]: ...  # mid tokens and their grid
    def final_hw(self, out, info) -> tuple[int, int]: ...
    def late(self, model, mid, info): ...
    def head(self, model, out): ...
    def final_tokens(self, out, info): ...
    def early_modules(self, model, info) -> list[str]: ...


def _nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _tokens_to_nchw(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return t.transpose(1, 2).unflatten(2, hw)


class _SwinAdapter(_Adapter):
    """timm SwinTransformer and SwinTransformerV2: late = layers[-1] (it begins with the 14→7 patch
    merging) + norm."""

    def early_grid(self, model, x):
        x = model.layers[:-1](model.patch_embed(x))  # NHWC
        return x.flatten(1, 2), tuple(x.shape[1:3])

    def final_hw(self, out, info):
        return tuple(out.shape[1:3])

    def late(self, model, mid, info):
        x = mid.unflatten(1, info.mid_hw)
        return model.norm(model.layers[-1](x))  # NHWC

    def head(self, model, out):
        return model.forward_head(out)

    def final_tokens(self, out, info):
        return out.flatten(1, 2)

    def early_modules(self, model, info):
        return ["patch_embed"] + [f"layers.{i}" for i in range(len(model.layers) - 1)]


class _CNNAdapter(_Adapter):
    """EfficientNet(-Lite) and ConvNeXt: late = the last stride stage + the head-side conv/norm."""

    def __init__(self, stem: list[str], stages: str, tail: list[str], first_late: int):
        self.stem, self.stages, self.tail, self.first_late = stem, stages, tail, first_late

    def early_grid(self, model, x):
        for name in self.stem:
            x = model.get_submodule(name)(x)
        x = model.get_submodule(self.stages)[: self.first_late](x)
        return _nchw_to_tokens(x), tuple(x.shape[2:4])

    def final_hw(self, out, info):
        return tuple(out.shape[2:4])

    def late(self, model, mid, info):
        x = model.get_submodule(self.stages)[self.first_late :](_tokens_to_nchw(mid, info.mid_hw))
        for name in self.tail:
            x = model.get_submodule(name)(x)
        return x

    def head(self, model, out):
        return model.forward_head(out)

    def final_tokens(self, out, info):
        return _nchw_to_tokens(out)

    def early_modules(self, model, info):
        return list(self.stem) + [f"{self.stages}.{i}" for i in range(self.first_late)]


class _ViTAdapter(_Adapter):
    """timm VisionTransformer, Beit and Eva: late = the last k blocks + the final norm."""

    def __init__(self, kind: str, late_blocks: int):
        self.kind, self.k = kind, late_blocks

    def _rope(self, model, grid):
        rope = getattr(model, "rope", None)
        if rope is None:
            return None
        return rope.get_embed() if hasattr(rope, "feat_shape") else rope.get_embed(shape=list(grid))

    def _run_blocks(self, model, x, blocks: range, grid):
        if self.kind == "beit":
            bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
            for i in blocks:
                x = model.blocks[i](x, shared_rel_pos_bias=bias)
        elif self.kind == "eva":
            rope = self._rope(model, grid)
            mixed = getattr(model, "rope_mixed", False) and rope is not None
            for i in blocks:
                x = model.blocks[i](x, rope=rope[i] if mixed else rope)
        else:
            for i in blocks:
                x = model.blocks[i](x)
        return x

    def _embed(self, model, patches):
        """The model's own token embedding (prefix tokens + position) of patch embeddings."""
        if self.kind == "beit":
            x = torch.cat((model.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
            return x + model.pos_embed if model.pos_embed is not None else x
        x = model._pos_embed(patches)
        x = x[0] if isinstance(x, tuple) else x  # Eva also returns its rope
        norm_pre = getattr(model, "norm_pre", None)
        return norm_pre(x) if norm_pre is not None else x

    def early_grid(self, model, x):
        grid = tuple(model.patch_embed.grid_size)
        x = self._embed(model, model.patch_embed(x))
        return self._run_blocks(model, x, range(len(model.blocks) - self.k), grid), grid

    def final_hw(self, out, info):
        return info.mid_hw

    def prefix(self, model, batch: int, like: torch.Tensor, grid: tuple[int, int]):
        """The teacher's input-level prefix tokens (1→B, P, C), for patch-only (proxy) input.
        Uses only the prefix embeddings (cls/reg tokens, pos_embed, norm_pre), which late keeps."""
        shape = (1, *grid, model.embed_dim) if getattr(model, "dynamic_img_size", False) else (1, grid[0] * grid[1], model.embed_dim)
        zeros = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._embed(model, zeros)[:, : model.num_prefix_tokens].expand(batch, -1, -1)

    def late(self, model, mid, info):
        if mid.shape[1] != info.mid_tokens:  # patch tokens only: TPP's proxy path
            mid = torch.cat((self.prefix(model, mid.shape[0], mid, info.mid_hw), mid), dim=1)
        depth = len(model.blocks)
        return model.norm(self._run_blocks(model, mid, range(depth - self.k, depth), info.mid_hw))

    def head(self, model, out):
        return model.forward_head(out)

    def final_tokens(self, out, info):
        return out[:, info.num_prefix_tokens :]

    def early_modules(self, model, info):
        # The prefix embeddings (cls/reg tokens, pos_embed, norm_pre) stay: late's proxy path uses them.
        return ["patch_embed"] + [f"blocks.{i}" for i in range(len(model.blocks) - self.k)]


def _adapter_for(model: nn.Module, family: str, late_blocks: int) -> tuple[_Adapter, str]:
    cls = type(model).__name__
    if family == "swin":
        if cls not in ("SwinTransformer", "SwinTransformerV2"):
            raise ValueError(f"no teacher split for timm class {cls}; Swin splits cover SwinTransformer and "
                             f"SwinTransformerV2")
        return _SwinAdapter(), f"layers.{len(model.layers) - 1}"
    if family == "vit":
        if cls not in ("VisionTransformer", "VisionTransformerDistilled", "Beit", "Eva"):
            raise ValueError(f"no teacher split for timm class {cls} ({getattr(model, 'default_cfg', {}).get('architecture', '')}); "
                             f"plain-ViT splits cover VisionTransformer, VisionTransformerDistilled, Beit and Eva")
        kind = {"Beit": "beit", "Eva": "eva"}.get(cls, "vit")
        if not 1 <= late_blocks < len(model.blocks):
            raise ValueError(f"late_blocks must be in [1, {len(model.blocks) - 1}] for {cls}, got {late_blocks}")
        return _ViTAdapter(kind, late_blocks), f"blocks.{len(model.blocks) - late_blocks}"
    if cls == "EfficientNet":
        # Late starts where the last stride-2 stage starts (feature_info marks the stage ends).
        stage_ends = [int(f["module"].split(".")[1]) for f in model.feature_info if f["module"].startswith("blocks.")]
        first = stage_ends[-2] + 1
        return _CNNAdapter(["conv_stem", "bn1"], "blocks", ["conv_head", "bn2"], first), f"blocks.{first}"
    if cls == "ConvNeXt":
        first = len(model.stages) - 1
        return _CNNAdapter(["stem"], "stages", ["norm_pre"], first), f"stages.{first}"
    raise ValueError(f"no teacher split for timm class {cls} (family {family})")


def split_teacher(model: nn.Module, name: str | None = None, late_blocks: int = 2) -> TeacherSplit:
    """Cut a timm teacher into early and late; the shapes are read off one probe forward.

    model: a timm model (weights already loaded); name: its timm name (default: its pretrained_cfg's).
    late_blocks: the number of transformer blocks in late for plain ViTs (the release: 2).
    """
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    name = name or cfg.get("architecture") or type(model).__name__
    family = teacher_family(name)
    adapter, split_point = _adapter_for(model, family, late_blocks)
    _frozen(model)

    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    if hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None):
        input_size = (3, *model.patch_embed.img_size)
    probe = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    try:
        return _probe_split(model, name, family, adapter, split_point, cfg, input_size, probe, late_blocks)
    except (AttributeError, AssertionError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot split teacher {name} ({type(model).__name__}) at {split_point}: "
                         f"{type(e).__name__}: {e}") from e


def _probe_split(model, name, family, adapter, split_point, cfg, input_size, probe, late_blocks) -> "TeacherSplit":
    num_prefix = int(getattr(model, "num_prefix_tokens", 0)) if family == "vit" else 0
    with torch.no_grad():
        mid, mid_hw = adapter.early_grid(model, probe)
        partial = TeacherInfo(
            name=name, family=family, split_point=split_point, late_modules=[], input_size=input_size,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=cfg.get("interpolation", "bicubic"), crop_pct=float(cfg.get("crop_pct", 0.875)),
            num_classes=int(getattr(model, "num_classes", 0)), num_prefix_tokens=num_prefix, mid_hw=mid_hw,
            mid_channels=int(mid.shape[-1]), final_hw=(0, 0), final_channels=0,
            late_blocks=late_blocks if family == "vit" else None,
        )
        out = adapter.late(model, mid, partial)
        final = adapter.final_tokens(out, partial)
    final_hw = adapter.final_hw(out, partial)
    early = set(adapter.early_modules(model, partial))
    keys = model.state_dict().keys()
    late_modules = sorted({_owning_prefix(k, early) for k in keys} - {None})
    info = TeacherInfo(**{**partial.to_dict(), "final_hw": final_hw, "final_channels": int(final.shape[-1]), "late_modules": late_modules})
    return TeacherSplit(model, info, adapter)


def _owning_prefix(key: str, early: set[str]) -> str | None:
    """The top-level module path of a state-dict key, or None when it belongs to early."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in early:
            return None
    # group blocks by index: "blocks.22", "layers.3"; else the top-level name
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]

