"""The student trainer: plain PyTorch, one loop for cached and online targets.

    spec → cache manifest (checked against the run) → student, CAPs, teacher late ALONE
         → for each epoch: view e mod K of every image → distiller loss → step → eval → checkpoint
         → export the student as safetensors, metrics JSONL and a PNG of the curves

Under torchrun every process runs this loop on its slice of each global batch (pipeline/distributed.py);
rank 0 alone logs and writes files, the evaluation is shared among the ranks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import timm.utils
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from scalekd.distiller import LOSS_TERMS, ScaleKDDistiller
from scalekd.presets import preset
from scalekd.student import create_student
from scalekd.targets import OnlineTargets, Targets

from . import distributed
from .distributed import World
from .job_spec import TrainSpec
from .late import CacheMismatchError, build_late, check_teacher_matches
from .optimization import build_optimization, check_views
from .output_guard import OutputLock
from .reader import CacheReader
from .schema import write_json_atomic
from .recipes import recipe as named_recipe
from .train_data import EpochOrder, ModelInput, ViewDataset, collate_skipping

__all__ = ["train", "export_student", "evaluate", "check_relocated_dataset", "CheckpointWriteError",
           "IncompleteCacheError", "RunFolderError", "CHECKPOINT", "STUDENT_FILE", "METRICS_FILE"]

CHECKPOINT, STUDENT_FILE, METRICS_FILE, PLOT_FILE = "checkpoint.pt", "student.safetensors", "metrics.jsonl", "curves.png"
STUDENT_FOLDER = "student"  # the timm model folder: timm.create_model("local-dir:RUN/student", pretrained=True)
JOB_SPEC_FILE = "job.yaml"  # the run's resolved job spec
RUN_FILES = (CHECKPOINT, METRICS_FILE, STUDENT_FILE, PLOT_FILE, JOB_SPEC_FILE, STUDENT_FOLDER)  # what a run writes (and --overwrite removes)
READ_EVERY = 20  # steps between the trainer's reads of its loss sums from the device
RUN_MARK = ".distill-run"  # written when a run claims a folder clear of others' files: RUN_FILES there are a run's


class IncompleteCacheError(ValueError):
    """The cache's job has not finished (or wrote nothing yet); training on it needs an explicit opt-in."""


