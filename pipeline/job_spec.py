"""Job specs: the YAML files under jobs/, parsed into one checked object."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from .schema import CODECS, ROLES
from .views import ViewConfig

__all__ = ["CacheSpec", "load_cache_spec", "work_dir"]


def work_dir() -> Path:
    """Where local runs keep their scratch (Ray's temp files, exported demo weights): $SCALEKD_WORK or ./.work."""
    return Path(os.environ.get("SCALEKD_WORK", ".work")).resolve()


@dataclass
class CacheSpec:
    """Everything a caching run depends on.

    dataset:  {kind: demo|imagefolder|webdataset, ...} (see pipeline.datasets.list_dataset)
    teacher:  {name, checkpoint (a file, or 'builtin:efficientnet-lite0'), pretrained, late_blocks, kwargs,
               seed: the random weights' seed when there is neither checkpoint nor pretrained (tests, benchmarks)}
    views:    K views per image and their sampling (pipeline.views.ViewConfig)
    output:   the cache folder; format: zarr | webdataset; roles: {role: codec}
    """

    name: str
    dataset: dict
    teacher: dict
    output: str
    views: ViewConfig = field(default_factory=ViewConfig)
    format: str = "zarr"
    roles: dict = field(default_factory=lambda: {"final": "fp16", "mid": "fp16", "logits": "fp16"})
    samples_per_shard: int = 64
    compression_level: int = 3
    batch_size: int = 32
    actors: int = 1
    address: str | None = None
    device: str = "auto"

    def __post_init__(self):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(self.output)):
            raise ValueError(f"output {self.output!r} is a URL; the cache must be a folder on a filesystem (shards are "
                             f"committed by renaming a folder). On a Ray cluster use a path every node mounts at "
                             f"the same place (NFS, Lustre, a FUSE mount of the bucket)")
        if self.format not in ("zarr", "webdataset"):
            raise ValueError(f"format must be 'zarr' or 'webdataset', got {self.format!r}")
        if "name" not in self.teacher:
            raise ValueError("teacher.name is required (a timm model name)")
        unknown = set(self.teacher) - {"name", "checkpoint", "pretrained", "late_blocks", "kwargs", "seed"}
        if unknown:
            raise ValueError(f"unknown teacher keys {sorted(unknown)}; expected name, checkpoint, pretrained, "
                             f"late_blocks, kwargs, seed")
        for role, codec in self.roles.items():
            if role not in ROLES:
                raise ValueError(f"roles: unknown role {role!r}; expected some of {list(ROLES)}")
            if codec not in CODECS:
                raise ValueError(f"roles.{role}: unknown codec {codec!r}; expected one of {list(CODECS)}")
        if "final" not in self.roles or "logits" not in self.roles:
            raise ValueError("roles must include 'final' and 'logits' (the distiller's targets); 'mid' is optional")
        for key in ("samples_per_shard", "batch_size", "actors"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["views"] = asdict(self.views)
        return d


def _read_section(path, section: str, cls, overrides: dict, required: bool) -> dict:
    """One section of a job YAML (or the whole file when it has no sections and the section is
    optional), with overrides (None = keep) applied and unknown keys refused by name."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"job spec {path} does not exist")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"job spec {path} is not valid YAML: {e}") from None
        if required and section not in doc:
            raise ValueError(f"job spec {path} has no '{section}:' section")
        raw = doc.get(section, doc if not required else {}) or {}
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"job spec {path}: unknown {section} key(s) {sorted(unknown)}; expected some of {sorted(known)}")
    return raw


def load_cache_spec(path: str | Path | None = None, **overrides) -> CacheSpec:
    """Read a job YAML (its ``cache`` section, or the whole file) and apply overrides (None = keep)."""
    raw = _read_section(path, "cache", CacheSpec, overrides, required=False)
    views = raw.pop("views", {}) or {}
    if isinstance(views, dict):
        bad = set(views) - {f.name for f in fields(ViewConfig)}
        if bad:
            raise ValueError(f"job spec {path}: unknown views key(s) {sorted(bad)}")
        views = ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in views.items()})
    missing = {"name", "dataset", "teacher", "output"} - set(raw)
    if missing:
        raise ValueError(f"job spec {path}: missing key(s) {sorted(missing)}")
    return CacheSpec(views=views, **raw)


def with_overrides(spec: CacheSpec, **overrides) -> CacheSpec:
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class TrainSpec:
    """Everything a distillation run depends on (the ``distill:`` section of a job YAML).

    cache: the cache folder; student: a timm name; recipe: a name from pipeline.recipes, with
    any of its keys overridable here (epochs, lr, batch_size, opt, weight_decay, sched, ...);
    loss: overrides of the loss preset (alpha, beta, softmax_scale, heads_stage3/4, ...);
    teacher: values the run expects of the cache's teacher (name, checkpoint_sha256, ...), checked.
    """

    name: str
    cache: str
    student: str
    output: str
    recipe: str = "demo"
    targets: str = "cache"
    val: dict | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    opt: str | None = None
    weight_decay: float | None = None
    sched: str | None = None
    warmup_epochs: int | None = None
    grad_clip: float | None = None
    task_loss: str | None = None
    loss: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    student_kwargs: dict = field(default_factory=dict)
    student_input_size: int | None = None
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    verify_fingerprints: bool = False
    on_corrupt: str = "stop"
    max_steps_per_epoch: int | None = None
    channels_last: bool | None = None  # None: on CUDA only (1.2–1.3× faster steps on an H100; the same math)
    # A cache copied to another machine: where its dataset and teacher checkpoint are now (each checked:
    # the dataset's listing and the checkpoint's sha256 against the manifest).
    data_root: str | None = None
    teacher_checkpoint: str | None = None

    def __post_init__(self):
        if self.targets not in ("cache", "online"):
            raise ValueError(f"targets must be 'cache' or 'online', got {self.targets!r}")
        if self.on_corrupt not in ("stop", "skip"):
            raise ValueError(f"on_corrupt must be 'stop' or 'skip', got {self.on_corrupt!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_train_spec(path: str | Path | None = None, **overrides) -> TrainSpec:
    """Read a job YAML's ``distill`` section and apply overrides (None = keep)."""
    raw = _read_section(path, "distill", TrainSpec, overrides, required=True)
    missing = {"name", "cache", "student", "output"} - set(raw)
    if missing:
        raise ValueError(f"job spec {path}: distill section misses key(s) {sorted(missing)}")
    return TrainSpec(**raw)
