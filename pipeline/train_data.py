"""The trainer's loader: one stored view per image and epoch, replayed for the student.

For epoch e every image uses its view e mod K (so an epoch reads only that view of the cache,
and in the webdataset store only the v{e mod K}.tar files). The student sees the stored crop box
and flip replayed on the original image at the student's own input size, interpolation and
normalisation (RandAugment, jitter and erasing replayed from their stored parameters); the targets
are that view's stored teacher outputs. With ``targets="online"`` the
item carries the teacher's own rendering of the view instead, for the live teacher.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler, default_collate

from .datasets import BadImage, SampleRef, load_image
from .reader import CacheReader
from .schema import ManifestError
from .views import Erasing, Replay, fingerprint, to_model_input

__all__ = ["ModelInput", "ViewDataset", "ReplayError", "collate_skipping", "EpochOrder"]


class ReplayError(RuntimeError):
    """A replayed view's teacher pixels do not match the fingerprint stored at caching time."""


@dataclass(frozen=True)
class ModelInput:
    """How one model wants its pixels: (H, W), interpolation, mean, std."""

    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


class ViewDataset(Dataset):
    """Items: image (H, W, 3) uint8 for the student, label, and the view's targets (final (N, C), logits)
    from the cache, or teacher_image (Ht, Wt, 3) uint8 when targets='online'; with erasing, each image's
    boxes and fills (``image_erasing``, an Erasing). ``to_device`` makes a batch's model input."""

    def __init__(self, reader: CacheReader, student: ModelInput, teacher: ModelInput, targets: str = "cache",
                 verify_fingerprints: bool = False, on_corrupt: str = "stop"):
        if targets not in ("cache", "online"):
            raise ValueError(f"targets must be 'cache' or 'online', got {targets!r}")
        if on_corrupt not in ("stop", "skip"):
            raise ValueError(f"on_corrupt must be 'stop' or 'skip', got {on_corrupt!r}")
        self.reader, self.student, self.teacher = reader, student, teacher
        self.targets, self.verify, self.on_corrupt = targets, verify_fingerprints, on_corrupt
        self.epoch = 0
        # the cache's view columns and augmentations, replayed for the student (and the live teacher)
        self.replay = Replay.from_manifest(reader.manifest["views"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_of(self, epoch: int) -> int:
        return epoch % self.reader.num_views

    def __len__(self) -> int:
        return len(self.reader)

    def _shipped(self, key: str, pixels, params, size: tuple[int, int]) -> dict:
        # uint8 (H, W, 3) as rendered, normalised and erased on the trainer's device (to_device): a quarter of
        # the bytes to collate and copy, and none of the float arithmetic in the worker
        out = {key: torch.from_numpy(pixels)}
        if self.replay.config.erasing:  # every item of an erasing cache carries its boxes, none or some
            out[f"{key}_erasing"] = Erasing.of_view(params, size, self.replay.config.erasing_mode)
        return out

    def to_device(self, batch: dict, key: str, device, non_blocking: bool = False,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """A collated batch's ``image`` (the student's) or ``teacher_image`` → the model's input (B, 3, H, W)
        float32 on device: normalised, then erased, there."""
        model = self.student if key == "image" else self.teacher
        return to_model_input(batch[key], batch.get(f"{key}_erasing"), model.mean, model.std, device,
                              non_blocking, memory_format)

    def __getitem__(self, i: int):
        # An index past the end carries its epoch (EpochOrder): a persistent worker's copy of this
        # dataset never sees set_epoch, so the epoch, and with it the view, travels with the index.
        epoch, i = divmod(i, len(self)) if i >= len(self) else (self.epoch, i)
        s = self.reader[i]
        view = self.view_of(epoch)
        try:
            image = load_image(SampleRef.from_sample(s))
            replay, st = self.replay, self.student
            params = replay.view(s["views"][view])
            item = {**self._shipped("image", replay.pixels(image, params, st.size, st.interpolation), params, st.size),
                    "label": torch.tensor(s["label"]), "index": torch.tensor(i), "view": torch.tensor(view)}
            if self.verify or self.targets == "online":
                t = self.teacher
                pixels = replay.pixels(image, params, t.size, t.interpolation)
                if self.verify and fingerprint(pixels, params) != s["fingerprints"][view]:
                    raise ReplayError(f"sample {s['key']!r} view {view}: the replayed teacher input does not match "
                                      f"the fingerprint stored in {s['shard']} (the image changed since caching?)")
                if self.targets == "online":  # the fills drawn only for an input that is shipped
                    item |= self._shipped("teacher_image", pixels, params, t.size)
            if self.targets == "cache":
                # as stored (fp16 by default): the trainer converts them to float32 on its device, exactly
                stored = self.reader.read(i, view, ["final", "logits"], dtype=None)
                item["final"] = torch.from_numpy(stored["final"])
                item["logits"] = torch.from_numpy(stored["logits"])
            return item
        except (ManifestError, BadImage, ReplayError) as e:
            if self.on_corrupt == "skip":
                return None
            raise type(e)(f"{e} [shard {s['shard']}, sample {s['key']!r}]") from None


class EpochOrder(Sampler[int]):
    """Each epoch's shuffled order of n samples (torch.randperm seeded by seed and epoch), yielded as
    epoch · n + i, so that a DataLoader's persistent workers read the right epoch's view."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter((torch.randperm(self.n, generator=g) + self.epoch * self.n).tolist())

    def __len__(self) -> int:
        return self.n


def collate_skipping(items):
    """default_collate without the items a skipping dataset dropped (None)."""
    kept = [it for it in items if it is not None]
    if not kept:
        return None
    erasing = {k: Erasing.cat([it.pop(k) for it in kept]) for k in list(kept[0]) if isinstance(kept[0][k], Erasing)}
    return default_collate(kept) | erasing