class RunFolderError(ValueError):
    """The run folder holds another run (or cannot be made); nothing in it was changed."""


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _use(device: torch.device) -> torch.device:
    """Make a numbered GPU the current one: the DataLoader's pinning thread (and any CUDA call without a
    device) works on the current GPU, which is GPU 0 otherwise, where it would open a context of its own."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _model_input(cfg: dict, size=None) -> ModelInput:
    size = tuple(size or cfg["input_size"][1:])
    return ModelInput(size, cfg.get("interpolation", "bicubic"), tuple(cfg["mean"]), tuple(cfg["std"]))


def build_run(spec: TrainSpec, device: torch.device):
    """Everything the loop needs: reader, dataset, distiller, online source (or None), recipe."""
    if spec.data_root:
        check_relocated_dataset(spec.cache, spec.data_root)
    reader = CacheReader(spec.cache, data_root=spec.data_root)
    _check_complete(reader.manifest, spec)
    teacher = dict(reader.manifest["teacher"])
    if spec.teacher_checkpoint:  # the same weights at another path: build_late / load_teacher check its sha256
        teacher["checkpoint"] = str(Path(spec.teacher_checkpoint).resolve())
    check_teacher_matches(teacher, spec.teacher, spec.cache)
    missing = {"final", "logits"} - set(reader.specs)
    if missing:
        raise CacheMismatchError(f"cache {spec.cache} does not store role(s) {sorted(missing)}, which the loss needs")
    rec = _recipe(spec)
    if spec.check_views:
        check_views(spec.recipe, rec, spec.cache, reader.manifest)
    online = None
    if spec.targets == "online":
        from .weights import load_teacher

        if not teacher.get("checkpoint") and not teacher.get("pretrained"):
            torch.manual_seed(teacher.get("seed") or 0)  # the cache's random teacher (tests, benchmarks)
        split, sha = load_teacher(teacher["name"], checkpoint=teacher.get("checkpoint"),
                                  pretrained=teacher.get("pretrained", False), late_blocks=teacher.get("late_blocks") or 2,
                                  device=device, **(teacher.get("kwargs") or {}))
        if teacher.get("checkpoint_sha256") and sha != teacher["checkpoint_sha256"]:
            raise CacheMismatchError(f"teacher checkpoint {teacher['checkpoint']} has sha256 {sha}, but the cache was "
                                     f"made from sha256 {teacher['checkpoint_sha256']}")
        try:  # the cache's precision: online targets are then the cached ones (fp16 needs a GPU)
            online = OnlineTargets(split, teacher.get("precision", "fp32"))
        except ValueError as e:
            raise CacheMismatchError(f"cache {spec.cache} was made at teacher precision {teacher.get('precision')!r}, "
                                     f"which online targets must match, but {e}") from None
        late = split.late
    else:
        late = build_late(teacher, device)
    torch.manual_seed(spec.seed)  # the student and CAPs start the same whichever target source was built
    dp = {} if rec["drop_path_rate"] is None else {"drop_path_rate": rec["drop_path_rate"]}
    student = create_student(spec.student, num_classes=teacher["num_classes"], input_size=spec.student_input_size,
                             stage4_norm=spec.loss.get("stage4_norm"), **(dp | spec.student_kwargs))
    loss_cfg = preset(late.info, spec.student, **({"task_loss": rec["task_loss"], "stage4_norm": student.stage4_norm}
                                                  | spec.loss))
    distiller = ScaleKDDistiller(student, late, loss_cfg).to(device)
    scfg = dict(student.model.pretrained_cfg) | {"input_size": student.input_size}
    data = ViewDataset(reader, _model_input(scfg), _model_input(teacher), spec.targets,
                       spec.verify_fingerprints, spec.on_corrupt)
    if len(data) == 0:
        raise IncompleteCacheError(f"cache {spec.cache} holds no samples yet ({_progress(reader.manifest)}); "
                                   f"run its cache job first")
    return reader, data, distiller, online, rec


def check_relocated_dataset(cache, data_root) -> None:
    """A cache replayed from a dataset at another place must list the same samples: re-list it
    there and compare the listing's sha256 with the one the cache was made from."""
    from .datasets import list_dataset, listing_sha256, relocate_spec
    from .schema import read_manifest

    m = read_manifest(cache)
    relative = m.get("dataset", {}).get("relative_spec")
    if relative is None:
        raise CacheMismatchError(f"cache {cache} does not record its dataset relative to a root; it cannot be relocated")
    refs, _, _ = list_dataset(relocate_spec(relative, data_root))
    want = m["config"]["dataset_listing_sha256"]
    if listing_sha256(refs) != want:
        raise CacheMismatchError(f"dataset under --data-root {data_root} lists {len(refs)} samples whose keys and labels "
                                 f"differ from those the cache {cache} was made from ({m['dataset']['listed']} listed, "
                                 f"listing sha256 {want[:16]}…); is it the same dataset?")


class _EvalImages(torch.utils.data.Dataset):
    """Validation images through timm's eval transform, for a DataLoader's workers."""

    def __init__(self, refs, transform):
        self.refs, self.transform = refs, transform

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        return self.transform(_val_image(self.refs[i])), self.refs[i].label


def _recipe(spec: TrainSpec) -> dict:
    return named_recipe(spec.recipe, **{k: getattr(spec, k) for k in ("epochs", "batch_size", "lr", "opt", "weight_decay",
                                                                      "sched", "warmup_epochs", "grad_clip", "task_loss",
                                                                      "ema", "ema_decay")})


def _progress(m: dict) -> str:
    listed = (m.get("dataset") or {}).get("listed", "?")
    return (f"{len(m['shards'])} of {m.get('num_shards_expected', '?')} shards committed, {m['num_samples']} of "
            f"{listed} samples")


def _check_complete(m: dict, spec: TrainSpec) -> None:
    """An unfinished cache (its job running, or stopped) is refused unless the run opts in by name."""
    if m.get("complete", True) is True or spec.allow_incomplete:
        return
    raise IncompleteCacheError(f"cache {spec.cache} is incomplete ({_progress(m)}; its manifest.json says complete: "
                               f"false: the cache job is still running or was stopped); run the cache job again to "
                               f"finish it, or pass --allow-incomplete (allow_incomplete: true) to train on what is "
                               f"there")


