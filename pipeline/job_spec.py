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


def _doc(text: str):
    """A field's meaning, rendered into docs/job-spec.md by reference_markdown()."""
    return Field(description=text)


class TeacherSpec(TypedDict, total=False):
    """The ``teacher:`` mapping of a cache spec (a plain dict once checked)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: Required[Annotated[Str, _doc(
        "timm model name, optionally with a pretrained tag (`swin_large_patch4_window7_224.ms_in22k_ft_in1k`); "
        "its family sets the split point (`scalekd-pipeline teacher-info NAME`)")]]
    checkpoint: Annotated[Optional[Folder], _doc(
        "a local weights file (.safetensors or a torch state dict; its keys must match the timm model), or "
        "`builtin:efficientnet-lite0` (the demo's teacher); its sha256 is recorded and checked by the trainer")]
    pretrained: Annotated[Bool, _doc(
        "load timm's hub weights for `name` (refused before anything is written when they are neither cached "
        "locally nor reachable); not together with `checkpoint`")]
    late_blocks: Annotated[Count, _doc(
        "plain-ViT teachers only: how many of the last blocks (with the final norm) form `late`; the release used 2")]
    kwargs: Annotated[dict[Str, Any], _doc(
        "keyword arguments for `timm.create_model` (`img_size: 224`, `num_classes: N` for a model whose timm "
        "default has no head)")]
    seed: Annotated[Int, _doc(
        "the random weights' seed when there is neither `checkpoint` nor `pretrained` (tests, benchmarks)")]
    precision: Annotated[Literal["fp32", "bf16", "fp16"], _doc(
        "the teacher's arithmetic while caching (autocast; outputs stored from float32 either way; fp16 needs "
        "CUDA; fp32 on a GPU with cuDNN's TF32 convolutions off). Part of the cache's configuration; the trainer's online mode runs the teacher at the cache's "
        "precision")]


# The keys of the ``dataset:`` mapping (checked, per kind, by pipeline.datasets.list_dataset).
DATASET_KEYS: dict[str, tuple[str, str]] = {
    "kind": ("'imagefolder' | 'webdataset' | 'demo'",
             "`imagefolder`: `<root>/<split>/<class>/<image>`; `webdataset`: tars of `<key>.<image ext>` + "
             "`<key>.cls` members; `demo`: the embedded demo photos, built under `root` on first use"),
    "root": ("folder", "imagefolder and demo: the folder holding `<split>/<class>/<image>`; sources are recorded "
                       "relative to it, so a cache moves with its dataset"),
    "split": ("string", "imagefolder and demo: the sub-folder to list (`train`, `val`); imagefolder without it "
                        "lists `<root>/<class>/<image>`; demo: `train` (default) or `val`"),
    "urls": ("string or list", "webdataset only: a tar path, a glob, or a list of them"),
}


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
              final: cache and late weights agree) and a feature-mimicking target (docs/storage.md)
    Every field is typed and checked when the spec is built (pydantic); spec_error words the refusal.
    """

    name: Annotated[Str, _doc("the job's name, recorded in the manifest")]
    dataset: Annotated[dict[Str, Any], _doc("the images to cache: a mapping, see `cache.dataset` below")]
    teacher: Annotated[TeacherSpec, _doc("the teacher model and its weights: a mapping, see `cache.teacher` below")]
    output: Annotated[Folder, _doc(
        "the cache folder, outside the dataset; on a Ray cluster an absolute path every node mounts at the same "
        "place (an object-store URL is refused)")]
    views: Annotated[ViewConfig, _doc("K views per image and their sampling: see `cache.views` below")] = field(
        default_factory=ViewConfig)
    format: Annotated[Literal["zarr", "webdataset"], _doc(
        "the store: zarr v3 arrays, or one tar per view index (docs/cache-format.md)")] = "zarr"
    roles: Annotated[dict[Str, Str], _doc(
        "{role: codec}: roles `final`, `logits` (both required: the distiller's targets) and `mid` (late's input, "
        "opt-in: training never reads it; it buys `inspect-shards --check-late N`); codecs `fp32`, `fp16`, "
        "`int8`, `int8dc` (docs/storage.md)")] = field(
        default_factory=lambda: {"final": "fp16", "logits": "fp16"})  # mid: opt-in
    samples_per_shard: Annotated[Count, _doc("images per shard, the unit of commit and of resume")] = 64
    compression_level: Annotated[int, Strict(), Field(ge=1, le=22), _doc(
        "zstd level for every stored field (1..22)")] = 3  # zstd's levels
    batch_size: Annotated[Count, _doc("views per teacher forward")] = 32
    actors: Annotated[Count, _doc("teacher actors (one per GPU on a cluster)")] = 1
    address: Annotated[Optional[Str], _doc(
        "a Ray cluster's address (`auto` on one of its nodes); null: `RAY_ADDRESS`, else a local Ray the job "
        "starts itself")] = None
    device: Annotated[Str, _doc("the teacher's device: `auto` (CUDA when there is one), `cpu`, `cuda`, `cuda:N`")] = "auto"

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

    name: Annotated[Str, _doc("the run's name (plot titles, logs)")]
    cache: Annotated[Folder, _doc("the cache folder to train from (made by `cache-teacher`)")]
    student: Annotated[Str, _doc("a timm model name (or `mixer_b14_224`, `vit_base_patch14_224`, which this "
                                 "project registers)")]
    output: Annotated[Folder, _doc("the run folder: student/, student.safetensors, metrics.jsonl, curves.png, "
                                   "job.yaml, checkpoint.pt")]
    recipe: Annotated[Str, _doc("a recipe of pipeline.recipes (listed below); `epochs` to `ema_decay` override its values")] = "demo"
    targets: Annotated[Literal["cache", "online"], _doc(
        "`cache`: targets read from the cache; `online`: the whole teacher live, the same loop")] = "cache"
    val: Annotated[Optional[dict[Str, Any]], _doc(
        "a held-out dataset mapping (as `cache.dataset`) evaluated after every epoch; null: no validation")] = None
    epochs: Annotated[Optional[Count], _doc("epochs; null: the recipe's (epoch e uses stored view e mod K)")] = None
    batch_size: Annotated[Optional[Count], _doc(
        "the global batch (a multiple of the process count under torchrun); null: the recipe's")] = None
    lr: Annotated[Optional[Positive], _doc("learning rate; null: the recipe's")] = None
    opt: Annotated[Optional[Str], _doc("optimizer, a name timm's `create_optimizer_v2` knows; null: the recipe's")] = None
    weight_decay: Annotated[Optional[NonNegative], _doc("weight decay; null: the recipe's")] = None
    sched: Annotated[Optional[Str], _doc("schedule, a name timm's `create_scheduler_v2` knows; null: the recipe's")] = None
    warmup_epochs: Annotated[Optional[Annotated[int, Strict(), Field(ge=0)]], _doc(
        "warm-up epochs; null: the recipe's")] = None
    grad_clip: Annotated[Optional[NonNegative], _doc("gradient-norm clip; null: the recipe's")] = None
    task_loss: Annotated[Optional[Str], _doc(
        "L_task: `ce`, `ce_smooth` (label smoothing 0.1) or `bce`; null: the recipe's")] = None
    ema: Annotated[Optional[Bool], _doc(
        "keep a moving average of the student (timm's ModelEmaV3, updated every step, evaluated every epoch as "
        "`val_ema`, kept in the checkpoint); null: the recipe's")] = None
    ema_decay: Annotated[Optional[Annotated[float, Strict(), Field(gt=0, lt=1)]], _doc(
        "the moving average's decay per step; null: the recipe's (the release's 0.9999)")] = None
    check_views: Annotated[Bool, _doc(
        "refuse a cache whose views (RandAugment, random erasing: its manifest's `views`) differ from the "
        "recipe's; false: train on it anyway")] = True
    loss: Annotated[dict[Str, Any], _doc(
        "overrides of the release's loss preset for this teacher → student pair (keys listed below)")] = field(
        default_factory=dict)
    teacher: Annotated[dict[Str, Any], _doc(
        "values the run expects of the cache's teacher, checked against its manifest: any of `name`, "
        "`checkpoint_sha256`, `split_point`, `late_blocks`, `input_size`, `mean`, `std`, `interpolation`")] = field(
        default_factory=dict)
    student_kwargs: Annotated[dict[Str, Any], _doc(
        "keyword arguments for the student's `timm.create_model` (`img_size: N` for a ViT, Swin or Mixer at "
        "another size, `drop_path_rate`, ...)")] = field(default_factory=dict)
    student_input_size: Annotated[Optional[Count], _doc(
        "the student's input side in pixels (it sees the teacher's crop at this size); null: timm's "
        "pretrained_cfg")] = None
    workers: Annotated[int, Strict(), Field(ge=0), _doc("DataLoader worker processes (0: read in the main process)")] = 2
    seed: Annotated[Int, _doc("the run's seed: the student's and CAPs' initial weights and the epoch order")] = 0
    device: Annotated[Str, _doc("`auto` (CUDA when there is one), `cpu`, `cuda`, `cuda:N`; under torchrun each "
                                "process uses `cuda:LOCAL_RANK`")] = "auto"
    verify_fingerprints: Annotated[Bool, _doc(
        "check every replayed view against the teacher input's fingerprint stored in the cache")] = False
    on_corrupt: Annotated[Literal["stop", "skip"], _doc(
        "a sample that cannot be read or replayed: `stop` training naming it, or `skip` it")] = "stop"
    max_steps_per_epoch: Annotated[Optional[Count], _doc("cap on steps per epoch (smoke runs); null: the whole "
                                                         "cache")] = None
    channels_last: Annotated[Optional[Bool], _doc(
        "channels-last memory format; null: on CUDA only (1.2–1.3× faster steps on an H100, the same math)")] = None
    allow_incomplete: Annotated[Bool, _doc("train on a cache whose job has not finished (refused otherwise)")] = False
    # A cache copied to another machine: where its dataset and teacher checkpoint are now (each checked:
    # the dataset's listing and the checkpoint's sha256 against the manifest).
    data_root: Annotated[Optional[Str], _doc(
        "where the cache's dataset is now, for a moved cache (its listing must give the recorded sha256); null: "
        "the root recorded at caching time")] = None
    teacher_checkpoint: Annotated[Optional[Str], _doc(
        "where the teacher checkpoint is now, for a moved cache (its sha256 must match); null: the recorded path")] = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_train_spec(path: str | Path | None = None, **overrides) -> TrainSpec:
    """Read a job YAML's ``distill`` section and apply overrides (None = keep)."""
    return _build(TrainSpec, _read_section(path, "distill", overrides, required=True), path, "distill")


