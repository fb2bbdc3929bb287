"""Replayable augmented views.

A view is a crop box as fractions of the original image (top, left, height, width) and a
horizontal-flip flag, sampled once per (image, view) from a seeded RNG and stored in the cache.
Teacher and student replay the same box on the original image, each at its own input size,
interpolation and normalisation; a flipped view is rendered from flipped pixels (features are
never flipped after the fact).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field, Strict
from pydantic.dataclasses import dataclass as checked_dataclass

__all__ = ["ViewParams", "ViewConfig", "sample_views", "render_view", "normalize", "fingerprint", "VIEW_FIELDS"]

VIEW_FIELDS = ("top", "left", "height", "width", "flip")
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class ViewParams:
    """One view: the crop box in fractions of the original image, and the flip flag."""

    top: float
    left: float
    height: float
    width: float
    flip: bool

    def as_array(self) -> np.ndarray:
        return np.array([self.top, self.left, self.height, self.width, float(self.flip)], dtype=np.float64)

    @classmethod
    def from_array(cls, a) -> "ViewParams":
        a = np.asarray(a, dtype=np.float64)
        return cls(float(a[0]), float(a[1]), float(a[2]), float(a[3]), bool(a[4] >= 0.5))


@checked_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ViewConfig:
    """RandomResizedCrop + horizontal flip, as torchvision samples them.

    Typed and checked on construction (pydantic): a job spec's ``per_image: "four"`` or ``2.5`` is
    refused by name instead of failing deep inside the job; YAML lists become tuples."""

    per_image: Annotated[int, Strict(), Field(ge=1), Field(
        description="K: views stored per image; epoch e of training uses view e mod K")] = 4
    seed: Annotated[int, Strict(), Field(ge=0), Field(
        description="seed of the view sampling; each image's views are seeded by (seed, its key), so adding "
                    "images changes no other image's views")] = 0
    scale: Annotated[tuple[Annotated[float, Strict()], Annotated[float, Strict()]], Field(
        description="RandomResizedCrop's area range [lo, hi] as fractions of the image, 0 < lo <= hi <= 1")] = (0.08, 1.0)
    ratio: Annotated[tuple[Annotated[float, Strict()], Annotated[float, Strict()]], Field(
        description="RandomResizedCrop's aspect-ratio range [lo, hi], 0 < lo <= hi")] = (3 / 4, 4 / 3)
    flip: Annotated[float, Strict(), Field(ge=0, le=1), Field(
        description="probability of a horizontal flip (rendered from flipped pixels, never a flipped feature)")] = 0.5

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"views.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"views.ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    def to_dict(self) -> dict:
        return asdict(self) | {"convention": "crop box (top, left, height, width) as fractions of the original "
                                             "image, then resize to the model's input size, then horizontal flip"}


def _rng(seed: int, key: str) -> np.random.Generator:
    # Seeded by the sample's key, not its position, so adding images changes no other image's views.
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def sample_views(key: str, image_size: tuple[int, int], cfg: ViewConfig) -> list[ViewParams]:
    """K views of one image. image_size: (width, height) of the original."""
    width, height = image_size
    rng = _rng(cfg.seed, key)
    area = width * height
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    views = []
    for _ in range(cfg.per_image):
        for _attempt in range(10):
            target = area * rng.uniform(*cfg.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                break
        else:  # torchvision's fallback: a centre crop at the clamped ratio
            in_ratio = width / height
            if in_ratio < cfg.ratio[0]:
                w, h = width, round(width / cfg.ratio[0])
            elif in_ratio > cfg.ratio[1]:
                h, w = height, round(height * cfg.ratio[1])
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        flip = bool(rng.random() < cfg.flip)
        views.append(ViewParams(top / height, left / width, h / height, w / width, flip))
    return views


def render_view(image: Image.Image, view: ViewParams, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """The view's pixels at a model's input size: (H, W, 3) uint8. size: (H, W)."""
    try:
        resample = _RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}") from None
    W, H = image.size
    box = (view.left * W, view.top * H, (view.left + view.width) * W, (view.top + view.height) * H)
    out = image.resize((size[1], size[0]), resample=resample, box=box)
    if view.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)


def normalize(pixels: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (H, W, 3) → float32 (B, 3, H, W) or (3, H, W), (x/255 − mean)/std."""
    x = torch.as_tensor(np.array(pixels, copy=True)) if isinstance(pixels, np.ndarray) else pixels
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)
    shape = (1, 3, 1, 1) if x.ndim == 4 else (3, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(shape)
    std = torch.tensor(std, dtype=torch.float32).view(shape)
    return (x.float().div_(255) - mean) / std


def fingerprint(pixels: np.ndarray) -> str:
    """A short hash of a view's uint8 input pixels, to verify a replay."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()[:16]