def evaluate(model: nn.Module, val_spec: dict | None, device, input_size=None, batch_size: int = 64,
             world: World | None = None, workers: int = 0, progress: bool = False, desc: str = "validation") -> dict:
    """top-1/top-5 (%) of a timm classifier on a labelled dataset, with timm's own eval transform
    (resize, centre crop by crop_pct, normalise) at input_size (3, H, W) or the model's default.

    world: several processes (each holding the same model) share the images and sum their counts;
    every rank gets the whole dataset's numbers."""
    if not val_spec:
        return {}
    from timm.data import create_transform

    from .datasets import list_dataset
    from .export import eval_data_config

    refs, _, _ = list_dataset(val_spec)
    total = len(refs)
    if world is not None:
        refs = refs[world.rank :: world.size]
    transform = create_transform(**eval_data_config(model, input_size), is_training=False)
    was = model.training
    model.eval()
    pin = device.type == "cuda" if isinstance(device, torch.device) else False
    # Decoding in workers (50 k ImageNet images decoded serially take minutes an epoch).
    loader = DataLoader(_EvalImages(refs, transform), batch_size=batch_size, num_workers=workers,
                        pin_memory=pin, multiprocessing_context="fork" if workers else None)
    from tqdm import tqdm

    bar = tqdm(total=len(refs), desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)
    with torch.inference_mode():
        correct = torch.zeros(2, dtype=torch.int64, device=device)  # counted on the device, read once at the end
        for x, y in loader:
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            logits = model(x)
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # a head of fewer than 5 classes
            correct += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum()])
            bar.update(len(y))
        correct1, correct5 = correct.tolist()
    bar.refresh()  # the final count, also when it came faster than tqdm's refresh interval
    bar.close()
    model.train(was)
    if world is not None:
        correct1, correct5 = (int(c) for c in world.sum(torch.tensor([correct1, correct5])))
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "images": total}


def _val_image(ref):
    from .datasets import BadImage, load_image

    try:
        return load_image(ref)
    except BadImage as e:  # its reason alone would not say which validation image it is
        where = f"{ref.source}:{ref.member}" if ref.member else ref.source
        raise BadImage(f"validation image {ref.key!r} ({where}): {e}") from None


def export_student(model: nn.Module, path: Path) -> Path:
    """The student's weights alone, as safetensors that plain timm loads:
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)). The run folder's
    timm model folder (pipeline/export.py) also records its input size and normalisation."""
    from safetensors.torch import save_file

    from .export import readable

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    readable(tmp)
    os.replace(tmp, path)
    return path


class CheckpointWriteError(RuntimeError):
    """An epoch's metrics or checkpoint cannot be written (full disk, no permission); the previous ones are whole."""


