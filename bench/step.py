"""Training-step benchmark at the paper's shapes (random weights, 224 px), side by side in one run.

    .venv/bin/python bench/step.py [--batch 4] [--repeats 3] [--quick] [--json out.json]

For each teacher (Swin-L; EVA/BEiT-L/14, a plain ViT-L/14) → ResNet-50, one process, one batch:
  (a) online   ScaleKD step, the whole teacher live
  (b) cached   ScaleKD step, targets read and decoded from a real cache on disk by the real loader
  (c) memory   ScaleKD step, targets already in memory (the bound caching can reach)
  (d) plain    ResNet-50 step, no distillation
Medians of `repeats` timed steps after one warm-up. Also: where the cached step's time goes
(student, each CAP, late, loss: each fwd+bwd alone), FLOPs of each (torch's FlopCounterMode),
and the one-batched-late-pass change measured before/after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache_job import run_cache_job  # noqa: E402
from pipeline.job_spec import CacheSpec, TrainSpec  # noqa: E402
from pipeline.trainer import build_run  # noqa: E402
from pipeline.train_data import collate_skipping  # noqa: E402
from pipeline.views import ViewConfig  # noqa: E402
from scalekd.targets import Targets  # noqa: E402

TEACHERS = {
    "swin_large_patch4_window7_224": {"kwargs": {}, "late_blocks": 2},
    "eva_large_patch14_196": {"kwargs": {"img_size": 224}, "late_blocks": 2},
}


def machine() -> dict:
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": gpu}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device) -> list[float]:
    return round_robin({"x": fn}, repeats, device)["x"]


def round_robin(fns: dict, repeats: int, device) -> dict[str, list[float]]:
    """One warm-up each, then `repeats` rounds that time every fn once in turn, so that drift of a
    shared machine (other load, clocks, the allocator's state) falls on all of them alike."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            out[k].append(time.perf_counter() - t)
    return out


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def make_cache(teacher: str, cfg: dict, work: Path, samples: int, device: str) -> Path:
    """A real cache (fp16, zarr) of a random-weight teacher on `samples` demo photos' tiles."""
    out = work / f"cache-{teacher}"
    spec = CacheSpec(name="bench", dataset={"kind": "demo", "root": str(ROOT / ".work/demo-data"), "split": "train"},
                     teacher={"name": teacher, "seed": 0, "kwargs": cfg["kwargs"], "late_blocks": cfg["late_blocks"]},
                     output=str(out), views=ViewConfig(per_image=1, seed=0), roles={"final": "fp16", "logits": "fp16"},
                     samples_per_shard=samples, batch_size=8, device=device)
    import pipeline.cache_job as cj
    from pipeline.datasets import Listing

    original = cj.list_dataset
    cj.list_dataset = lambda s: (lambda r: (Listing.from_refs(r[0][:samples]), r[1], r[2]))(original(s))
    try:
        run_cache_job(spec, engine="local", progress=False, log=lambda m: None)
    finally:
        cj.list_dataset = original
    return out


def bench_teacher(teacher: str, cfg: dict, work: Path, batch: int, repeats: int, workers: int, device,
                  bf16: bool | None = None, sweep: tuple[int, ...] = ()) -> dict:
    cache = make_cache(teacher, cfg, work, batch * (repeats + 2), device.type)  # at most the 240 demo tiles
    base = dict(name="bench", cache=str(cache), student="resnet50", output=str(work / "run"), recipe="traditional",
                batch_size=batch, workers=workers, device=device.type, lr=0.01)
    res: dict = {"teacher": teacher, "student": "resnet50", "batch": batch}

    # the online run holds the whole teacher; the cached one builds late alone
    _, data_on, dist_on, online, _ = build_run(TrainSpec(**base, targets="online"), device)
    _, data, dist, _, _ = build_run(TrainSpec(**base), device)
    for d in (dist, dist_on):
        d.train()
    opt = torch.optim.SGD([p for p in dist.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    opt_on = torch.optim.SGD([p for p in dist_on.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    b_on = collate_skipping([data_on[i] for i in range(batch)])
    b_mem = collate_skipping([data[i] for i in range(batch)])
    mem_targets = Targets.from_final(b_mem["final"].float().to(device), b_mem["logits"].float().to(device))
    x, y = data.to_device(b_mem, "image", device), b_mem["label"].to(device)
    amp = device.type == "cuda" if bf16 is None else bf16

    def step(distiller, optimizer, targets, images=x, labels=y, amp=amp):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = distiller(images, targets, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def online_step():
        step(dist_on, opt_on, online(data_on.to_device(b_on, "teacher_image", device)))

    loader_state = {"it": None, "wait": []}

    def fresh_loader():
        loader = DataLoader(data, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_skipping,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
        loader_state["loader"], loader_state["it"] = loader, iter(loader)

    def cached_step():
        t = time.perf_counter()
        try:
            b = next(loader_state["it"])
        except StopIteration:
            loader_state["it"] = iter(loader_state["loader"])
            b = next(loader_state["it"])
        loader_state["wait"].append(time.perf_counter() - t)
        targets = Targets.from_final(b["final"].to(device).float(), b["logits"].to(device).float())
        step(dist, opt, targets, data.to_device(b, "image", device), b["label"].to(device))

    import timm

    plain = timm.create_model("resnet50", num_classes=1000).to(device).train()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)

    def plain_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(plain(x).float(), y)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    teacher_images = data_on.to_device(b_on, "teacher_image", device)

    def teacher_forward():
        online(teacher_images)

    fresh_loader()
    fns = {"online": online_step, "cached": cached_step, "memory": lambda: step(dist, opt, mem_targets),
           "plain": plain_step, "teacher_forward": teacher_forward}
    if amp:  # our trainer and cache run the teacher in fp32 (cached = online); a bf16 online teacher for comparison

        def online_bf16_step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                targets = online(data_on.to_device(b_on, "teacher_image", device))
            step(dist_on, opt_on, Targets.from_final(targets.final.float(), targets.logits.float()))

        fns["online_bf16_teacher"] = online_bf16_step
    times = round_robin(fns, repeats, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["seconds_per_step"] = {k: round(v, 4) for k, v in med.items()}
    res["all_seconds"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    res["loader_wait_median_s"] = round(statistics.median(loader_state["wait"][1:] or [0.0]), 4)
    # round robin lets the loader's workers read ahead while the other steps run; back to back they
    # cannot: the cached step alone, `2 × repeats` in a row (the rate a training run sees), on the
    # cache repeated so that no epoch restart (workers refilling from empty) falls inside the timing
    n = 2 * repeats

    def back_to_back(w: int) -> dict:
        long = torch.utils.data.ConcatDataset([data] * -(-(n + 2 + w) * batch // len(data)))
        loader = DataLoader(long, batch_size=batch, shuffle=False, num_workers=w, collate_fn=collate_skipping,
                            pin_memory=device.type == "cuda", drop_last=True)
        loader_state["loader"], loader_state["it"] = loader, iter(loader)
        cached_step()
        time.sleep(1.0)  # the workers' first batches: a run's start, not its rate
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            cached_step()
        _sync(device)
        out = {"s": round((time.perf_counter() - t) / n, 4),
               "wait_median_s": round(statistics.median(loader_state["wait"][-n:]), 4),
               "wait_max_s": round(max(loader_state["wait"][-n:]), 4)}
        loader_state["it"] = loader_state["loader"] = None  # its workers end before the next count's start
        return out

    b2b = back_to_back(workers)
    res["cached_back_to_back_s"] = b2b["s"]
    res["loader_wait_back_to_back_median_s"] = b2b["wait_median_s"]
    res["loader_wait_back_to_back_max_s"] = b2b["wait_max_s"]
    if sweep:  # the same back to back with other worker counts: the CPU the workers take from the step's thread
        res["back_to_back_by_workers"] = {str(w): back_to_back(w) for w in sweep}
    # what the measured teacher forward allows: online = cached step + teacher forward
    res["a/b_expected_by_time"] = round((med["memory"] + med["teacher_forward"]) / med["memory"], 3)
    res["ratios"] = {"a/b online/cached": round(med["online"] / med["cached"], 3),
                     **({"a/b with a bf16 online teacher": round(med["online_bf16_teacher"] / med["cached"], 3)}
                        if amp else {}),
                     "b/c cached/memory": round(med["cached"] / med["memory"], 3),
                     "b/c back to back": round(res["cached_back_to_back_s"] / med["memory"], 3),
                     "b/d cached/plain": round(med["cached"] / med["plain"], 3)}

    # the loader alone, one process with one torch thread (= one worker): samples/s against the student's rate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    n = 0
    for i in range(len(data)):
        data[i]
        n += 1
    per_worker = n / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    res["loader"] = {"samples_per_s_per_worker": round(per_worker, 2),
                     "student_step_samples_per_s": round(batch / med["memory"], 2),
                     "workers_needed": round((batch / med["memory"]) / per_worker, 3)}

    # FLOPs: what caching can save is the teacher's forward
    f_teacher = flops(lambda: online.split.targets(data_on.to_device(b_on, "teacher_image", device)))
    f_step = flops(lambda: step(dist, opt, mem_targets))
    expected = (f_step + f_teacher) / f_step
    res["gflop_per_image"] = {"teacher_forward": round(f_teacher / batch / 1e9, 2),
                              "cached_step_fwd_bwd": round(f_step / batch / 1e9, 2)}
    res["a/b_expected_by_flops"] = round(expected, 3)
    res["a/b_over_expected"] = round(res["ratios"]["a/b online/cached"] / expected, 3)

    # where the cached step's time goes: each part fwd+bwd alone, same shapes
    res["breakdown_s"] = breakdown(dist, x, mem_targets, repeats, device)
    # the batched-late change, before/after (same numbers: tests/test_gradients.py)
    def with_batch_late(flag):
        def run():
            dist.batch_late = flag
            step(dist, opt, mem_targets)
        return run

    ab = round_robin({"two": with_batch_late(False), "one": with_batch_late(True)}, repeats, device)
    dist.batch_late = True
    two_pass, one_pass = statistics.median(ab["two"]), statistics.median(ab["one"])
    res["batched_late"] = {"two_passes_s": round(two_pass, 4), "one_batched_pass_s": round(one_pass, 4),
                           "speedup": round(two_pass / one_pass, 3)}
    if device.type == "cuda":  # precision and layout of the in-memory step, before/after
        try:
            res["cuda_variants_s"] = cuda_variants(dist, opt, step, mem_targets, x, repeats, device)
        except Exception as e:  # a variant that does not run on this card is a finding, not a crash
            res["cuda_variants_s"] = {"error": f"{type(e).__name__}: {e}"}
    return res


def cuda_variants(dist, opt, step, targets, x, repeats, device) -> dict:
    """fp32 (TF32 off, torch's default), TF32, bf16 autocast (the bench's default), bf16 + channels-last."""
    out = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    runs = {"fp32": lambda: step(dist, opt, targets, amp=False), "bf16": lambda: step(dist, opt, targets)}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out.update(round_robin(runs, repeats, device))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out["tf32"] = timed(lambda: step(dist, opt, targets, amp=False), repeats, device)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    dist.student.to(memory_format=torch.channels_last)
    dist.caps.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    out["bf16_channels_last"] = timed(lambda: step(dist, opt, targets, images=xc), repeats, device)
    return {k: round(statistics.median(v), 4) for k, v in out.items()}


def breakdown(dist, x, targets, repeats, device) -> dict:
    student, caps, late = dist.student, dist.caps, dist.late
    with torch.no_grad():
        s3, s4, _ = student(x)
        q = caps["s3_direct"](s3)
        proxy = late(q)
    parts = {}

    def student_part():
        a, b, c = student(x)
        (a.float().mean() + b.float().mean() + c.float().mean()).backward()

    parts["student"] = student_part
    for name in ("s3_direct", "s3_dc"):
        parts[f"cap_{name}"] = lambda n=name: caps[n](s3.detach()).mean().backward()
    for name in ("s4_direct", "s4_dc"):
        parts[f"cap_{name}"] = lambda n=name: caps[n](s4.detach(), queries=proxy.detach().requires_grad_()).mean().backward()
    parts["late_both_views"] = lambda: late(torch.cat([q, q]).detach().requires_grad_()).mean().backward()

    def loss_part():
        from scalekd.losses import dual_view_loss

        a = proxy.detach().requires_grad_()
        sum(dual_view_loss(a, a, targets.final, targets.final_dc_removed, 1.0, 1.0)).backward()

    parts["loss_one_path"] = loss_part
    return {k: round(statistics.median(v), 4) for k, v in round_robin(parts, repeats, device).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 on CPU, to keep make bench "
                   "near 10 minutes on 2 cores; 5 on CUDA)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers for (b); default 0 on CPU (a worker would take one of the cores the step "
                        "uses, so reading is paid in series and shows in b/c), 4 on GPU")
    p.add_argument("--sweep-workers", type=int, nargs="*", default=[],
                   help="also time the cached step back to back with each of these loader worker counts")
    p.add_argument("--teachers", nargs="*", default=list(TEACHERS))
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the steps (default: on CUDA only)")
    p.add_argument("--quick", action="store_true", help="Swin-L only, batch 2, 1 repeat (a smoke run, not a measurement)")
    p.add_argument("--json", default=str(ROOT / "bench/results-step.json"))
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = a.batch or (64 if device.type == "cuda" else 4)
    workers = a.workers if a.workers is not None else (4 if device.type == "cuda" else 0)
    teachers, repeats = a.teachers, a.repeats or (5 if device.type == "cuda" else 3)
    if a.quick:
        teachers, batch, repeats = teachers[:1], 2, 1
    (ROOT / ".work").mkdir(exist_ok=True)
    results = {"machine": machine(), "device": device.type, "results": []}
    with tempfile.TemporaryDirectory(dir=ROOT / ".work") as work:
        for t in teachers:
            r = bench_teacher(t, TEACHERS[t], Path(work), batch, repeats, workers, device, a.bf16, tuple(a.sweep_workers))
            results["results"].append(r)
            print(json.dumps(r, indent=1), flush=True)
            Path(a.json).write_text(json.dumps(results, indent=1))  # after each teacher: a cut run keeps some
    print(f"wrote {a.json}")


if __name__ == "__main__":
    sys.exit(main())
