"""What only a GPU can show about correctness, checked against the CPU: one JSON of pass/fail rows.

    python3 bench/cuda_checks.py [--json out.json]

1. The model input made on the device (``views.to_model_input``: uint8 pixels from a pinning
   DataLoader, normalised and erased there) has the CPU's bits, for every erasing mode and layout.
2. An fp32 teacher's convolution (``teacher_precision(device, "fp32")``: cuDNN's TF32 off) is within
   float32 rounding of the CPU's, and the same convolution with TF32 on is not (so the check can fail).
3. The GPU's random stream is carried by a trainer checkpoint (``_rng_states`` / ``_restore_rng``).

Without a GPU it says so and compares the CPU with itself (a smoke run; exit status 0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.train_data import collate_skipping  # noqa: E402
from pipeline.trainer import _restore_rng, _rng_states  # noqa: E402
from pipeline.views import Erasing, to_model_input  # noqa: E402
from scalekd.targets import teacher_precision  # noqa: E402

MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (224, 224)


class _Items(torch.utils.data.Dataset):
    """Rendered-view stand-ins: uint8 (H, W, 3) pixels and each view's erasing, as a loader worker ships them."""

    def __init__(self, n: int, mode: str):
        self.n, self.mode = n, mode

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = np.random.default_rng(i)
        pixels = torch.from_numpy(g.integers(0, 256, (*SIZE, 3), dtype=np.uint8))
        boxes = [(0.1, 0.2, 0.3, 0.25)] if i % 2 == 0 else []  # some views erased, some not
        return {"image": pixels, "image_erasing": Erasing.of_views([(1000 + i, boxes)], SIZE, self.mode)}


def model_input_rows(device: torch.device) -> list[dict]:
    rows = []
    for mode in ("pixel", "rand", "const"):
        loader = torch.utils.data.DataLoader(_Items(8, mode), batch_size=8, collate_fn=collate_skipping,
                                             num_workers=2, pin_memory=device.type == "cuda")
        (batch,) = list(loader)
        for layout in (torch.contiguous_format, torch.channels_last):
            cpu = to_model_input(batch["image"], batch["image_erasing"], MEAN, STD, "cpu", False, layout)
            dev = to_model_input(batch["image"], batch["image_erasing"], MEAN, STD, device, True, layout)
            diff = (dev.cpu() - cpu).abs().max().item()
            rows.append({"check": "model input on the device = the CPU's, bit for bit", "erasing": mode,
                         "layout": "channels_last" if layout is torch.channels_last else "contiguous",
                         "pinned": bool(batch["image"].is_pinned()), "max_abs_diff": diff,
                         "ok": bool(torch.equal(dev.cpu(), cpu))})
    return rows


def conv_rows(device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 56, 56, generator=g), torch.randn(128, 64, 3, 3, generator=g) / 24
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    rel = lambda y: ((y.double().cpu() - ref).norm() / ref.norm()).item()  # noqa: E731
    with teacher_precision(device, "fp32"):
        fp32 = rel(torch.nn.functional.conv2d(x.to(device), w.to(device), padding=1))
    cpu = rel(torch.nn.functional.conv2d(x, w, padding=1))
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=True):
        tf32 = rel(torch.nn.functional.conv2d(x.to(device), w.to(device), padding=1))
    return [{"check": "fp32 teacher convolution: error against float64", "device_fp32": fp32, "cpu_fp32": cpu,
             "device_with_tf32": tf32, "ok": fp32 < 10 * max(cpu, 1e-7)}]


def rng_rows(device: torch.device) -> list[dict]:
    torch.manual_seed(5)
    saved = _rng_states(device)
    first = torch.rand(4, device=device).cpu()
    torch.rand(100, device=device)
    _restore_rng(saved, device)
    again = torch.rand(4, device=device).cpu()
    return [{"check": "a checkpoint's random streams replay the device's draws", "keys": sorted(saved),
             "ok": bool(torch.equal(first, again))}]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = model_input_rows(device) + conv_rows(device) + rng_rows(device)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no GPU: a smoke run)",
           "torch": torch.__version__, "rows": rows, "all_ok": all(r["ok"] for r in rows)}
    for r in rows:
        print(("ok  " if r["ok"] else "FAIL"), json.dumps(r))
    print("all_ok", out["all_ok"], "on", out["device"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
