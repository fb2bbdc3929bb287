"""Replayable augmented views.

A view is an ordered list of operations with their sampled parameters, drawn once per (image,
view) from a generator seeded by the image's key and stored in the cache as one fixed-width row
whose columns the manifest names (``views.fields``):

1. RandomResizedCrop: the crop box as fractions of the original image (top, left, height, width),
   resized to the model's input size with the model's interpolation;
2. horizontal flip (rendered from flipped pixels; features are never flipped after the fact);
3. RandAugment (``views.rand_augment``, a timm string): per slot the op, its magnitude, its sign and
   whether it was applied (pipeline/augment.py);
4. colour jitter (``views.color_jitter``): the order and the four factors;
5. random erasing (``views.erasing``, after normalisation): boxes as fractions of the input, and a
   seed for their fill.

Teacher and student replay the same row on the original image, each at its own input size,
interpolation and normalisation (pipeline/augment.py says what each op means at another size).
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field, Strict
from pydantic.dataclasses import dataclass as checked_dataclass

from . import augment

__all__ = ["ViewParams", "ViewConfig", "Replay", "sample_views", "render_view", "model_input", "to_model_input",
           "normalize", "Erasing", "fingerprint", "VIEW_FIELDS", "view_fields"]

VIEW_FIELDS = ("top", "left", "height", "width", "flip")
_JITTER_FIELDS = tuple(f"jitter_order{i}" for i in range(4)) + (
    "jitter_brightness", "jitter_contrast", "jitter_saturation", "jitter_hue")
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class ViewParams:
    """One view: the crop box in fractions of the original image, the flip flag, and the sampled
    RandAugment slots, colour jitter and erasing boxes (fractions of the model's input) with their seed."""

    top: float
    left: float
    height: float
    width: float
    flip: bool
    ops: tuple = ()
    jitter: Optional[tuple] = None
    erase: tuple = ()
    erase_seed: int = 0

    def as_array(self, fields=VIEW_FIELDS) -> np.ndarray:
        """The row of the cache's view array with these columns (``view_fields(config)``)."""
        v = {"top": self.top, "left": self.left, "height": self.height, "width": self.width, "flip": float(self.flip),
             "erase_seed": float(self.erase_seed), "erase_count": float(len(self.erase))}
        for i, op in enumerate(self.ops):
            v |= {f"ra{i}_op": op.op, f"ra{i}_magnitude": op.magnitude, f"ra{i}_sign": op.sign,
                  f"ra{i}_applied": float(op.applied)}
        if self.jitter is not None:
            v |= dict(zip(_JITTER_FIELDS, self.jitter))
        for j, box in enumerate(self.erase):
            v |= dict(zip((f"erase{j}_top", f"erase{j}_left", f"erase{j}_height", f"erase{j}_width"), box))
        return np.array([float(v.get(f, 0.0)) for f in fields], dtype=np.float64)

    @classmethod
    def from_array(cls, a, fields=VIEW_FIELDS) -> "ViewParams":
        a = np.asarray(a, dtype=np.float64)
        v = dict(zip(fields, map(float, a)))
        ops = []
        while f"ra{len(ops)}_op" in v:
            i = len(ops)
            ops.append(augment.RandOp(int(v[f"ra{i}_op"]), v[f"ra{i}_magnitude"], int(v[f"ra{i}_sign"]),
                                      v[f"ra{i}_applied"] >= 0.5))
        jitter = tuple(v[f] for f in _JITTER_FIELDS) if _JITTER_FIELDS[0] in v else None
        erase = tuple(tuple(v[f"erase{j}_{c}"] for c in ("top", "left", "height", "width"))
                      for j in range(int(v.get("erase_count", 0))))
        return cls(v["top"], v["left"], v["height"], v["width"], v["flip"] >= 0.5, tuple(ops), jitter, erase,
                   int(v.get("erase_seed", 0)))


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
    rand_augment: Annotated[Optional[str], Field(
        description="RandAugment as a timm string, e.g. `rand-m9-mstd0.5-inc1` (a fractional magnitude such as "
                    "`m8.75` is accepted); null: none. Each slot's op, magnitude, sign and outcome are stored")] = None
    color_jitter: Annotated[Optional[Union[Annotated[float, Strict(), Field(ge=0)], tuple[float, float, float],
                                            tuple[float, float, float, float]]], Field(
        description="colour jitter strength as timm's `color_jitter` (s → brightness, contrast, saturation s; or "
                    "[b, c, s] / [b, c, s, hue]); null: none. The order and factors are stored")] = None
    erasing: Annotated[float, Strict(), Field(ge=0, le=1), Field(
        description="random-erasing probability (timm's `re_prob`; applied after normalisation); 0: none")] = 0.0
    erasing_mode: Annotated[Literal["pixel", "rand", "const"], Field(
        description="erasing fill: `pixel` N(0, 1) per pixel, `rand` per channel, `const` 0 (timm's `re_mode`)")] = "pixel"
    erasing_count: Annotated[int, Strict(), Field(ge=1, le=8), Field(
        description="at most this many boxes per view (timm's `re_count`; 1 to n drawn when above 1)")] = 1
    erasing_area: Annotated[tuple[Annotated[float, Strict()], Annotated[float, Strict()]], Field(
        description="an erasing box's area range as fractions of the input")] = (0.02, 1 / 3)
    erasing_ratio: Annotated[tuple[Annotated[float, Strict()], Annotated[float, Strict()]], Field(
        description="an erasing box's aspect-ratio range")] = (0.3, 1 / 0.3)

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"views.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"views.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.rand_augment is not None:
            augment.rand_augment_table(self.rand_augment)  # refused here, by name, if timm cannot parse it
        if not (0 < self.erasing_area[0] <= self.erasing_area[1] < 1) or not (0 < self.erasing_ratio[0] <= self.erasing_ratio[1]):
            raise ValueError(f"views.erasing_area must satisfy 0 < lo <= hi < 1 and views.erasing_ratio 0 < lo <= hi, "
                             f"got {self.erasing_area} and {self.erasing_ratio}")

    _AUGMENTS = ("rand_augment", "color_jitter", "erasing", "erasing_mode", "erasing_count", "erasing_area",
                 "erasing_ratio")

    def to_dict(self) -> dict:
        # The augmentations appear only when on, so a crop-and-flip cache's manifest is what it always was.
        d = asdict(self)
        if not self.rand_augment:
            d.pop("rand_augment")
        if not self.color_jitter:
            d.pop("color_jitter")
        if not self.erasing:
            for k in self._AUGMENTS[2:]:
                d.pop(k)
        return d | {"convention": "crop box (top, left, height, width) as fractions of the original image, resize "
                                  "to the model's input size, horizontal flip, RandAugment, colour jitter; after "
                                  "normalisation random erasing (pipeline/views.py, pipeline/augment.py)"}

    @classmethod
    def from_manifest(cls, views: dict) -> "ViewConfig":
        """The configuration a cache's manifest records (``views``)."""
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in views.items()
                 if k in cls.__dataclass_fields__}
        return cls(**known)


