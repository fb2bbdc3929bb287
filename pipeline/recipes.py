"""Training recipes by name (SCALEKD.md's release recipes, and the demo's), all overridable.

Optimisers and schedules come from timm's factories (``create_optimizer_v2``,
``create_scheduler_v2``), not hand-written ones.
"""
from __future__ import annotations

RECIPES: dict[str, dict] = {
    # ResNet-50, traditional: SGD 0.1, batch 256, 100 epochs, steps at 30/60/90, CE.
    "traditional": dict(opt="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9, batch_size=256, epochs=100,
                        sched="multistep", decay_milestones=[30, 60, 90], decay_rate=0.1, warmup_epochs=0,
                        task_loss="ce", grad_clip=None),
    # ResNet-50-D, advanced: LAMB 5e-3, wd 0.02, batch 2048, 300 epochs, 5 warmup, cosine, BCE, clip 5.
    # (The release adds RandAugment and random erasing; replayed views here are crop + flip only.)
    "advanced": dict(opt="lamb", lr=5e-3, weight_decay=0.02, batch_size=2048, epochs=300, sched="cosine",
                     warmup_epochs=5, task_loss="bce", grad_clip=5.0),
    # DeiT-B: AdamW 1e-3, wd 0.05, batch 512, 20 warmup, cosine, label smoothing 0.1, clip 5.
    "deit": dict(opt="adamw", lr=1e-3, weight_decay=0.05, batch_size=512, epochs=300, sched="cosine",
                 warmup_epochs=20, task_loss="ce_smooth", grad_clip=5.0),
    # The offline demo: a few epochs on 2 CPU cores.
    "demo": dict(opt="adamw", lr=1e-3, weight_decay=0.05, batch_size=32, epochs=6, sched="cosine",
                 warmup_epochs=1, task_loss="ce", grad_clip=5.0),
}


def recipe(name: str, **overrides) -> dict:
    """The named recipe with overrides (None = keep) applied."""
    try:
        base = dict(RECIPES[name])
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}") from None
    return base | {k: v for k, v in overrides.items() if v is not None}
