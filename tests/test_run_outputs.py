"""What a run folder holds besides the student: metrics numbered as on the console, the resolved job
spec, a checkpoint of what resume needs and nothing else, and plots that say what they show."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _cache_helpers import TEACHER_NAME, make_imagefolder, make_spec, run, save_checkpoint
from pipeline.job_spec import TrainSpec, load_train_spec
from pipeline.plotting import pyplot
from pipeline.trainer import train

STUDENT = "test_resnet"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    data = make_imagefolder(root / "data", per_class=2, corrupt=False)
    cache = root / "cache"
    run(make_spec(data, cache, save_checkpoint(root / "teacher.safetensors"), samples_per_shard=6, per_image=2))
    spec = TrainSpec(name="t", cache=str(cache), student=STUDENT, output=str(root / "run"), recipe="demo", epochs=2,
                     batch_size=3, workers=0, student_input_size=64, device="cpu", lr=2e-3,
                     val={"kind": "imagefolder", "root": str(data)})
    logs = []
    result = train(spec, progress=False, log=logs.append)
    return {"root": root, "data": data, "cache": cache, "spec": spec, "result": result, "logs": logs}


def _metrics(world) -> list[dict]:
    return [json.loads(line) for line in Path(world["result"]["metrics"]).read_text().splitlines()]


def test_metrics_number_epochs_as_the_console_does_and_record_each_epochs_lr(world):
    records = _metrics(world)
    assert [m["epoch"] for m in records] == [1, 2]
    assert [line.split(":")[0] for line in world["logs"] if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    for m in records:
        assert 0 < m["lr"] <= 2e-3 and 0 < m["lr_last"] <= 2e-3
    # warm-up over epoch 1 (demo recipe: 1 warm-up epoch), then the cosine decays over epoch 2
    assert records[0]["lr"] < records[0]["lr_last"] and records[1]["lr"] > records[1]["lr_last"]


def test_the_run_folder_holds_the_resolved_job_spec_which_reruns_it(world):
    path = Path(world["result"]["job_spec"])
    assert path == Path(world["spec"].output) / "job.yaml"
    assert load_train_spec(path).to_dict() == world["spec"].to_dict()
    assert "# Recipe 'demo' as applied: " in path.read_text() and '"lr": 0.002' in path.read_text()
    # the loss as applied: the preset's values and the student's stage-4 tap, defaults included
    loss = json.loads(path.read_text().split("# Loss as applied: ")[1].split("\n")[0])
    assert loss["stage4_norm"] is False and loss["alpha"] > 0 and loss["heads_stage3"] >= 1


def test_the_checkpoint_holds_the_student_the_caps_and_adamws_moments_and_nothing_else(world):
    state = torch.load(world["result"]["checkpoint"], map_location="cpu", weights_only=True)
    assert set(state) == {"spec", "epoch", "trainable", "optimizer", "scheduler", "rng", "metrics"}
    trainable = state["trainable"]
    assert {k.split(".")[0] for k in trainable} == {"student", "caps"}  # no teacher weight
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert len(moments) == 2 * len(state["optimizer"]["state"])
    # two AdamW moments per trainable parameter: the checkpoint is about 3x the student and CAPs
    assert nbytes(moments) == 2 * sum(p.numel() * p.element_size() for p in _trainable_parameters(world))
    total = nbytes(trainable.values()) + nbytes(moments)
    assert total <= Path(world["result"]["checkpoint"]).stat().st_size < total * 1.05 + 200_000


def _trainable_parameters(world):
    from pipeline.trainer import build_run

    _, _, distiller, _, _ = build_run(world["spec"], torch.device("cpu"))
    return [p for p in (*distiller.student.parameters(), *distiller.caps.parameters()) if p.requires_grad]


def _figures(monkeypatch) -> list:
    plt = pyplot()
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    return figs


def _overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_the_curves_plot_names_teacher_and_student_shows_the_lr_and_its_legends_cover_no_line(world, monkeypatch, tmp_path):
    from pipeline.trainer import _plot

    figs = _figures(monkeypatch)
    _plot(_metrics(world), tmp_path / "c.png", f"{TEACHER_NAME} → {STUDENT}")
    [fig] = figs
    assert fig._suptitle.get_text() == "vit_tiny_patch16_224 → test_resnet"
    assert [a.get_title() for a in fig.axes] == ["training loss (weighted terms)", "validation accuracy", "learning rate"]
    lr_axes = fig.axes[2]
    assert [list(line.get_ydata()) for line in lr_axes.get_lines()] == [[m["lr"] for m in _metrics(world)],
                                                                      [m["lr_last"] for m in _metrics(world)]]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) == len(ax.get_lines())
        assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer)), ax.get_title()
    assert [int(x) for x in fig.axes[0].get_lines()[0].get_xdata()] == [1, 2]


def test_the_spectrum_plot_names_the_teacher_the_views_it_averages_and_its_colour_scale(world, monkeypatch, tmp_path):
    from pipeline.inspect_cache import plot_spectrum

    figs = _figures(monkeypatch)
    plot_spectrum(world["cache"], tmp_path / "s.png", views=5)
    [fig] = figs
    assert fig._suptitle.get_text() == f"teacher {TEACHER_NAME}: final features (4x4 tokens), 5 views of 6 samples in cache"
    image_axes, bars_axes, colorbar_axes = fig.axes
    assert colorbar_axes.get_ylabel() == "mean |DCT coefficient| (over channels and views)"
    assert bars_axes.get_title() == "in order of u + v, then u (DC first, in red)"
    assert "zig-zag" not in " ".join(a.get_title() + a.get_xlabel() for a in fig.axes)


def test_validation_shows_a_progress_bar(world, capsys):
    import timm

    from pipeline.trainer import evaluate

    model = timm.create_model(STUDENT, num_classes=10)
    result = evaluate(model, world["spec"].val, torch.device("cpu"), (3, 64, 64), progress=True, desc="validation 1/2")
    err = capsys.readouterr().err
    assert result["images"] == 6 and "validation 1/2" in err and "6/6" in err


def test_validation_counts_are_the_top1_and_top5_of_each_image(world):
    """Counted on the device and read once: the same numbers as each image's logits checked one by one."""
    import timm
    from timm.data import create_transform

    from pipeline.datasets import list_dataset, load_image
    from pipeline.export import eval_data_config
    from pipeline.trainer import evaluate

    torch.manual_seed(1)
    model = timm.create_model(STUDENT, num_classes=10).eval()
    refs, _, _ = list_dataset(world["spec"].val)
    transform = create_transform(**eval_data_config(model, (3, 64, 64)), is_training=False)
    top1 = top5 = 0
    with torch.inference_mode():
        for ref in refs:
            logits = model(transform(load_image(ref))[None])[0]
            ranked = logits.topk(5).indices.tolist()
            top1 += ranked[0] == ref.label
            top5 += ref.label in ranked
    result = evaluate(model, world["spec"].val, torch.device("cpu"), (3, 64, 64), batch_size=4)
    assert result == {"top1": 100.0 * top1 / len(refs), "top5": 100.0 * top5 / len(refs), "images": len(refs)}
    assert 0 < top5 and top1 < len(refs)  # not trivially all or nothing