# ------------------------------------------------------------------------------------------ the reference

def _type_name(tp) -> str:
    """A field's type as a reader of the YAML sees it: `integer >= 1`, `'zarr' | 'webdataset'`, `mapping`."""
    import typing

    import annotated_types as at

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        bounds = []
        for m in args[1:]:
            for c in (m.metadata if hasattr(m, "metadata") and not isinstance(m, at.BaseMetadata) else [m]):
                for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    if isinstance(c, getattr(at, attr.capitalize())):
                        bounds.append(f"{sign} {getattr(c, attr)}")
        base = _type_name(args[0])
        if any(getattr(m, "func", None) is not None for m in args[1:]) and base == "string":
            base = "path"  # a Folder: str or a Path
        return f"{base} {', '.join(bounds)}" if bounds else base
    if origin in (typing.Required, typing.NotRequired):
        return _type_name(args[0])
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + (" or null" if len(rest) < len(args) else "")
    if origin is Literal:
        return " | ".join(f"'{a}'" for a in args)
    if origin is dict or tp is dict:
        return "mapping"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if isinstance(tp, type) and hasattr(tp, "__pydantic_fields__") or isinstance(tp, type) and issubclass(tp, dict):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _yaml_value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{k}` | {_cell(t)} | {_cell(d)} | {_cell(m)} |" for k, t, d, m in rows]
    return out


def _dataclass_rows(cls) -> list[tuple[str, str, str, str]]:
    from pydantic_core import PydanticUndefined

    rows = []
    for name, f in cls.__pydantic_fields__.items():
        kind = _type_name(Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation)
        if f.default_factory is not None:
            value = f.default_factory()
            default = "see below" if hasattr(value, "__pydantic_fields__") else f"`{_yaml_value(value)}`"
        elif f.default is PydanticUndefined:
            default = "required"
        else:
            default = f"`{_yaml_value(list(f.default) if isinstance(f.default, tuple) else f.default)}`"
        rows.append((name, kind, default, f.description or ""))
    return rows


def _typeddict_rows(cls) -> list[tuple[str, str, str, str]]:
    import typing

    rows = []
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        required = typing.get_origin(tp) is typing.Required
        inner = typing.get_args(tp)[0] if required else tp
        meaning = next((m.description for m in typing.get_args(inner)[1:] if getattr(m, "description", None)), "") \
            if typing.get_origin(inner) is Annotated else ""
        rows.append((name, _type_name(inner), "required" if required else "optional", meaning))
    return rows


def field_descriptions() -> dict[str, str]:
    """Every documented key of a job spec (``section.key``) → its description ('' where there is none)."""
    return {f"{section}.{k}": m for section, rows in _sections() for k, _, _, m in rows}


def _sections():
    return [("cache", _dataclass_rows(CacheSpec)),
            ("cache.dataset", [(k, t, "required" if k == "kind" else "—", m) for k, (t, m) in DATASET_KEYS.items()]),
            ("cache.teacher", _typeddict_rows(TeacherSpec)),
            ("cache.views", _dataclass_rows(ViewConfig)),
            ("distill", _dataclass_rows(TrainSpec))]


_INTRO = {
    "cache": "What `scalekd-pipeline cache-teacher JOB.yaml` (`make cache-teacher`) reads: the `cache:` section "
             "of a job YAML (or the whole file when it has no sections). Command-line options override these keys.",
    "cache.dataset": "The images to cache. Keys are checked per kind (`imagefolder` and `demo`: `kind`, `root`, "
                     "`split`; `webdataset`: `kind`, `urls`); a misspelt key is refused. `distill.val` takes the "
                     "same mapping.",
    "cache.teacher": "The teacher. One of `checkpoint`, `pretrained` or (random weights) `seed`.",
    "cache.views": "The views' operations, in order: RandomResizedCrop, horizontal flip, RandAugment, colour "
                   "jitter, and random erasing after normalisation. Every random outcome is drawn once per (image, "
                   "view) from a generator seeded by the image's key and stored in the cache; teacher and student "
                   "replay the same operations, each at its own input size (pipeline/augment.py).",
    "distill": "What `scalekd-pipeline distill JOB.yaml` (`make distill`) reads: the `distill:` section of a job "
               "YAML. Keys left null take the recipe's value.",
}


def reference_markdown() -> str:
    """docs/job-spec.md: every key of a job spec with its type, default and meaning, from the spec's own
    definitions (the pydantic fields and their descriptions), so the reference cannot drift."""
    from dataclasses import fields as dataclass_fields

    from scalekd.presets import LossConfig

    from .recipes import ALIASES, RECIPES

    lines = ["# Job spec reference", "",
             "<!-- Generated by `python -m pipeline.job_spec` from pipeline/job_spec.py and pipeline/views.py; "
             "do not edit by hand (tests/test_docs.py checks it). -->", "",
             "A job YAML has a `cache:` section (the caching job) and a `distill:` section (the student trainer). "
             "Every key is typed and checked when the spec is built: a wrong type, a value out of range or an "
             "unknown key at any level is refused before any output, naming the key, the expected and the found "
             "value. Examples: [`jobs/demo.yaml`](../jobs/demo.yaml), "
             "[`jobs/swinl-imagenet.yaml`](../jobs/swinl-imagenet.yaml), "
             "[`jobs/eva-imagenet.yaml`](../jobs/eva-imagenet.yaml)."]
    for section, rows in _sections():
        lines += ["", f"## `{section}`", "", _INTRO[section], "", *_table(rows)]
    lines += ["", "### Recipes (`distill.recipe`)", "", "| recipe | values |", "|---|---|"]
    lines += [f"| `{name}` | {_cell(', '.join(f'{k}: {_yaml_value(v)}' for k, v in r.items()))} |"
              for name, r in RECIPES.items()]
    lines += ["", "Earlier names, still accepted: " + ", ".join(f"`{old}` = `{new}`" for old, new in ALIASES.items())
              + ". The keys are explained in pipeline/recipes.py."]
    lines += ["", "### Loss overrides (`distill.loss`)", "",
              "Keys of `scalekd.presets.LossConfig`; each defaults to the release's value for the teacher → student "
              "pair where the release published it, else to our rule (docs/method.md): "
              + ", ".join(f"`{f.name}`" for f in dataclass_fields(LossConfig))
              + ". `style: ours` takes our rule for every value of a published pair too; `stage4_norm` also "
                "sets the student's stage-4 tap (after its final norm or raw)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m pipeline.job_spec [FILE]: write the reference (default docs/job-spec.md)
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "job-spec.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(reference_markdown())
    print(f"wrote {target}")
