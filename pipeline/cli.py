"""scalekd-pipeline: a thin typer layer over the library functions in ``pipeline``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="ScaleKD with an offline teacher-feature cache: cache a teacher's features once, distil many students.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Commands: teacher-info (more arrive as the pipeline grows)."""


@app.command("teacher-info")
def teacher_info(
    name: str = typer.Argument(..., help="timm model name of the teacher, e.g. swin_large_patch4_window7_224"),
    checkpoint: Optional[Path] = typer.Option(None, help="local weights (.safetensors or a torch state dict)"),
    late_blocks: int = typer.Option(2, help="transformer blocks in the late part (plain ViT teachers)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Show where a teacher is split into early and late, and the shapes that cross the split."""
    from .weights import load_teacher

    try:
        split, sha = load_teacher(name, checkpoint=checkpoint, late_blocks=late_blocks)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    info = split.info.to_dict() | {"checkpoint_sha256": sha}
    info |= {f"{part}_params": n for part, n in split.parameter_counts().items()}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>18}: {value}")


def main() -> None:  # pragma: no cover
    app()
