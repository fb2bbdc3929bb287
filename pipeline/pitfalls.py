"""timm pitfalls caught before any work, each as a message that says what to change.

- a teacher whose timm default has no classification head (num_classes=0: DINOv2, EVA-02 MIM
  checkpoints) would run a whole shard and then fail on the logits' shape;
- ``pretrained: true`` with no way to the weights' host would retry for about a minute and leave a
  half-made cache folder.
(A student built for one input size is handled in scalekd/student.py: it is built for the size asked.)
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["no_head_message", "check_teacher_head", "check_pretrained_reachable", "PretrainedUnreachable"]


class PretrainedUnreachable(ValueError):
    """pretrained: true, but the weights are neither in the local cache nor reachable."""


def no_head_message(name: str) -> str:
    return (f"teacher {name} has no classification head (num_classes=0 in timm's default for it), but the cache "
            f"stores the teacher's logits and the KD loss needs them: give the number of classes of the checkpoint's "
            f"head in the job spec, teacher: {{kwargs: {{num_classes: N}}}}")


def check_teacher_head(name: str, num_classes: int) -> None:
    """Refuse a teacher without a classifier (its logits would have shape (0,))."""
    if num_classes == 0:
        raise ValueError(no_head_message(name))


def _offline_by_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the URL's host opens within timeout, else why not."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"cannot connect to {parsed.hostname}: {e.strerror or type(e).__name__}"


def _source(name: str) -> tuple[str, str, bool]:
    """(what timm would download, its host URL, whether a copy is already in the local cache)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"teacher {name}: timm has no pretrained weights for this name; use checkpoint: PATH")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cached = any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
        return f"the Hugging Face Hub ({cfg.hf_hub_id})", os.environ.get("HF_ENDPOINT", "https://huggingface.co"), cached
    if cfg.url:
        from torch.hub import get_dir

        cached = (Path(get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)).is_file()
        return cfg.url, cfg.url, cached
    raise ValueError(f"teacher {name}: timm names no download for its pretrained weights; use checkpoint: PATH")


def check_pretrained_reachable(name: str, timeout: float = 2.0) -> None:
    """Fail fast, before anything is written, when timm could not get ``name``'s pretrained weights:
    not in the local cache, and HF_HUB_OFFLINE is set or the host does not answer within timeout s.
    With a network (or a cached copy) this returns and timm's own download path runs as usual."""
    what, host, cached = _source(name)
    if cached:
        return
    why = "HF_HUB_OFFLINE is set" if _offline_by_env() and "Hugging Face" in what else _reachable(host, timeout)
    if why is None:
        return
    raise PretrainedUnreachable(
        f"teacher {name}: pretrained: true downloads its weights from {what}, which is not in the local cache and "
        f"cannot be reached ({why}); nothing was written. Give the weights as a local file with checkpoint: PATH "
        f"(or seed: N instead of pretrained for random weights)")