def view_fields(cfg: ViewConfig) -> tuple[str, ...]:
    """The columns of a view row for this configuration (the manifest's ``views.fields``)."""
    fields = list(VIEW_FIELDS)
    if cfg.rand_augment:
        for i in range(augment.rand_augment_table(cfg.rand_augment).num_layers):
            fields += [f"ra{i}_op", f"ra{i}_magnitude", f"ra{i}_sign", f"ra{i}_applied"]
    if cfg.color_jitter:
        fields += _JITTER_FIELDS
    if cfg.erasing:
        fields += ["erase_seed", "erase_count"]
        for j in range(cfg.erasing_count):
            fields += [f"erase{j}_{c}" for c in ("top", "left", "height", "width")]
    return tuple(fields)


def _rng(seed: int, key: str) -> np.random.Generator:
    # Seeded by the sample's key, not its position, so adding images changes no other image's views.
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def sample_views(key: str, image_size: tuple[int, int], cfg: ViewConfig,
                 input_size: tuple[int, int] = (224, 224)) -> list[ViewParams]:
    """K views of one image. image_size: (width, height) of the original; input_size: the teacher's
    (H, W), the pixel grid erasing boxes are drawn on."""
    width, height = image_size
    table = augment.rand_augment_table(cfg.rand_augment) if cfg.rand_augment else None
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
        # Each op draws only when it is on, so a crop-and-flip view is what it always was.
        ops = augment.sample_rand_augment(rng, table) if table else ()
        jitter = augment.sample_color_jitter(rng, cfg.color_jitter) if cfg.color_jitter else None
        seed, erase = (augment.sample_erasing(rng, input_size, cfg.erasing, cfg.erasing_area, cfg.erasing_ratio,
                                              cfg.erasing_count) if cfg.erasing else (0, ()))
        views.append(ViewParams(top / height, left / width, h / height, w / width, flip, ops, jitter, erase, seed))
    return views


