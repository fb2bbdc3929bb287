"""The teacher's precision (teacher.precision: fp32 | bf16 | fp16): speed, and error against fp32.

    .venv/bin/python bench/precision.py [--quick] [--teachers NAME ...] [--batch B] [--repeats R] [--json out.json]

For each teacher (random timm weights, seeded: no pretrained ViT ships here) the same batch of
views (scikit-image's sample photos, centre-cropped and resized to the teacher's input, each
normalised by timm's pretrained_cfg) runs through early + late (what the cache job runs) at each
precision this device supports (fp16 needs CUDA: scalekd.targets.teacher_precision). Timing: the
precisions interleaved round-robin, R repeats, medians, and the ratio to fp32 of the same round.
Error of each precision's outputs against fp32's, on F (final), on φ(F) = F minus its
per-channel token mean (what the DC-removed loss compares) and on the logits:
relative L2 ‖F_p − F_32‖ / ‖F_32‖ over the batch, and the worst token's cosine (over channels).
Random weights are not a pretrained teacher's: the errors show the arithmetic, not a real map's statistics.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.weights import load_teacher  # noqa: E402
from scalekd.dc import dc_removed  # noqa: E402
from scalekd.targets import PRECISIONS, teacher_precision  # noqa: E402
from step import machine  # noqa: E402

TEACHERS = ["swin_large_patch4_window7_224", "eva_large_patch14_196"]


def photos(n: int, size: tuple[int, int], mean, std) -> torch.Tensor:
    """n of scikit-image's sample photos (cycled), centre-cropped square, resized: (n, 3, H, W) normalised."""
    from PIL import Image

    try:
        import skimage.data as d

        imgs = [d.astronaut(), d.chelsea(), d.coffee(), d.rocket()]
    except ImportError:  # a GPU image without scikit-image: the demo dataset's tiles of the same photos, carried
        tiles = sorted((ROOT / ".work" / "demo-data").rglob("*.png"))
        if not tiles:
            raise SystemExit("no scikit-image and no .work/demo-data: install scikit-image or build the demo data")
        imgs = [np.asarray(Image.open(tiles[i * len(tiles) // 4]).convert("RGB")) for i in range(4)]
    out = []
    for i in range(n):
        a = imgs[i % len(imgs)]
        s = min(a.shape[:2])
        y, x = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
        im = Image.fromarray(a[y : y + s, x : x + s]).resize(size[::-1], Image.BICUBIC)
        if i >= len(imgs):  # more views than photos: flip, so no two views are alike
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(im))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def errors(p: torch.Tensor, ref: torch.Tensor) -> dict:
    """p, ref: (B, N, C) or (B, classes) float32 → relative L2 and the worst token cosine."""
    rel = float((p - ref).norm() / ref.norm())
    if p.ndim == 2:
        return {"rel_l2": rel, "top1_agree": float((p.argmax(-1) == ref.argmax(-1)).float().mean())}
    cos = torch.nn.functional.cosine_similarity(p, ref, dim=-1)
    return {"rel_l2": rel, "worst_token_cos": float(cos.min())}


def bench_teacher(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    split, _ = load_teacher(name, device=device)
    info = split.info
    x = photos(batch, tuple(info.input_size[1:]), info.mean, info.std).to(device)
    precisions = [p for p in PRECISIONS if p != "fp16" or device.type == "cuda"]

    def run(p):
        with torch.inference_mode(), teacher_precision(device, p):
            out = split.targets(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {k: out[k].float() for k in ("final", "logits")}

    outs = {p: run(p) for p in precisions}  # warm-up, and the outputs compared
    times = {p: [] for p in precisions}
    for _ in range(repeats):  # round-robin: a slow moment of a shared machine hits every precision alike
        for p in precisions:
            t = time.perf_counter()
            run(p)
            times[p].append(time.perf_counter() - t)
    ref = outs["fp32"]
    rows = {}
    for p in precisions:
        ratio = statistics.median(a / b for a, b in zip(times["fp32"], times[p]))
        rows[p] = {"seconds_per_batch": round(statistics.median(times[p]), 4),
                   "views_per_s": round(batch / statistics.median(times[p]), 3),
                   "speedup_over_fp32": round(ratio, 3),
                   "final": errors(outs[p]["final"], ref["final"]),
                   "final_dc_removed": errors(dc_removed(outs[p]["final"]), dc_removed(ref["final"])),
                   "logits": errors(outs[p]["logits"], ref["logits"])}
    return {"teacher": name, "final_shape": list(ref["final"].shape[1:]), "batch": batch, "repeats": repeats,
            "precisions": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="*", default=TEACHERS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="Swin-L only, batch 4, 3 repeats")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=str(ROOT / "bench/results-precision.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.teachers, a.batch, a.repeats = TEACHERS[:1], 4, 3
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    result = {"machine": machine(), "device": device.type, "weights": "random (seed 0)",
              "views": "scikit-image sample photos", "teachers": [bench_teacher(t, a.batch, a.repeats, device)
                                                                  for t in a.teachers]}
    text = json.dumps(result, indent=1)
    Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
