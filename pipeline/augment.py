"""RandAugment, colour jitter and random erasing with explicit, stored parameters.

timm's transforms sample inside ``__call__`` from Python's global ``random`` (RandAugment, its
magnitude noise, the sign of a level, the erasing box) or torch's (ColorJitter), so a view they
render cannot be replayed. Here every random outcome is drawn once, from the view's own seeded
numpy Generator, and stored; the pixels are then made by timm's and torchvision's own op
implementations called with those explicit parameters:

- RandAugment: timm's op table, parsed by ``timm.data.rand_augment_transform`` from the same
  ``rand-mN-nK-mstdS-incI-pP`` strings (the magnitude may also be fractional, ``m8.75``, which timm's
  parser refuses: the release's level 7 of 8 is 8.75 in timm's units of 10). Per slot we store the
  op's index in that table, its magnitude after noise and clipping, the sign of its level and
  whether it was applied (timm's per-op probability). The image is then changed by the op's
  ``aug_fn`` with the arguments its ``level_fn`` gives, the sign set from the stored one instead of
  timm's coin (``_randomly_negate``), and the model's interpolation instead of a random one.
- Colour jitter: the factor order and the four factors of torchvision's ``ColorJitter``, applied by
  ``torchvision.transforms.functional.adjust_*``.
- Random erasing (timm's ``RandomErasing`` semantics: after normalisation, boxes of area
  ``area`` × the image / count and aspect ``ratio``, filled with N(0, 1) per pixel, per channel, or 0):
  boxes in fractions of the model's input, sampled on the teacher's pixel grid, and a seed from which
  each box's fill is drawn at the size it is rendered at.

Replay at another input size (the student's) is defined as: geometric RandAugment levels are
already relative (degrees, shear factors, translation as a fraction of the side), pointwise ops do
not depend on size; an erasing box covers rows round(top·H) … round((top+height)·H) and the same
for columns; its noise is drawn from the stored seed at that box's size.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

__all__ = ["RandOp", "RandAugmentTable", "rand_augment_table", "sample_rand_augment", "apply_rand_augment",
           "sample_color_jitter", "apply_color_jitter", "sample_erasing", "erase_boxes", "erase_fills", "apply_erasing",
           "IMAGENET_FILL"]

# The release pads with [104, 116, 124] in BGR order: ImageNet's mean in RGB, as timm's img_mean.
IMAGENET_FILL = (124, 116, 104)
_PIL = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class RandOp:
    """One RandAugment slot: the op's index in the table, its magnitude, its level's sign, applied or not."""

    op: int
    magnitude: float
    sign: int
    applied: bool


@dataclass(frozen=True)
class RandAugmentTable:
    """timm's parsed RandAugment: its ops (AugmentOp), layers per image, choice weights, magnitude settings."""

    config: str
    ops: tuple
    num_layers: int
    choice_weights: tuple | None
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    prob: float


@lru_cache(maxsize=1)
def _negation_bases() -> dict:
    # timm negates a level with probability 1/2 inside these level functions; the value negated is
    # (level − base) for each. Keyed by function so a timm that renames them fails loudly here.
    from timm.data import auto_augment as aa

    return {aa._rotate_level_to_arg: 0.0, aa._shear_level_to_arg: 0.0, aa._translate_abs_level_to_arg: 0.0,
            aa._translate_rel_level_to_arg: 0.0, aa._enhance_increasing_level_to_arg: 1.0}


@lru_cache(maxsize=16)
def rand_augment_table(config: str) -> RandAugmentTable:
    """timm's RandAugment for a config string such as ``rand-m9-mstd0.5-inc1``."""
    from timm.data import rand_augment_transform
    from timm.data.auto_augment import _LEVEL_DENOM

    if not isinstance(config, str) or not config.startswith("rand"):
        raise ValueError(f"views.rand_augment must be a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', "
                         f"got {config!r}")
    parts = config.split("-")
    magnitude = None
    for i, part in enumerate(parts[1:], 1):
        m = re.fullmatch(r"m(\d+(?:\.\d+)?)", part)
        if m:  # timm parses an int; a fractional magnitude is set on the ops below
            magnitude = float(m.group(1))
            parts[i] = f"m{int(magnitude)}"
    try:
        ra = rand_augment_transform("-".join(parts), {"img_mean": IMAGENET_FILL, "translate_const": 100})
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(f"views.rand_augment {config!r} is not a RandAugment string timm parses ({e})") from None
    first = ra.ops[0]
    return RandAugmentTable(config=config, ops=tuple(ra.ops), num_layers=int(ra.num_layers),
                            choice_weights=None if ra.choice_weights is None else tuple(map(float, ra.choice_weights)),
                            magnitude=float(first.magnitude if magnitude is None else magnitude),
                            magnitude_std=float(first.magnitude_std), prob=float(first.prob),
                            magnitude_max=float(first.magnitude_max or _LEVEL_DENOM))


def sample_rand_augment(rng: np.random.Generator, table: RandAugmentTable) -> tuple[RandOp, ...]:
    """num_layers slots drawn as timm's RandAugment draws them (ops with replacement unless weighted)."""
    n = len(table.ops)
    if table.choice_weights is None:
        picks = rng.integers(0, n, size=table.num_layers)
    else:
        picks = rng.choice(n, size=table.num_layers, replace=False, p=np.asarray(table.choice_weights))
    slots = []
    for op in picks:
        applied = bool(rng.random() <= table.prob)
        m = table.magnitude
        if table.magnitude_std == math.inf:
            m = float(rng.uniform(0, m))
        elif table.magnitude_std > 0:
            m = float(rng.normal(m, table.magnitude_std))
        m = max(0.0, min(m, table.magnitude_max))
        sign = -1 if rng.random() > 0.5 else 1
        slots.append(RandOp(int(op), m, sign, applied))
    return tuple(slots)


