"""A teacher's split without its weights: built on the meta device, so even Swin-L answers in about a
second (random initialisation of its 197 M parameters took 35 s). Used by ``teacher-info`` and by the
caching job's spec-time checks (pipeline.cache_job.teacher_info_for)."""
from __future__ import annotations

from pathlib import Path

import torch

from scalekd.teacher import TeacherSplit, split_teacher, teacher_family

from .pitfalls import no_head_message

__all__ = ["meta_split", "describe_teacher"]


def meta_split(name: str, late_blocks: int = 2, **model_kwargs) -> TeacherSplit:
    """The teacher split of timm model ``name`` with every tensor on the meta device (shapes, no values)."""
    teacher_family(name)  # an unsupported name fails before anything is built
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, **model_kwargs)
    return split_teacher(model, name, late_blocks=late_blocks)


def _check_fits(split: TeacherSplit, checkpoint: Path, name: str) -> str:
    """The checkpoint's sha256, after checking its keys and shapes against the model (no weights loaded into it)."""
    from .weights import file_sha256, read_state_dict

    sd = read_state_dict(checkpoint)
    want = {k: tuple(v.shape) for k, v in split.model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise ValueError(f"teacher checkpoint {checkpoint} does not fit {name}: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)}, model {want[k]}" for k in want if tuple(sd[k].shape) != want[k]]
    if wrong:
        raise ValueError(f"teacher checkpoint {checkpoint} does not fit {name}: {'; '.join(wrong[:3])}")
    return file_sha256(checkpoint)


def describe_teacher(name: str, checkpoint: str | Path | None = None, late_blocks: int = 2,
                     **model_kwargs) -> tuple[dict, list[str]]:
    """(the split's info, the checkpoint's sha256 and early/late parameter counts; warnings)."""
    split = meta_split(name, late_blocks=late_blocks, **model_kwargs)
    sha = _check_fits(split, Path(checkpoint), name) if checkpoint is not None else None
    info = split.info.to_dict() | {"checkpoint_sha256": sha}
    info |= {f"{part}_params": n for part, n in split.parameter_counts().items()}
    warnings = [no_head_message(name)] if split.info.num_classes == 0 else []
    return info, warnings
