"""Job specs: the YAML files under jobs/, parsed into one checked object."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass
from typing_extensions import Required, TypedDict

from .schema import CODECS, ROLES
from .views import ViewConfig

__all__ = ["CacheSpec", "TrainSpec", "load_cache_spec", "load_train_spec", "work_dir", "spec_error"]

# Typed fields (pydantic): a wrong type is refused by name when the spec is built, never deep in a job.
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
# A folder: str or a Path (kept as str: the spec goes through JSON to subprocesses and Ray workers).
Folder = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v), Strict()]
_CHECKED = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


class TeacherSpec(TypedDict, total=False):
    """The ``teacher:`` mapping of a cache spec (a plain dict once checked)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: Required[Str]
    checkpoint: Optional[Folder]
    pretrained: Bool
    late_blocks: Count
    kwargs: dict[Str, Any]
    seed: Int
    # The teacher's arithmetic while caching (autocast; outputs stored from float32 either way). Part of the
    # cache's configuration; the trainer's online mode runs the teacher at the cache's precision.
    precision: Literal["fp32", "bf16", "fp16"]


def work_dir() -> Path:
    """Where local runs keep their scratch (Ray's temp files, exported demo weights): $SCALEKD_WORK or ./.work."""
    return Path(os.environ.get("SCALEKD_WORK", ".work")).resolve()


@dataclass(config=_CHECKED)
class CacheSpec:
    """Everything a caching run depends on.

    dataset:  {kind: demo|imagefolder|webdataset, ...} (see pipeline.datasets.list_dataset)
    teacher:  {name, checkpoint (a file, or 'builtin:efficientnet-lite0'), pretrained, late_blocks, kwargs,
               seed: the random weights' seed when there is neither checkpoint nor pretrained (tests, benchmarks),
               precision: fp32 (default) | bf16 | fp16, the teacher's arithmetic (fp16 needs a GPU)}
    views:    K views per image and their sampling (pipeline.views.ViewConfig)
    output:   the cache folder; format: zarr | webdataset; roles: {role: codec}, by default final + logits (the
              distiller's targets). mid (late's input) is opt-in: training never reads it, and it is the largest
              role of a Swin-L cache (196×768 against final's 49×1536: 0.39 vs 0.19 TB for ImageNet at K = 1 in
              fp16 before zstd); it buys ``inspect-shards --check-late N`` (late re-run on stored mid, compared with stored
              final: cache and late weights agree) and a feature-mimicking target (README, Storage)
    Every field is typed and checked when the spec is built (pydantic); spec_error words the refusal.
    """

    name: Str
    dataset: dict[Str, Any]
    teacher: TeacherSpec
    output: Folder
    views: ViewConfig = field(default_factory=ViewConfig)
    format: Literal["zarr", "webdataset"] = "zarr"
    roles: dict[Str, Str] = field(default_factory=lambda: {"final": "fp16", "logits": "fp16"})  # mid: opt-in
    samples_per_shard: Count = 64
    compression_level: Annotated[int, Strict(), Field(ge=1, le=22)] = 3  # zstd's levels
    batch_size: Count = 32
    actors: Count = 1
    address: Optional[Str] = None
    device: Str = "auto"

    def __post_init__(self):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(self.output)):
            raise ValueError(f"output {self.output!r} is a URL; the cache must be a folder on a filesystem (shards are "
                             f"committed by renaming a folder). On a Ray cluster use a path every node mounts at "
                             f"the same place (NFS, Lustre, a FUSE mount of the bucket)")
        for role, codec in self.roles.items():
            if role not in ROLES:
                raise ValueError(f"roles: unknown role {role!r}; expected some of {list(ROLES)}")
            if codec not in CODECS:
                raise ValueError(f"roles.{role}: unknown codec {codec!r}; expected one of {list(CODECS)}")
        if "final" not in self.roles or "logits" not in self.roles:
            raise ValueError("roles must include 'final' and 'logits' (the distiller's targets); 'mid' is optional")

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = ("cache", "distill")


