"""The teacher's ``late`` part ALONE, for training from a cache.

The model is built on the meta device (no memory), its early modules are removed, and only then
is memory allocated and filled with late's weights read from the checkpoint the cache was made
from. From a safetensors file only late's tensors are read at all; a torch file is read whole
(weights_only=True) and the early tensors are dropped at once. Teachers whose late part owns
non-persistent buffers computed at construction (Swin's relative-position index and attention
masks, EVA's rotary tables) cannot be materialised from the meta device, so those are built on
the CPU with random weights and cut before any checkpoint value is loaded. Hub weights
(pretrained=True without a file) come whole from timm and are cut after loading. A cache of a
random-weight teacher (tests, benchmarks) records its seed, and late is rebuilt from it.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from scalekd.teacher import TeacherLate, split_teacher

from .weights import file_sha256, read_state_dict

__all__ = ["build_late", "CacheMismatchError", "check_teacher_matches"]


class CacheMismatchError(ValueError):
    """The cache was made by another teacher, checkpoint, split or preprocessing than this run asks for."""


def check_teacher_matches(cached: dict, wanted: dict, cache_path) -> None:
    """Refuse a cache whose teacher differs from the run's in any value the targets depend on."""
    for key in ("name", "checkpoint_sha256", "split_point", "late_blocks", "input_size", "mean", "std", "interpolation",
                "precision"):
        if key in wanted and wanted[key] is not None:
            # a manifest from before teacher.precision existed was made in fp32
            a, b = cached.get(key, "fp32" if key == "precision" else None), wanted[key]
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                raise CacheMismatchError(f"cache {cache_path} was made with teacher {key} = {a!r}, but this run "
                                         f"asks for {key} = {b!r}; make a cache for this teacher or drop the setting")


def _has_constructed_buffers(module: torch.nn.Module) -> bool:
    persistent = set(module.state_dict())
    return any(name not in persistent for name, _ in module.named_buffers())


def build_late(teacher: dict, device: str | torch.device = "cpu") -> TeacherLate:
    """teacher: the manifest's teacher entry. Returns the frozen late part with only late's weights."""
    name, kwargs = teacher["name"], teacher.get("kwargs", {}) or {}
    late_blocks = teacher.get("late_blocks") or 2
    ckpt = teacher.get("checkpoint")
    if ckpt:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"teacher checkpoint {ckpt} (recorded in the cache's manifest) does not exist; "
                                    f"the trainer loads late's weights from it")
        sha = file_sha256(ckpt)
        if teacher.get("checkpoint_sha256") and sha != teacher["checkpoint_sha256"]:
            raise CacheMismatchError(f"teacher checkpoint {ckpt} has sha256 {sha}, but the cache was made from "
                                     f"sha256 {teacher['checkpoint_sha256']}")
    random_seed = None if ckpt or teacher.get("pretrained") else (teacher.get("seed") or 0)

    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    split = split_teacher(model, name, late_blocks=late_blocks)
    check_teacher_matches(teacher, {k: v for k, v in split.info.to_dict().items()
                                    if k in ("split_point", "input_size", "final_hw")}, "(manifest)")
    late = split.drop_early()
    if _has_constructed_buffers(late.model) or not ckpt:
        # see the module docstring: constructed buffers need a real construction
        if random_seed is not None:  # a random-weight teacher (tests, benchmarks): the cache's own seed
            torch.manual_seed(random_seed)
        model = timm.create_model(name, pretrained=bool(teacher.get("pretrained")) and not ckpt, **kwargs)
        split = split_teacher(model, name, late_blocks=late_blocks)
        late = split.drop_early()
    else:
        late.model.to_empty(device="cpu")
    if ckpt:
        keys = list(late.model.state_dict())
        if str(ckpt).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(ckpt), framework="pt") as f:
                missing = [k for k in keys if k not in f.keys()]
                if missing:
                    raise CacheMismatchError(f"teacher checkpoint {ckpt} lacks late weights {missing[:5]}")
                sd = {k: f.get_tensor(k) for k in keys}
        else:
            full = read_state_dict(ckpt)
            sd = {k: full[k] for k in keys if k in full}
            del full
        late.model.load_state_dict(sd, strict=True)
    for p in late.parameters():
        p.requires_grad_(False)
    return late.to(device).eval()