def _save_epoch(out: Path, ckpt_path: Path, metrics: list[dict], state: dict) -> None:
    # The checkpoint holds what an exact resume needs and nothing else: the student and the CAPs, the
    # optimizer's state for each of their parameters, the scheduler, the RNG, the metrics, the spec key.
    # Its size is the CAPs' and the optimizer's: for the demo (ResNet-18 student, EfficientNet-Lite0
    # teacher) the student is 47 MB, its four CAPs 180 MB (each stage-4 CAP 87 MB, 52 MB of it the FFN
    # at the teacher's 1280 channels), and AdamW keeps two moments per parameter: 3 × 227 MB = 681 MB.
    # The exported student (student/, student.safetensors) is the 47 MB.
    """metrics.jsonl, then the checkpoint, each written aside and renamed into place: a kill or a
    full disk mid-write leaves the previous file whole. The metrics file is rewritten whole from
    the checkpointed history, so a kill between the two cannot give a resumed run a duplicate line."""
    tmp = out / (METRICS_FILE + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
        os.replace(tmp, out / METRICS_FILE)
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, as for the cache's shards
        os.replace(tmp, ckpt_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # frees what the failed write took
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise CheckpointWriteError(f"cannot write {tmp.name.removesuffix('.tmp')} for epoch {state['epoch'] + 1} in "
                                   f"{out}: {reason}; {CHECKPOINT} is as it was before this epoch: free space, then run "
                                   f"again with --resume") from e


def _write_job_spec(spec: TrainSpec, rec: dict, path: Path, loss: dict | None = None) -> None:
    """The resolved job spec (command-line overrides applied) as a job YAML that reruns this run, with the
    recipe and the loss configuration (preset, heads, CAP norm, stage-4 tap) as applied."""
    import yaml

    resolved = json.loads(json.dumps(spec.to_dict()))  # tuples → lists: plain YAML
    text = (f"# The resolved job spec of this run (command-line overrides applied); rerun it with\n"
            f"#   scalekd-pipeline distill {path}\n"
            f"# Recipe {spec.recipe!r} as applied: {json.dumps(rec)}\n"
            + (f"# Loss as applied: {json.dumps(loss)}\n" if loss else "")
            + yaml.safe_dump({"distill": resolved}, sort_keys=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plot(metrics: list[dict], path: Path, title: str = "") -> Path:
    """Loss terms, validation accuracy and learning rate by epoch (1-based, as in metrics.jsonl)."""
    from .plotting import pyplot

    plt = pyplot()

    epochs = [m["epoch"] for m in metrics]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.4))
    for term in (*LOSS_TERMS, "loss"):
        a1.plot(epochs, [m["train"][term] for m in metrics], marker="o", label=term)
    a1.set(xlabel="epoch", ylabel="mean loss term", title="training loss (weighted terms)", yscale="log")
    # below the axes, so that no line is hidden behind it
    a1.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    if any("top1" in m.get("val", {}) for m in metrics):
        a2.plot(epochs, [m["val"].get("top1") for m in metrics], marker="o", label="top-1")
        a2.plot(epochs, [m["val"].get("top5") for m in metrics], marker="o", label="top-5")
        a2.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    a2.set(xlabel="epoch", ylabel="%", title="validation accuracy")
    a3.plot(epochs, [m.get("lr") for m in metrics], marker="o", label="first step")
    a3.plot(epochs, [m.get("lr_last") for m in metrics], marker="x", linestyle="--", label="last step")
    a3.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    a3.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    for a in (a1, a2, a3):
        a.set_xticks(epochs if len(epochs) <= 20 else a.get_xticks())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def train(spec: TrainSpec, resume: bool = False, progress: bool = True, log=print, stop_after_steps: int | None = None,
          overwrite: bool = False) -> dict:
    """Train a student from the cache (or online); returns where its files are and the last metrics.

    The run folder is locked for the run. A folder holding another run is refused unless resume
    (same configuration) or overwrite (removes that run's files, nothing else).

    stop_after_steps: stop (without a checkpoint of the unfinished epoch) after that many steps of
    this call, as a kill would (tests).

    Under torchrun (or in a process group the caller started) this process is one rank of a
    DistributedDataParallel run of the same global batch; the result then also names its rank.
    """
    world = distributed.start(spec.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock (rank 0), until the run ends
            return _train(spec, world, resume, progress, log, stop_after_steps, overwrite, held)
    finally:
        distributed.end(world)


def _claim_run_folder(out: Path, spec: TrainSpec, resume: bool, overwrite: bool, held: contextlib.ExitStack, log):
    """Make and lock the run folder; refuse one that holds another run unless resuming it or overwriting.
    Files named as a run's are replaced or removed only in a run's folder: one a run has marked
    (RUN_MARK), or one holding a trainer checkpoint (runs from before the mark)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (os.strerror(e.errno) if e.errno else str(e))
        raise RunFolderError(f"cannot make run folder {out}: {why}; choose another output") from None
    held.enter_context(OutputLock(out, "distill run"))  # a second run on this folder is refused here
    present = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    marked, has_checkpoint, earlier = (out / RUN_MARK).is_file(), (out / CHECKPOINT).is_file(), None
    if present and not marked and has_checkpoint:  # a run's folder only if this is a trainer checkpoint (else: why not)
        earlier = json.loads(_load_checkpoint(out / CHECKPOINT)["spec"])
    elif present and not (resume or overwrite):  # for the refusal's words (a resume loads it once, later)
        earlier = _checkpoint_key(out / CHECKPOINT)
    if present and not marked and not has_checkpoint:
        raise RunFolderError(f"run folder {out} holds {', '.join(present)}, which no distill run wrote there (no "
                             f"{RUN_MARK} mark, no trainer checkpoint); nothing was removed, with or without --overwrite "
                             f"or --resume: choose another output, or move {'them' if len(present) > 1 else 'it'} away")
    if resume:
        if not (out / CHECKPOINT).is_file():
            log(f"--resume: no {CHECKPOINT} in {out}: starting fresh")
        _mark(out)
        return
    if present and overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir() and not path.is_symlink():  # the exported student folder: only what export writes
                from .export import remove_export

                remove_export(path)
            else:
                path.unlink(missing_ok=True)
        log(f"--overwrite: removed the earlier run's {', '.join(present)} from {out}")
    elif present:
        if earlier is not None and earlier != json.loads(_resume_key(spec)):
            raise RunFolderError(f"run folder {out} holds a run of another configuration ({_key_diff(earlier, spec)}); "
                                 f"choose another output, or pass --overwrite to replace it")
        what = "this run's checkpoint" if earlier is not None else f"an earlier run's {', '.join(present)}"
        raise RunFolderError(f"run folder {out} already holds {what}; pass --resume to continue it, --overwrite to "
                             f"start again, or choose another output")
    _mark(out)


def _mark(out: Path) -> None:
    """Mark the folder as a run's: from here on, the files named as a run's there are the run's."""
    path = out / RUN_MARK
    if not path.is_file():
        write_json_atomic(path, {"written_by": "scalekd-pipeline distill", "run_files": list(RUN_FILES)})


def _checkpoint_key(path: Path) -> dict | None:
    """The configuration a checkpoint records (None when there is no readable trainer checkpoint)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(state["spec"])
    except Exception:  # noqa: BLE001 — not this trainer's checkpoint: the folder is still refused, unnamed
        return None


def _key_diff(earlier: dict, spec: TrainSpec, limit: int = 4) -> str:
    """The differing keys of two run configurations, named with both values."""
    mine = json.loads(_resume_key(spec))
    diff = sorted(k for k in set(earlier) | set(mine) if earlier.get(k) != mine.get(k))
    return "; ".join(f"{k}: run has {earlier.get(k)!r}, this run {mine.get(k)!r}" for k in diff[:limit]) + (
        f"; and {len(diff) - limit} more" if len(diff) > limit else "")


def _train(spec: TrainSpec, world: World | None, resume: bool, progress: bool, log, stop_after_steps: int | None,
           overwrite: bool = False, held: contextlib.ExitStack | None = None) -> dict:
    device = world.device if world else _use(_device(spec.device))
    main = world is None or world.main
    if not main:  # one voice: rank 0 logs and writes
        progress, log = False, (lambda m: None)
    out = Path(spec.output)
    held = held if held is not None else contextlib.ExitStack()
    _recipe(spec)  # a wrong setting is refused before the run folder is looked at
    claim = lambda: _claim_run_folder(out, spec, resume, overwrite, held, log)  # noqa: E731
    world.from_main(claim) if world else claim()  # rank 0 alone locks; its refusal is raised on every rank
    torch.manual_seed(spec.seed)
    reader, data, distiller, online, rec = build_run(spec, device)
    if main:
        _write_job_spec(spec, rec, out / JOB_SPEC_FILE, distiller.config.to_dict())
    title = f"{reader.manifest['teacher']['name']} → {spec.student}"
    channels_last = device.type == "cuda" if spec.channels_last is None else spec.channels_last
    if channels_last:  # the student's and CAPs' convolutions in NHWC (bench/results-step-cuda.json)
        for part in (distiller.student, distiller.caps):
            part.to(memory_format=torch.channels_last)
    batch = min(rec["batch_size"], len(data))
    steps = len(data) // batch
    if spec.max_steps_per_epoch:
        steps = min(steps, spec.max_steps_per_epoch)
    model = distiller
    if world:
        if batch < rec["batch_size"] and batch % world.size:
            raise ValueError(f"cache {spec.cache} holds {len(data)} samples, fewer than batch_size {rec['batch_size']}; "
                             f"that global batch of {batch} does not divide among {world.size} processes")
        local = distributed.local_batch_size(batch, world.size)
        # Every trainable parameter gets a gradient on every step, except the CAPs of a
        # features-off baseline. The frozen late part (requires_grad False) is not synchronised;
        # gradients still flow through it to the proxy CAPs.
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=not distiller.config.features)
    # optimizer (student + CAPs, the recipe's no-decay rule), per-iteration schedule, clip, EMA of the student
    optim = build_optimization(rec, distiller, steps)
    trainable, opt, sched, ema = optim.trainable, optim.optimizer, optim.scheduler, optim.ema
    start_epoch, metrics = 0, []
    ckpt_path = out / CHECKPOINT
    if resume:
        # Several ranks: rank 0 reads the checkpoint and every rank gets the same state (or error).
        read = lambda: _read_checkpoint(ckpt_path, spec)  # noqa: E731
        state = world.from_main(read) if world else read()
        if state is not None:
            try:
                trainable.load_state_dict(state["trainable"])
            except RuntimeError as e:  # the same spec, other modules: made by a build with other loss presets
                first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
                raise ValueError(f"checkpoint {ckpt_path} holds other student/CAP modules than this run builds "
                                 f"({first}): it was made with other loss presets (CAP heads or norm; before the "
                                 f"release's per-pair presets, add `loss: {{style: ours, stage4_norm: false}}` to "
                                 f"the distill section to resume it) or start a new output folder") from None
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            _restore_rng(state, device)
            start_epoch, metrics = state["epoch"] + 1, json.loads(state["metrics"])
            log(f"resuming {spec.name} at epoch {start_epoch + 1} of {rec['epochs']} from {ckpt_path}")
    amp = device.type == "cuda"
    pin = device.type == "cuda"
    from tqdm import tqdm

    done_steps = 0
    # One loader for the whole run, its workers kept between epochs (the reader's metadata is
    # memory-mapped, so they stay small): the order carries each index's epoch, hence its view.
    order = EpochOrder(len(data), spec.seed)
    # this rank's slice of each global batch of the single-process order
    sampler = distributed.GlobalBatchSlices(order, batch, world.rank, world.size) if world else order
    loader = DataLoader(data, batch_size=local if world else batch, sampler=sampler, num_workers=spec.workers,
                        drop_last=True, collate_fn=collate_skipping, pin_memory=pin,
                        persistent_workers=spec.workers > 0, multiprocessing_context="fork" if spec.workers else None)
    for epoch in range(start_epoch, rec["epochs"]):
        data.set_epoch(epoch)  # view e mod K; the shuffle is seeded by epoch, so a resumed run replays it
        order.set_epoch(epoch)
        if world:  # own random streams per rank (drop-path masks), replayed alike by a resumed run
            torch.manual_seed(hash((spec.seed, epoch, world.rank)) % 2**63)
        distiller.train()
        names, t0 = (*LOSS_TERMS, "loss"), time.perf_counter()
        # Each term × batch size, and the samples, summed on the device (this rank's), read back every
        # READ_EVERY steps and at the epoch's end, as timm's train loop reads its meters at log_interval:
        # a read waits for the GPU, so reading every step would keep the CPU from queueing the next one.
        acc = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # the first step with a NaN/Inf loss
        sums, seen, step = dict.fromkeys(names, 0.0), 0, -1
        lr_first = lr_last = None
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{rec['epochs']}", disable=not progress, file=sys.stderr)
        for step, b in enumerate(loader):
            if step >= steps:
                break
            if world:
                # A skipping loader may leave a rank a short batch, or none: weigh each rank's mean
                # by its share, and skip together a step on which a rank has nothing to learn from.
                counts = world.counts(0 if b is None else b["image"].shape[0])
                if min(counts) == 0:
                    continue
                share = counts[world.rank] * world.size / sum(counts)
            if b is None:
                continue
            # uint8 pixels normalised and erased on the device (channels-last as they come, when the student is)
            images = data.to_device(b, "image", device, pin, torch.channels_last if channels_last else torch.contiguous_format)
            labels = b["label"].to(device, non_blocking=pin)
            # Targets in fp32 outside the student's autocast, as the cache holds them (the teacher runs at
            # the cache's precision inside OnlineTargets).
            if online is not None:
                targets = online(data.to_device(b, "teacher_image", device, pin))
            else:
                targets = Targets.from_final(b["final"].to(device, non_blocking=pin).float(),
                                             b["logits"].to(device, non_blocking=pin).float())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                terms = model(images, targets, labels)
            opt.zero_grad(set_to_none=True)
            (terms["loss"] * share if world and share != 1.0 else terms["loss"]).backward()
            if optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable.parameters(), optim.grad_clip)
            lr_last = opt.param_groups[0]["lr"]  # the lr this step uses
            lr_first = lr_last if lr_first is None else lr_first
            opt.step()
            sched.step_update(epoch * steps + step + 1)
            if ema is not None:
                ema.update(distiller.student.model)
            n = images.shape[0]
            with torch.no_grad():
                step_terms = torch.stack([terms[k].detach() for k in names])
                acc[:-1] += step_terms.double() * n
                acc[-1] += n
                first_bad.copy_(torch.where((first_bad < 0) & ~torch.isfinite(step_terms[-1]), step + 1, first_bad))
            bar.update(1)
            done_steps += 1
            stopping = stop_after_steps is not None and done_steps >= stop_after_steps
            if (step + 1) % READ_EVERY == 0 or step + 1 == steps or stopping:
                sums, seen = _read_terms(acc, first_bad, names, world, epoch, step)
                bar.set_postfix({k: f"{sums[k] / seen:.3g}" for k in ("loss", "task", "kd", "main_direct")}
                                | {"img/s": f"{seen / (time.perf_counter() - t0):.1f}"})
            if stopping:
                bar.close()
                return {"stopped": True, "epoch": epoch, "step": step + 1} | _rank_of(world)
        bar.close()
        sums, seen = _read_terms(acc, first_bad, names, world, epoch, min(step, steps - 1))  # every rank, once more
        seconds = time.perf_counter() - t0
        if world:  # running BN statistics: DDP copies rank 0's buffers before each forward; their mean, as timm's train.py
            timm.utils.distribute_bn(trainable, world.size, reduce=True)
            if ema is not None:  # the EMA's buffers too (timm's train.py): one exported, evaluated EMA on every rank
                timm.utils.distribute_bn(ema.module, world.size, reduce=True)
        val = evaluate(distiller.student.model, spec.val, device, distiller.student.input_size, world=world,
                       workers=spec.workers, progress=progress, desc=f"validation {epoch + 1}/{rec['epochs']}")
        # epochs counted from 1, as on the console and the plot; lr: the first and last step's
        record = {"epoch": epoch + 1, "view": data.view_of(epoch), "train": {k: v / max(seen, 1) for k, v in sums.items()},
                  "val": val, "lr": lr_first, "lr_last": lr_last, "samples": seen, "seconds": round(seconds, 2),
                  "samples_per_s": round(seen / seconds, 2) if seconds else None}
        if ema is not None:  # the moving average beside the raw student, every epoch
            record["val_ema"] = evaluate(ema.module, spec.val, device, distiller.student.input_size, world=world,
                                         workers=spec.workers, progress=progress,
                                         desc=f"validation (EMA) {epoch + 1}/{rec['epochs']}")
        metrics.append(record)
        def save(epoch=epoch):
            _save_epoch(out, ckpt_path, metrics, {"spec": _resume_key(spec), "epoch": epoch, "trainable": trainable.state_dict(),
                                                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                  "metrics": json.dumps(metrics)} | _rng_states(device)
                        | ({"ema": ema.module.state_dict()} if ema is not None else {}))

        # rank 0 alone writes; its error (a full disk) is raised on every rank, so none waits forever
        world.from_main(save) if world else save()
        log(f"epoch {epoch + 1}: loss {record['train']['loss']:.4f}"
            + (f", val top-1 {val['top1']:.1f}% top-5 {val['top5']:.1f}%" if val else "")
            + (f" (EMA {record['val_ema']['top1']:.1f}% / {record['val_ema']['top5']:.1f}%)" if record.get("val_ema") else "")
            + f", {record['samples_per_s']} samples/s")
    student_file = out / STUDENT_FILE
    # the recipe's evaluated weights are the ones exported: the moving average where it is evaluated on
    exported = "ema" if ema is not None and rec["ema_eval"] else "student"
    final = ema.module if exported == "ema" else distiller.student.model

    def finish():
        from .export import export_timm_folder

        export_student(final, student_file)
        folder = export_timm_folder(final, out / STUDENT_FOLDER, distiller.student.input_size)
        if not folder["plain_timm"]:
            log(f"{folder['folder']}: no timm name rebuilds {folder['architecture']}; load it after "
                f"`import scalekd.student`, which registers that name")
        log(f"exported the {'moving average (EMA) of the student' if exported == 'ema' else 'student'} to "
            f"{student_file} and {out / STUDENT_FOLDER}")
        return _plot(metrics, out / PLOT_FILE, title) if metrics else None

    plot = world.from_main(finish) if world else finish()  # every rank returns once the files are there
    return {"student": str(student_file), "student_folder": str(out / STUDENT_FOLDER),
            "metrics": str(out / METRICS_FILE), "plot": str(plot) if plot else None,
            "job_spec": str(out / JOB_SPEC_FILE), "exported": exported,
            "checkpoint": str(ckpt_path), "last": metrics[-1] if metrics else None} | _rank_of(world)


def _rng_states(device: torch.device) -> dict:
    """The random streams a resumed run must continue: the CPU's, and on a GPU its own (drop-path masks
    are drawn there)."""
    return {"rng": torch.get_rng_state()} | (
        {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})


def _restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:  # a checkpoint from a CPU run resumed on a GPU: seeded as fresh
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _read_terms(acc: torch.Tensor, first_bad: torch.Tensor, names, world: World | None, epoch: int, step: int):
    """The epoch's sums so far ({term: Σ term × batch}, samples), over every rank: one wait for the device.
    A NaN/Inf loss stops the run here, on every rank alike (the sums are the same everywhere)."""
    local = torch.cat([acc, first_bad.double().view(1)]).cpu()
    totals = world.sum(local[:-1]) if world else local[:-1]
    sums, seen = {k: float(totals[i]) for i, k in enumerate(names)}, int(totals[-1])
    if not math.isfinite(sums["loss"]):  # every rank is here alike: the sums are the same everywhere
        firsts = world.counts(int(local[-1])) if world else [int(local[-1])]
        where = f"step {min(b for b in firsts if b > 0)}" if max(firsts) > 0 else f"by step {step + 1}"
        raise FloatingPointError(f"loss became {sums['loss']} at epoch {epoch + 1}, {where} (read every {READ_EVERY} steps)")
    return sums, seen


def _rank_of(world: World | None) -> dict:
    return {"rank": world.rank, "world_size": world.size} if world else {}


def _read_checkpoint(path: Path, spec: TrainSpec) -> dict | None:
    """The checkpoint to resume from (None when there is none), refused if another configuration wrote it."""
    if not path.is_file():
        return None
    state = _load_checkpoint(path)
    if state["spec"] != _resume_key(spec):
        raise ValueError(f"{path} belongs to another run configuration ({_key_diff(json.loads(state['spec']), spec)}); "
                         f"start a new output folder, or pass --overwrite instead of --resume to replace it")
    return state


def _load_checkpoint(path: Path) -> dict:
    """A trainer checkpoint, loaded without running anything in it; refused, saying why, when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # a pickle with code in it, or not a torch file at all: nothing of it runs
        from .weights import refusal

        raise ValueError(f"checkpoint {path} cannot be loaded safely ({refusal(e)}); it is not this "
                         f"trainer's checkpoint: remove it or start a new output folder") from None
    if not isinstance(state, dict) or "spec" not in state:
        raise ValueError(f"checkpoint {path} is not this trainer's checkpoint (no 'spec' entry); remove it or "
                         f"start a new output folder")
    return state


def _resume_key(spec: TrainSpec) -> str:
    d = spec.to_dict()
    for volatile in ("workers", "device", "output", "verify_fingerprints", "on_corrupt", "channels_last", "data_root",
                     "teacher_checkpoint", "allow_incomplete", "check_views"):
        d.pop(volatile, None)
    return json.dumps(d, sort_keys=True)