def _read_section(path, section: str, overrides: dict, required: bool) -> dict:
    """One section of a job YAML (or the whole file when it has no sections and the section is
    optional), with overrides (None = keep) applied. Types and unknown keys are checked by the spec."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, expected a YAML file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"job spec {path} {what}")
        try:
            doc = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"job spec {path} is not valid YAML: {e}") from None
        doc = {} if doc is None else doc
        if not isinstance(doc, dict):
            raise ValueError(f"job spec {path}: expected a mapping with a '{section}:' section, found "
                             f"{_kind(doc)} {_short(doc)}")
        if set(doc) & set(SECTIONS):  # a file with sections: anything else at the top is a typo, not ignored
            unknown = sorted(map(str, set(doc) - set(SECTIONS)))
            if unknown:
                raise ValueError(f"job spec {path}: unknown top-level key(s) {unknown}; expected "
                                 f"{' and/or '.join(repr(s) for s in SECTIONS)}")
        if required and section not in doc:
            raise ValueError(f"job spec {path} has no '{section}:' section")
        raw = doc.get(section, doc if not required else {})
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ValueError(f"job spec {path}: '{section}' must be a mapping of settings, found {_kind(raw)} "
                             f"{_short(raw)}")
    return {**raw, **{k: v for k, v in overrides.items() if v is not None}}


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
             "dict_type": "a mapping", "dataclass_type": "a mapping", "tuple_type": "a list",
             "typed_dict_type": "a mapping"}


def spec_error(err: ValidationError, where: str, section: str | None) -> ValueError:
    """A pydantic ValidationError as one message naming each key (section.key.subkey), what was
    expected and what was found, e.g. ``job spec J.yaml: cache.views.per_image: expected an integer,
    found 'four' (a string)``."""
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in ((section,) if section else ()) + tuple(e["loc"]))
        found = e.get("input")
        if e["type"] == "missing":
            lines.append(f"{loc}: missing")
        elif e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            lines.append(f"{loc}: unknown key")
        elif e["type"] in _EXPECTED:
            lines.append(f"{loc}: expected {_EXPECTED[e['type']]}, found {_short(found)} ({_kind(found)})")
        elif e["type"] == "value_error":  # our own check's message, which names its key itself
            lines.append(str(e["ctx"]["error"]) if loc in ("", section) else f"{loc}: {e['ctx']['error']}")
        else:
            msg = (e["msg"].replace("Input should be greater than or equal to", "expected at least")
                   .replace("Input should be less than or equal to", "expected at most")
                   .replace("Input should be greater than", "expected more than").replace("Input should be", "expected"))
            lines.append(f"{loc}: {msg}, found {_short(found)}")
    return ValueError(f"{where}: " + "; ".join(lines))


def _build(cls, raw: dict, path, section: str):
    try:
        return cls(**raw)
    except ValidationError as e:
        raise spec_error(e, f"job spec {path}" if path else f"{section} spec", section) from None


def load_cache_spec(path: str | Path | None = None, **overrides) -> CacheSpec:
    """Read a job YAML (its ``cache`` section, or the whole file) and apply overrides (None = keep)."""
    return _build(CacheSpec, _read_section(path, "cache", overrides, required=False), path, "cache")


def with_overrides(spec: CacheSpec, **overrides) -> CacheSpec:
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


Positive = Annotated[float, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]


@dataclass(config=_CHECKED)
class TrainSpec:
    """Everything a distillation run depends on (the ``distill:`` section of a job YAML).

    cache: the cache folder; student: a timm name; recipe: a name from pipeline.recipes, with
    any of its keys overridable here (epochs, lr, batch_size, opt, weight_decay, sched, ...);
    loss: overrides of the loss preset (alpha, beta, softmax_scale, heads_stage3/4, ...);
    teacher: values the run expects of the cache's teacher (name, checkpoint_sha256, ...), checked.
    allow_incomplete: train on a cache whose job has not finished (refused otherwise).
    """

    name: Str
    cache: Folder
    student: Str
    output: Folder
    recipe: Str = "demo"
    targets: Literal["cache", "online"] = "cache"
    val: Optional[dict[Str, Any]] = None
    epochs: Optional[Count] = None
    batch_size: Optional[Count] = None
    lr: Optional[Positive] = None
    opt: Optional[Str] = None
    weight_decay: Optional[NonNegative] = None
    sched: Optional[Str] = None
    warmup_epochs: Optional[Annotated[int, Strict(), Field(ge=0)]] = None
    grad_clip: Optional[NonNegative] = None
    task_loss: Optional[Str] = None
    loss: dict[Str, Any] = field(default_factory=dict)
    teacher: dict[Str, Any] = field(default_factory=dict)
    student_kwargs: dict[Str, Any] = field(default_factory=dict)
    student_input_size: Optional[Count] = None
    workers: Annotated[int, Strict(), Field(ge=0)] = 2
    seed: Int = 0
    device: Str = "auto"
    verify_fingerprints: Bool = False
    on_corrupt: Literal["stop", "skip"] = "stop"
    max_steps_per_epoch: Optional[Count] = None
    channels_last: Optional[Bool] = None  # None: on CUDA only (1.2–1.3× faster steps on an H100; the same math)
    allow_incomplete: Bool = False
    # A cache copied to another machine: where its dataset and teacher checkpoint are now (each checked:
    # the dataset's listing and the checkpoint's sha256 against the manifest).
    data_root: Optional[Str] = None
    teacher_checkpoint: Optional[Str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_train_spec(path: str | Path | None = None, **overrides) -> TrainSpec:
    """Read a job YAML's ``distill`` section and apply overrides (None = keep)."""
    return _build(TrainSpec, _read_section(path, "distill", overrides, required=True), path, "distill")