def render_view(image: Image.Image, view: ViewParams, size: tuple[int, int], interpolation: str = "bicubic",
                rand_augment: str | None = None) -> np.ndarray:
    """The view's pixels at a model's input size, before erasing: (H, W, 3) uint8. size: (H, W);
    rand_augment: the cache's ``views.rand_augment`` string, needed when the view has RandAugment slots."""
    try:
        resample = _RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}") from None
    W, H = image.size
    box = (view.left * W, view.top * H, (view.left + view.width) * W, (view.top + view.height) * H)
    out = image.resize((size[1], size[0]), resample=resample, box=box)
    if view.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if view.ops:
        if not rand_augment:
            raise ValueError("this view has RandAugment slots but no views.rand_augment string was given to replay them")
        out = augment.apply_rand_augment(out, view.ops, augment.rand_augment_table(rand_augment), interpolation)
    if view.jitter is not None:
        out = augment.apply_color_jitter(out, view.jitter)
    return np.array(out, dtype=np.uint8)


@dataclass(frozen=True)
class Erasing:
    """The random erasing of a batch of views at one input size, ready to paste on any device after
    normalisation: rows (N, 5) int64 of (sample, top, left, height, width) pixel boxes and their fills
    (``augment.erase_fills``) flattened into one float32 tensor, in row order. Made in a loader worker
    (the fills are drawn there, on the CPU, from each view's seed), batched by ``Erasing.cat``."""

    rows: torch.Tensor
    fills: torch.Tensor
    mode: str = "pixel"

    @classmethod
    def of_views(cls, views, size: tuple[int, int], mode: str = "pixel", channels: int = 3) -> "Erasing":
        """views: (seed, relative boxes) of each sample of the batch; size: the model's (H, W)."""
        rows, fills = [], []
        for i, (seed, boxes) in enumerate(views):
            for (t, l, h, w), fill in augment.erase_fills(boxes, seed, size, mode, channels):
                rows.append((i, t, l, h, w))
                if fill is not None:
                    fills.append(fill.ravel())
        return cls(torch.tensor(rows, dtype=torch.int64).reshape(-1, 5),
                   torch.from_numpy(np.concatenate(fills) if fills else np.zeros(0, np.float32)), mode)

    @classmethod
    def of_view(cls, view: "ViewParams", size: tuple[int, int], mode: str = "pixel") -> "Erasing":
        """One view's erasing (its boxes, none or some, and their fills drawn from its seed), as sample 0."""
        return cls.of_views([(view.erase_seed, view.erase)], size, mode)

    @classmethod
    def cat(cls, parts: list["Erasing"]) -> "Erasing":
        """One batch's erasing from its samples' (each of one sample, numbered 0)."""
        rows = [p.rows + torch.tensor([i, 0, 0, 0, 0]) for i, p in enumerate(parts)]
        return cls(torch.cat(rows), torch.cat([p.fills for p in parts]), parts[0].mode)

    def pin_memory(self) -> "Erasing":  # a DataLoader's pin_memory calls it
        return Erasing(self.rows, self.fills.pin_memory(), self.mode)

    def paste(self, x: torch.Tensor) -> torch.Tensor:
        """Fill the boxes of x (B, C, H, W), normalised, in place: one copy per box, the fills moved to
        x's device once."""
        fills, at, C = self.fills.to(x.device, non_blocking=True), 0, x.shape[1]
        for i, t, l, h, w in self.rows.tolist():
            if self.mode == "const":
                x[i, :, t:t + h, l:l + w] = 0
                continue
            shape = (C, h, w) if self.mode == "pixel" else (C, 1, 1)
            n = shape[0] * shape[1] * shape[2]
            x[i, :, t:t + h, l:l + w] = fills[at:at + n].view(shape)
            at += n
        return x


