"""scalekd-pipeline: a thin typer layer over the library functions in ``pipeline``.

Exit codes: 0 done; 1 the command ran and failed (a runtime error, or --verify found problems);
2 the command line or the job spec is wrong (unknown option or choice, missing file, invalid spec).
"""
from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import NoReturn, Optional

import typer

from .recipes import ALIASES, RECIPES

app = typer.Typer(
    help="ScaleKD with an offline teacher-feature cache: cache a teacher's features once, distil many students.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Choices as enums: --help and shell completion list them, and a wrong value is a usage error (exit 2).
class Format(str, Enum):
    zarr = "zarr"
    webdataset = "webdataset"


class Engine(str, Enum):
    ray = "ray"
    local = "local"


class TargetSource(str, Enum):
    cache = "cache"
    online = "online"


Recipe = Enum("Recipe", {name: name for name in (*RECIPES, *ALIASES)}, type=str)  # pipeline/recipes.py's names

DEVICES = ("auto", "cpu", "cuda")


def _device(value: str | None) -> str | None:
    """auto, cpu, cuda or cuda:N (a choice list cannot hold every N, so it is checked here)."""
    if value is None or value in DEVICES or re.fullmatch(r"cuda:\d+", value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in (*DEVICES, "cuda:0") if d.startswith(incomplete)]


def _value(choice):
    return choice.value if isinstance(choice, Enum) else choice


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"scalekd-pipeline {version('scalekd-pipeline')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            typer.echo("scalekd-pipeline (not installed)")
        raise typer.Exit()


def _usage_error(e: Exception) -> NoReturn:
    """The command line or the job spec is wrong: exit 2."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _runtime_error(e: Exception) -> NoReturn:
    """The command ran and failed: exit 1."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Cache a teacher's features (cache-teacher), train students from the cache (distill), look into a
    cache (inspect-shards), show a teacher split (teacher-info)."""


@app.command("teacher-info")
def teacher_info(
    name: str = typer.Argument(..., help="timm model name of the teacher, e.g. swin_large_patch4_window7_224"),
    checkpoint: Optional[Path] = typer.Option(None, help="local weights (.safetensors or a torch state dict): "
                                                         "checked against the model, its sha256 shown"),
    late_blocks: int = typer.Option(2, help="transformer blocks in the late part (plain ViT teachers)"),
    kwargs: Optional[str] = typer.Option(None, "--kwargs", metavar="JSON",
                                         help='timm model arguments, as the job spec\'s teacher.kwargs, e.g. \'{"num_classes": 1000}\''),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Show where a teacher is split into early and late, and the shapes that cross the split.

    The model is built on the meta device: no weights are initialised or loaded.
    """
    from .teacher_report import describe_teacher

    model_kwargs = _json_object(kwargs, "--kwargs")
    try:
        info, warnings = describe_teacher(name, checkpoint=checkpoint, late_blocks=late_blocks, **model_kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>18}: {value}")


def _json_object(text: str | None, option: str) -> dict:
    """A JSON object given on the command line ({} when not given); a usage error otherwise."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not valid JSON ({e.msg} at character {e.pos}): {text}", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"expected a JSON object such as '{{\"num_classes\": 1000}}', found {text}",
                                 param_hint=option)
    return value


def main() -> None:  # pragma: no cover
    app()


@app.command("cache-teacher")
def cache_teacher(
    job: Path = typer.Argument(Path("jobs/demo.yaml"), help="job spec (YAML); its `cache:` section is used"),
    # str, not Path: Path("s3://b/c") would become "s3:/b/c", and the spec's URL check would name the wrong thing
    output: Optional[str] = typer.Option(None, "--output", "-o", help="cache folder (overrides the spec)"),
    fmt: Optional[Format] = typer.Option(None, "--format", help="cache format (overrides the spec)"),
    views: Optional[int] = typer.Option(None, "--views", "-k", help="views per image K (overrides the spec)"),
    actors: Optional[int] = typer.Option(None, help="teacher actors (one per GPU where there are GPUs)"),
    batch_size: Optional[int] = typer.Option(None, help="teacher batch size"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    engine: Engine = typer.Option(Engine.ray, help="ray, or local (the same stages in this process, no Ray)"),
    overwrite: bool = typer.Option(False, help="replace a cache of another configuration in the output folder (only a "
                                               "cache's own files are removed; a folder holding anything else is refused)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Run the teacher once over K replayable views of every image and write its features to a cache.

    Re-running the same job resumes: committed shards are kept, half-written ones are redone.
    """
    from .job_spec import load_cache_spec

    try:
        spec = load_cache_spec(job, output=output, format=_value(fmt), actors=actors,
                               batch_size=batch_size, address=address)
        if views is not None:
            from dataclasses import replace

            from pydantic import ValidationError

            from .job_spec import spec_error

            try:
                spec.views = replace(spec.views, per_image=views)
            except ValidationError as e:
                raise spec_error(e, "--views", "views") from None
    except (ValueError, FileNotFoundError) as e:
        _usage_error(e)
    _print_summary(_run_cache_job(spec, overwrite=overwrite, engine=_value(engine)), as_json)


def _run_cache_job(spec, **kw) -> dict:
    """The cache job with the CLI's logging; a failure it explains exits 1 with its message."""
    from .cache_job import CacheConfigError, run_cache_job
    from .datasets import DatasetError
    from .shards import CacheWriteError

    try:
        return run_cache_job(spec, log=lambda m: typer.echo(m, err=True), **kw)
    except (ValueError, FileNotFoundError, DatasetError, CacheConfigError, CacheWriteError, FloatingPointError) as e:
        _runtime_error(e)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key:>18}: {value}")


