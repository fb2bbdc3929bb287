"""A recipe's optimisation as the trainer runs it: the optimizer over the student and the CAPs, the
per-iteration schedule, the gradient clip, the task loss and the student's moving average.

    rec (pipeline/recipes.py) + distiller + steps per epoch → Optimization

Everything comes from timm: ``param_groups_weight_decay`` (the no-decay rule), ``create_optimizer_v2``,
``create_scheduler_v2`` stepped every iteration, ``ModelEmaV3``; the task losses are scalekd/losses.py's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import timm.optim
import timm.scheduler
import timm.utils
import torch
from torch import nn

from scalekd.losses import TASK_LOSSES, task_loss

from .late import CacheMismatchError

__all__ = ["Optimization", "build_optimization", "no_decay_names", "check_views"]


@dataclass
class Optimization:
    trainable: nn.ModuleDict  # {"student", "caps"}: what the optimizer holds and the checkpoint saves
    optimizer: torch.optim.Optimizer
    scheduler: timm.scheduler.scheduler.Scheduler
    grad_clip: Optional[float]  # the global gradient-norm clip before the step (None: none)
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # what the distiller's L_task computes
    ema: Optional[timm.utils.ModelEmaV3]  # of the student's timm model; None when the recipe has none


def _param_groups(trainable: nn.Module, rec: dict) -> list[dict]:
    # timm's own grouping (1-D parameters and biases, plus fnmatch patterns), called directly: through
    # create_optimizer_v2 it would take the patterns from the top module's no_weight_decay(), which the
    # {student, caps} container has not, and it cannot keep 1-D parameters decayed while sparing names (ML).
    # The release's rule is a substring match on the full name ("*pos_embed*" also spares the CAPs' pos_embed).
    return timm.optim.param_groups_weight_decay(trainable, rec["weight_decay"],
                                                weight_decay_exclude_1d=rec["no_decay_1d"],
                                                no_weight_decay_list=[f"*{n}*" for n in rec["no_decay_names"]])


def no_decay_names(trainable: nn.Module, rec: dict) -> set[str]:
    """The names of the parameters the recipe leaves without weight decay."""
    spared = {id(p) for g in _param_groups(trainable, rec) if g["weight_decay"] == 0 for p in g["params"]}
    return {n for n, p in trainable.named_parameters() if id(p) in spared}


def build_optimization(rec: dict, distiller: nn.Module, steps_per_epoch: int) -> Optimization:
    """The optimizer, schedule, clip, task loss and EMA of recipe rec for a ScaleKDDistiller whose student
    and CAPs are trained; the scheduler counts optimizer steps (step_update(n) after the n-th)."""
    if rec["task_loss"] not in TASK_LOSSES:
        raise ValueError(f"unknown task loss {rec['task_loss']!r}; expected one of {sorted(TASK_LOSSES)}")
    trainable = nn.ModuleDict({"student": distiller.student, "caps": distiller.caps})
    own = {k: rec[k] for k in ("eps", "max_grad_norm") if rec.get(k) is not None}
    if rec.get("betas") is not None:
        own["betas"] = tuple(rec["betas"])  # a list in the recipe (YAML and JSON have no tuple)
    if rec.get("momentum") is not None:
        own["momentum"] = rec["momentum"]
    optimizer = timm.optim.create_optimizer_v2(_param_groups(trainable, rec), opt=rec["opt"], lr=rec["lr"],
                                               weight_decay=rec["weight_decay"], **own)
    scheduler = _schedule(rec, optimizer, steps_per_epoch)
    # The release averages parameters and copies buffers (mmengine's EMA, update_buffers false): exclude_buffers.
    ema = timm.utils.ModelEmaV3(distiller.student.model, decay=rec["ema_decay"], exclude_buffers=True) \
        if rec.get("ema") else None
    return Optimization(trainable, optimizer, scheduler, rec.get("grad_clip") or None,
                        functools.partial(task_loss, rec["task_loss"]), ema)


def _schedule(rec: dict, optimizer, steps_per_epoch: int):
    """timm's scheduler for the recipe, stepped per iteration: step_update(n) sets the lr of step n (0-based)."""
    if rec["sched"] == "multistep" and not rec.get("warmup_epochs"):
        # timm's multistep decays one update early (its milestone m applies at t = m - 1, kept on purpose
        # upstream); the release's MultiStepLR decays at the first step of the milestone epoch, hence + 1.
        return timm.scheduler.MultiStepLRScheduler(
            optimizer, decay_t=[m * steps_per_epoch + 1 for m in rec["decay_milestones"]],
            decay_rate=rec["decay_rate"], t_in_epochs=False)
    warmup = rec.get("warmup_epochs") or 0
    prefix = rec.get("warmup_prefix", True)
    # warmup_prefix: the schedule proper spans the epochs after the warm-up (the release's LinearLR over
    # epochs [0, w) then CosineAnnealingLR over [w, E)), so num_epochs is what follows the warm-up
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=rec["sched"], num_epochs=rec["epochs"] - warmup if prefix else rec["epochs"],
        warmup_epochs=warmup, warmup_lr=rec["lr"] * rec.get("warmup_factor", 1.0), warmup_prefix=prefix,
        min_lr=rec.get("min_lr") or 0.0, decay_milestones=rec.get("decay_milestones") or (90, 180, 270),
        decay_rate=rec.get("decay_rate") or 0.1, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


def check_views(recipe_name: str, rec: dict, cache, manifest: dict) -> None:
    """Refuse a cache whose stored views were not made with the recipe's augmentation. A cache made before
    views recorded RandAugment and erasing has neither key: no RandAugment, no erasing."""
    views = manifest.get("views") or {}
    have = {"rand_augment": views.get("rand_augment"), "erasing": float(views.get("erasing") or 0.0)}
    want = {"rand_augment": rec["views"]["rand_augment"], "erasing": float(rec["views"]["erasing"])}
    if have != want:
        raise CacheMismatchError(f"recipe {recipe_name!r} trains on views with rand_augment {want['rand_augment']!r} and "
                         f"erasing {want['erasing']}, but cache {cache} holds views with rand_augment "
                         f"{have['rand_augment']!r} and erasing {have['erasing']} (its manifest.json 'views'); make "
                         f"a cache with the recipe's views, choose a recipe whose views are the cache's, or set "
                         f"check_views: false in the distill section to train on this cache anyway")