def model_input(pixels: np.ndarray, view: ViewParams, mean, std, erasing_mode: str = "pixel") -> torch.Tensor:
    """A rendered view (H, W, 3) uint8 → the model's input (3, H, W) float32: normalised, then erased."""
    erasing = Erasing.of_view(view, pixels.shape[:2], erasing_mode) if view.erase else None
    return to_model_input(pixels[None], erasing, mean, std)[0]


def to_model_input(pixels: np.ndarray | torch.Tensor, erasing: Erasing | None, mean, std,
                   device: torch.device | str = "cpu", non_blocking: bool = False,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A batch of rendered views (B, H, W, 3) uint8 → the model's input (B, 3, H, W) float32 on device:
    the uint8 pixels moved there (a quarter of the float bytes), normalised there, then erased. The
    same bits on every device: (x / 255 − mean) / std as three true divisions and a subtraction."""
    x = normalize(_tensor(pixels).to(device, non_blocking=non_blocking), mean, std, memory_format)
    return erasing.paste(x) if erasing is not None and len(erasing.rows) else x


def _tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(pixels, np.ndarray):  # a read-only array (a Ray block's) is copied: torch wants writable memory
        return torch.from_numpy(np.ascontiguousarray(pixels) if pixels.flags.writeable else pixels.copy())
    return pixels


def normalize(pixels: np.ndarray | torch.Tensor, mean, std,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (H, W, 3) → float32 (B, 3, H, W) or (3, H, W), (x/255 − mean)/std, on the
    pixels' device. memory_format=torch.channels_last (batches): laid out as the pixels are, no copy."""
    x = _tensor(pixels)
    # uint8 made channels-first (contiguous, or channels-last as stored) before the float conversion, then the
    # same three operations in place, 2.5× faster than on permuted floats. The constants are tensors on x's
    # device: CUDA would multiply by the reciprocal of a Python scalar divisor (other bits than the CPU's).
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)
    x = x.contiguous(memory_format=memory_format).float() if x.ndim == 4 else x.contiguous().float()
    shape = (1, 3, 1, 1) if x.ndim == 4 else (3, 1, 1)
    c = _constants(x.device, tuple(map(float, mean)), tuple(map(float, std)))
    return x.div_(c[:1]).sub_(c[1:4].view(shape)).div_(c[4:].view(shape))


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device, mean: tuple, std: tuple) -> torch.Tensor:
    """255, mean and std as one float32 tensor on device, made once (not a host-to-device copy per batch)."""
    return torch.tensor([255.0, *mean, *std], dtype=torch.float32).to(device)


@dataclass(frozen=True)
class Replay:
    """How a cache's stored view rows are replayed: its columns and its augmentations (the manifest's
    ``views``); the one path from a stored row to a model's input, for the teacher and the student alike."""

    config: ViewConfig
    fields: tuple[str, ...]

    @classmethod
    def from_manifest(cls, views: dict) -> "Replay":
        return cls(ViewConfig.from_manifest(views), tuple(views.get("fields") or VIEW_FIELDS))

    def view(self, row) -> ViewParams:
        return ViewParams.from_array(row, self.fields)

    def pixels(self, image: Image.Image, view: ViewParams, size: tuple[int, int], interpolation: str) -> np.ndarray:
        return render_view(image, view, size, interpolation, self.config.rand_augment)

    def model_input(self, pixels: np.ndarray, view: ViewParams, mean, std) -> torch.Tensor:
        return model_input(pixels, view, mean, std, self.config.erasing_mode)


def fingerprint(pixels: np.ndarray, view: ViewParams | None = None) -> str:
    """A short hash of a view's input, to verify a replay: its uint8 pixels and, for an erased view, its
    pixel boxes and fill seed (the fill is a function of those), so the hash fixes the model's input."""
    h = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    if view is not None and view.erase:
        boxes = augment.erase_boxes(view.erase, tuple(pixels.shape[:2]))
        h.update(np.array([view.erase_seed, *np.ravel(boxes)], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
