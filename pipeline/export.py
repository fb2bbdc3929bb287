"""The trained student as a timm model folder (timm's own ``save_for_hf`` layout).

    student/config.json         architecture, model_args, num_classes and a pretrained_cfg holding the
                                input size, interpolation, mean/std and crop_pct the student was
                                trained and evaluated with
    student/model.safetensors   its weights

Plain timm (no project code) loads it with ``timm.create_model("local-dir:student", pretrained=True)``
and ``timm.data.resolve_data_config(model=m)`` gives back that preprocessing. A student whose name
only this project registers (scalekd/student.py) is written under the timm name and model args that
rebuild it (``vit_base_patch14_224`` → ``vit_base_patch16_224`` with ``patch_size=14``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from scalekd.student import PLAIN_TIMM_EQUIVALENT

__all__ = ["export_timm_folder", "eval_data_config", "readable"]


def eval_data_config(model: nn.Module, input_size=None) -> dict:
    """timm's eval preprocessing of the student at input_size (3, H, W): what the trainer evaluates with
    (pipeline.trainer.evaluate) and what the exported pretrained_cfg records."""
    from timm.data import resolve_data_config

    args = {"input_size": tuple(input_size)} if input_size else {}
    return resolve_data_config(args, model=model)


def readable(path: Path) -> None:
    """Normal permissions (0644 under the usual umask): safetensors creates its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


EXPORT_FILES = ("config.json", "model.safetensors")  # what save_for_hf writes here (safetensors on)


def remove_export(folder: Path) -> bool:
    """Remove an earlier export's own files and, if nothing else is there, the folder; True when gone.
    Anything else in it is the user's and is kept."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    for name in EXPORT_FILES:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def export_timm_folder(model: nn.Module, folder: str | Path, input_size=None) -> dict:
    """Write ``model`` (a timm classifier) as a timm model folder; returns {folder, architecture, plain_timm}.

    input_size: (3, H, W) the student ran at (default: its pretrained_cfg's). plain_timm is False when
    no timm name rebuilds the model (e.g. Mixer-B/14: every timm Mixer entrypoint fixes its patch size);
    the folder then names this project's architecture, which ``import scalekd.student`` registers.
    """
    from timm.models import save_for_hf

    folder = Path(folder)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    model_config, model_args, plain = {}, {}, True
    if arch in PLAIN_TIMM_EQUIVALENT:
        timm_name, args = PLAIN_TIMM_EQUIVALENT[arch]
        if timm_name is None:
            plain = False
        else:
            # the arguments this model was built with win over the family's (e.g. a test's depth=2)
            model_config = {"architecture": timm_name}
            model_args = dict(args) | {k: v for k, v in getattr(model, "_model_args", {}).items() if k in args}
            arch = timm_name
    data_config = eval_data_config(model, input_size)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists() and not remove_export(tmp):  # a killed export's leftovers go; anything else is the user's
        raise FileExistsError(f"{tmp} holds files this export did not write "
                              f"({sorted(p.name for p in tmp.iterdir())[:3]}); move them away and export again")
    save_for_hf(model, str(tmp), model_config=model_config, model_args=model_args, safe_serialization=True,
                data_config=data_config)
    for f in tmp.iterdir():
        readable(f)
    if folder.exists() and not remove_export(folder):
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{folder} holds files this export did not write "
                              f"({sorted(p.name for p in folder.iterdir())[:3]}); move them away and export again")
    os.replace(tmp, folder)
    return {"folder": str(folder), "architecture": arch, "plain_timm": plain}