@app.command("inspect-shards")
def inspect_shards(
    path: Path = typer.Argument(..., help="a cache folder (the one holding manifest.json)"),
    verify_: bool = typer.Option(False, "--verify", help="check every shard's checksum, schema and completeness"),
    recompute_: int = typer.Option(0, "--recompute", metavar="N", help="re-run the teacher on N stored views and compare"),
    check_late_: int = typer.Option(0, "--check-late", metavar="N",
                                    help="run the teacher's late alone on N stored mid views and compare with the "
                                         "stored final (needs a cache with the mid role; no early part, no images)"),
    late_checkpoint: Optional[Path] = typer.Option(None, "--late-checkpoint",
                                                   help="with --check-late: the late weights to check (default: the "
                                                        "cache's own checkpoint)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the final features' frequency spectrum to this PNG"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """What is in a cache, is it intact, and what does its spectrum look like.

    Exits 1 when --verify finds a corrupt, missing or extra shard (each is named), or when
    --check-late finds late's output on stored mid differing from stored final; 2 when PATH is not a cache.
    """
    from .inspect_cache import check_late, describe, plot_spectrum, recompute, verify
    from .schema import MANIFEST, ManifestError

    if not (path / MANIFEST).is_file():  # the argument names no cache: a usage error
        _usage_error(ManifestError(f"{path} is not a teacher cache: {MANIFEST} is missing"))
    checked = None
    try:
        # --verify first: a damaged cache must still get its list of problems, even where it
        # cannot be described
        checked = verify(path) if verify_ else None
        report = describe(path)
        if checked is not None:
            report["verify"] = checked
        if recompute_:
            report["recompute"] = recompute(path, recompute_)
        if check_late_:
            report["check_late"] = check_late(path, check_late_, checkpoint=late_checkpoint)
        if plot:
            report["plot"] = str(plot_spectrum(path, plot))
    except (ManifestError, ValueError, FileNotFoundError, OSError) as e:
        if checked is None:
            _runtime_error(e)
        report = {"cache": str(path), "error": str(e), "roles": {}, "verify": checked}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(dict(report))
    if (checked is not None and not checked["ok"]) or not report.get("check_late", {}).get("ok", True):
        raise typer.Exit(1)


def _print_report(report: dict) -> None:
    roles = report.pop("roles")
    checks = {k: report.pop(k) for k in ("verify", "recompute", "check_late", "plot") if k in report}
    for key, value in report.items():
        typer.echo(f"{key:>26}: {value}")
    typer.echo(f"{'roles':>26}:")
    for name, r in roles.items():
        typer.echo(f"{name:>26}  shape {r['shape']}  codec {r['codec']}  stored as {r['stored']}")
    if "verify" in checks:
        v = checks["verify"]
        typer.echo(f"{'verify':>26}: {'OK' if v['ok'] else 'FAILED'} ({v['shards']} shards)")
        for p in v["problems"]:
            typer.echo(f"{'':>28}{p}")
    if "recompute" in checks:
        r = checks["recompute"]
        typer.echo(f"{'recompute':>26}: {r['views_checked']} views; max |diff| {r['max_abs_diff']}; "
                   f"max rel L2 {r['max_rel_l2']}; fingerprint mismatches {len(r['fingerprint_mismatches'])}")
    if "check_late" in checks:
        r = checks["check_late"]
        typer.echo(f"{'check-late':>26}: {'OK' if r['ok'] else 'MISMATCH'}: late({r['checkpoint']}) on "
                   f"{r['views_checked']} stored mid views; max rel L2 {r['max_rel_l2']} (tolerance "
                   f"{r['tolerance']}); max |diff| {r['max_abs_diff']}")
    if "plot" in checks:
        typer.echo(f"{'spectrum plot':>26}: {checks['plot']}")


def _cache_first(job: Path, spec) -> None:
    """distill --cache-first: make (or finish) the job's own cache before training from it."""
    from .job_spec import load_cache_spec
    from .schema import MANIFEST

    try:
        cache_spec = load_cache_spec(job)
    except (ValueError, FileNotFoundError) as e:
        _usage_error(e)
    if Path(cache_spec.output).resolve() != Path(spec.cache).resolve():
        _usage_error(ValueError(f"--cache-first: {job}'s cache section writes {cache_spec.output}, but its distill "
                                f"section trains from {spec.cache}"))
    try:
        done = json.loads((Path(spec.cache) / MANIFEST).read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        done = False
    if done:
        return
    _run_cache_job(cache_spec, engine="ray")  # as cache-teacher runs it


@app.command("distill")
def distill(
    job: Path = typer.Argument(Path("jobs/demo.yaml"), help="job spec (YAML); its `distill:` section is used"),
    targets: Optional[TargetSource] = typer.Option(None, help="cache: read the cache; online: run the whole teacher live"),
    cache: Optional[Path] = typer.Option(None, help="cache folder (overrides the spec)"),
    student: Optional[str] = typer.Option(None, help="timm name of the student (overrides the spec)"),
    recipe: Optional[Recipe] = typer.Option(None, metavar="NAME", help="training recipe (pipeline/recipes.py): "
                                            + ", ".join(RECIPES) + "; earlier names " + ", ".join(ALIASES)),
    epochs: Optional[int] = typer.Option(None, help="epochs (overrides the recipe)"),
    batch_size: Optional[int] = typer.Option(None, help="batch size (overrides the recipe)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (overrides the recipe)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run folder (overrides the spec)"),
    workers: Optional[int] = typer.Option(None, help="loader worker processes"),
    device: Optional[str] = typer.Option(None, metavar="[auto|cpu|cuda|cuda:N]", parser=_device,
                                         autocompletion=_complete_device, help="where to train"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    resume: bool = typer.Option(False, help="continue from the run folder's checkpoint"),
    overwrite: bool = typer.Option(False, help="replace the run in the output folder (its checkpoint, metrics, student)"),
    allow_incomplete: bool = typer.Option(False, help="train on a cache whose job has not finished"),
    verify_fingerprints: bool = typer.Option(False, help="check every replayed view against its stored fingerprint"),
    skip_corrupt: bool = typer.Option(False, help="skip samples whose cache entry cannot be read, instead of stopping"),
    data_root: Optional[Path] = typer.Option(None, help="where the cache's dataset is now (a copied cache); its "
                                             "listing is checked against the cache's"),
    teacher_checkpoint: Optional[Path] = typer.Option(None, help="where the teacher checkpoint is now (a copied "
                                                      "cache); its sha256 is checked against the cache's"),
    as_json: bool = typer.Option(False, "--json", help="print where the files are and the last epoch's metrics as JSON"),
    cache_first: bool = typer.Option(False, help="first run the job's `cache:` section (as cache-teacher) when its cache "
                                                 "is missing or unfinished; nothing is redone when it is complete"),
):
    """Train a student from a teacher cache, running only the teacher's late part online (for TPP).

    Ends by printing where the exported student (a timm model folder: timm.create_model("local-dir:RUN/student", pretrained=True)), the metrics (JSONL), the plot of the curves and the resolved job spec are.

    On N processes: torchrun --nproc_per_node=N -m pipeline.cli distill JOB.yaml (batch_size stays the global batch, shared equally among the processes).
    """
    from .datasets import BadImage
    from .job_spec import load_train_spec
    from .late import CacheMismatchError
    from .schema import ManifestError
    from .train_data import ReplayError
    from .trainer import CheckpointWriteError, train

    try:
        spec = load_train_spec(job, targets=_value(targets), cache=str(cache) if cache else None, student=student,
                               recipe=_value(recipe), epochs=epochs, batch_size=batch_size, lr=lr,
                               output=str(output) if output else None, workers=workers, device=device, seed=seed,
                               verify_fingerprints=verify_fingerprints or None,
                               on_corrupt="skip" if skip_corrupt else None, allow_incomplete=allow_incomplete or None,
                               data_root=str(data_root.resolve()) if data_root else None,
                               teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None)
    except (ValueError, FileNotFoundError) as e:
        _usage_error(e)
    if cache_first:
        _cache_first(job, spec)
    try:
        result = train(spec, resume=resume, overwrite=overwrite, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError, CacheMismatchError, ManifestError, BadImage, ReplayError,
            CheckpointWriteError, FloatingPointError) as e:
        _runtime_error(e)
    if result.get("rank", 0):  # under torchrun rank 0 alone reports
        return
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"student:    {result['student_folder']}")
    typer.echo(f"weights:    {result['student']}")
    typer.echo(f"metrics:    {result['metrics']}")
    typer.echo(f"plot:       {result['plot']}")
    typer.echo(f"checkpoint: {result['checkpoint']}")
    typer.echo(f"job spec:   {result['job_spec']}")


if __name__ == "__main__":  # python -m pipeline.cli, e.g. under `ray job submit`
    main()