def _level_args(op, magnitude: float, sign: int) -> tuple:
    if op.level_fn is None:
        return ()
    args = op.level_fn(magnitude, op.hparams)
    base = _negation_bases().get(op.level_fn)
    if base is None:
        return args
    # timm's coin may have negated (level − base); put the stored sign on its magnitude instead
    return tuple(base + sign * abs(a - base) for a in args)


def apply_rand_augment(image: Image.Image, slots, table: RandAugmentTable, interpolation: str) -> Image.Image:
    """The slots' ops on a PIL image, in order, with timm's op functions."""
    for s in slots:
        if not s.applied:
            continue
        op = table.ops[s.op]
        args = _level_args(op, s.magnitude, s.sign)
        if op.name.startswith("Posterize") and args[0] < 1:
            # PosterizeIncreasing keeps 0 bits above magnitude 7.5: Pillow (>= 10) refuses 0, older
            # Pillow (and TF's RandAugment) gave a black image, which is what 0 bits means
            image = Image.new(image.mode, image.size)
            continue
        image = op.aug_fn(image, *args, **dict(op.kwargs, resample=_PIL[interpolation]))
    return image


# --------------------------------------------------------------------------- colour jitter


def _jitter_ranges(strength) -> list[tuple[float, float]]:
    # timm: a float s → (s, s, s); torchvision's ranges: 1 ± s for brightness/contrast/saturation, ±h for hue
    s = (float(strength),) * 3 if isinstance(strength, (int, float)) else tuple(map(float, strength))
    s = s + (0.0,) * (4 - len(s))
    return [(max(0.0, 1 - v), 1 + v) for v in s[:3]] + [(-s[3], s[3])]


def sample_color_jitter(rng: np.random.Generator, strength) -> tuple[float, ...]:
    """(order of the 4 adjustments, brightness, contrast, saturation, hue), as ColorJitter.get_params."""
    order = rng.permutation(4)
    factors = [float(rng.uniform(lo, hi)) for lo, hi in _jitter_ranges(strength)]
    return tuple(float(o) for o in order) + tuple(factors)


def apply_color_jitter(image: Image.Image, jitter) -> Image.Image:
    from torchvision.transforms import functional as F

    order, factors = [int(o) for o in jitter[:4]], jitter[4:]
    fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    neutral = (1.0, 1.0, 1.0, 0.0)
    for i in order:
        if factors[i] != neutral[i]:
            image = fns[i](image, factors[i])
    return image


# --------------------------------------------------------------------------- random erasing


def sample_erasing(rng: np.random.Generator, size: tuple[int, int], prob: float, area, ratio, count: int):
    """(seed, boxes) for one view: boxes as (top, left, height, width) fractions of the input, drawn on
    the (H, W) pixel grid as timm's RandomErasing draws them; no boxes when the coin says no."""
    seed = int(rng.integers(0, 2**31))
    if prob <= 0 or rng.random() > prob:
        return seed, ()
    H, W = size
    n = count if count == 1 else int(rng.integers(1, count + 1))
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = []
    for _ in range(n):
        for _attempt in range(10):
            target = rng.uniform(*area) * H * W / n
            aspect = math.exp(rng.uniform(*log_ratio))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < W and h < H:
                top = int(rng.integers(0, H - h + 1))
                left = int(rng.integers(0, W - w + 1))
                boxes.append((top / H, left / W, h / H, w / W))
                break
    return seed, tuple(boxes)


def erase_boxes(boxes, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (top, left, h, w) of relative boxes at input size (H, W)."""
    H, W = size
    out = []
    for top, left, height, width in boxes:
        t, l = int(round(top * H)), int(round(left * W))
        b, r = int(round((top + height) * H)), int(round((left + width) * W))
        t, l = min(max(t, 0), H - 1), min(max(l, 0), W - 1)
        out.append((t, l, max(1, min(b, H) - t), max(1, min(r, W) - l)))
    return out


def erase_fills(boxes, seed: int, size: tuple[int, int], mode: str = "pixel", channels: int = 3):
    """Each box's pixel box (top, left, h, w) at input size (H, W) with its fill (timm's modes: ``pixel``
    N(0, 1) per pixel, (C, h, w); ``rand`` N(0, 1) per channel, (C, 1, 1); ``const`` None, a fill of 0),
    the noise drawn from seed and the box index at this size."""
    shapes = {"pixel": lambda h, w: (channels, h, w), "rand": lambda h, w: (channels, 1, 1), "const": None}
    if mode not in shapes:
        raise ValueError(f"unknown erasing mode {mode!r}; expected one of {sorted(shapes)}")
    return [((t, l, h, w), None if shapes[mode] is None
             else np.random.default_rng([seed, j]).standard_normal(shapes[mode](h, w), dtype=np.float32))
            for j, (t, l, h, w) in enumerate(erase_boxes(boxes, size))]


def apply_erasing(x: torch.Tensor, boxes, seed: int, mode: str = "pixel") -> torch.Tensor:
    """x: a normalised (3, H, W) float tensor → a copy with the boxes filled (``erase_fills``)."""
    if not boxes:
        return x
    x = x.clone()
    for (t, l, h, w), fill in erase_fills(boxes, seed, tuple(x.shape[-2:]), mode, x.shape[0]):
        x[:, t:t + h, l:l + w] = 0 if fill is None else torch.from_numpy(fill).to(x.dtype)
    return x
