"""What is in a cache, is it intact, and what does its spectrum look like (``inspect-shards``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .reader import CacheReader
from .sample_index import INDEX_DIR, SampleIndex
from .schema import MANIFEST, SHARD_META, SHARD_PREFIX, ManifestError, read_manifest
from .shards import file_problems, verify_shard

__all__ = ["describe", "verify", "recompute", "check_late", "LATE_TOLERANCE", "dct_matrix", "spectrum", "plot_spectrum"]


def _view_indices(reader: CacheReader, n: int) -> list[tuple[int, int]]:
    """n (sample, view) pairs spread evenly over the cache, deterministic."""
    total = len(reader) * reader.num_views
    picks = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(int)) if total else []
    return [(int(p) // reader.num_views, int(p) % reader.num_views) for p in picks]


def _view_ops(views: dict) -> str:
    """The views' operations in order, as the job spec set them (pipeline/views.py)."""
    ops = [f"crop scale {list(views.get('scale', []))} ratio {[round(r, 4) for r in views.get('ratio', [])]}",
           f"flip {views.get('flip')}"]
    if views.get("rand_augment"):
        ops.append(f"RandAugment {views['rand_augment']}")
    if views.get("color_jitter"):
        ops.append(f"colour jitter {views['color_jitter']}")
    if views.get("erasing"):
        ops.append(f"erasing {views['erasing']} ({views.get('erasing_mode', 'pixel')}, up to "
                   f"{views.get('erasing_count', 1)} box)")
    return " → ".join(ops)


def describe(root: str | Path, energy_views: int = 64) -> dict:
    """The table inspect-shards prints: format, teacher, counts, roles, bytes, compression ratio (raw fp32
    bytes / bytes on disk, as in cache-teacher's summary), DC energy."""
    reader = CacheReader(root)
    m = reader.manifest
    views = m["num_samples"] * m["num_views"]
    stored = sum(s["bytes"] for s in m["shards"])
    roles = {}
    for name, r in m["roles"].items():
        raw = int(np.prod(r["shape"])) * 4
        roles[name] = {"shape": r["shape"], "codec": r["codec"],
                       "stored": {k: f"{v['dtype']}{v['shape']}" for k, v in r["fields"].items()},
                       "raw_fp32_bytes_per_view": raw}
    raw_total = views * sum(r["raw_fp32_bytes_per_view"] for r in roles.values())
    t = m["teacher"]
    out = {
        "cache": str(Path(root).resolve()), "format": m["format"], "complete": m["complete"],
        "teacher": t["name"], "checkpoint_sha256": t.get("checkpoint_sha256"), "split_point": t["split_point"],
        "teacher_precision": t.get("precision", "fp32"),  # caches from before the setting were made in fp32
        "teacher_input": f"{t['input_size'][1]}x{t['input_size'][2]} {t['interpolation']} mean={t['mean']} std={t['std']}",
        "samples": m["num_samples"], "views_per_sample": m["num_views"], "view_ops": _view_ops(m["views"]),
        "views": views, "shards": len(m["shards"]), "shards_expected": m.get("num_shards_expected"), "roles": roles,
        "bytes_on_disk": stored, "bytes_per_view": round(stored / views, 1) if views else None,
        "compression_ratio": round(raw_total / stored, 3) if stored else None,  # raw fp32 bytes / bytes on disk
        "skipped": len(m["skipped"]), "skipped_reasons": _reasons(m["skipped"]),
    }
    if "final" in reader.specs and len(reader):
        fractions, unreadable = [], 0
        for i, v in _view_indices(reader, energy_views):
            try:
                f = reader.read(i, v, ["final"])["final"].astype(np.float64)
            except ManifestError:  # a damaged shard: --verify names it; describe what can be read
                unreadable += 1
                continue
            fractions.append(f.shape[0] * (f.mean(0) ** 2).sum() / max((f ** 2).sum(), 1e-30))
        if unreadable:
            out["unreadable_views"] = unreadable
        if fractions:
            out["final_dc_energy_fraction"] = {"mean": round(float(np.mean(fractions)), 4),
                                               "min": round(float(np.min(fractions)), 4),
                                               "max": round(float(np.max(fractions)), 4), "views": len(fractions)}
    return out


def _reasons(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return counts


def verify(root: str | Path) -> dict:
    """Every shard's checksum, schema and completeness; problems name the shard and file."""
    root = Path(root)
    m = read_manifest(root)
    problems = []
    listed = {s["name"] for s in m["shards"]}
    for record in m["shards"]:
        found = verify_shard(root, record)
        problems += found
        if not found:
            problems += _check_schema(root, record, m)
    on_disk = {p.name for p in root.glob(f"{SHARD_PREFIX}*") if p.is_dir()}
    problems += [f"{name}: extra shard folder, not in {MANIFEST}" for name in sorted(on_disk - listed)]
    problems += [f"{p.name}: half-written shard left by an interrupted run (ignored; removed on the next run)"
                 for p in sorted(root.glob(".tmp-*"))]
    expected = m.get("num_shards_expected")
    if expected is not None:
        names = {f"{SHARD_PREFIX}{i:05d}" for i in range(expected)}
        problems += [f"{name}: never committed (the run did not finish; run the job again to resume)"
                     for name in sorted(names - listed)]
    problems += _check_index(root, m)
    if m["num_samples"] != sum(s["samples"] for s in m["shards"]):
        problems.append(f"{MANIFEST}: num_samples {m['num_samples']} != the shards' {sum(s['samples'] for s in m['shards'])}")
    return {"cache": str(root), "shards": len(m["shards"]), "ok": not problems, "problems": problems}


def _check_index(root: Path, m: dict) -> list[str]:
    """The consolidated index/ against the checksums the manifest records (a complete cache has one)."""
    if not m.get("index"):
        return [f"{MANIFEST}: complete, but lists no consolidated {INDEX_DIR}/ (run the job again)"] if m.get("complete") else []
    problems = file_problems(root / INDEX_DIR, m["index"]["files"], INDEX_DIR)
    if m["index"]["samples"] != m["num_samples"]:
        problems.append(f"{INDEX_DIR}: {m['index']['samples']} samples, the manifest declares {m['num_samples']}")
    return problems


def _check_schema(root: Path, record: dict, m: dict) -> list[str]:
    meta = json.loads((root / record["name"] / SHARD_META).read_text())
    n, k = meta.get("num_samples", -1), m["num_views"]
    problems = []
    try:
        index = SampleIndex.open(root / record["name"] / INDEX_DIR)
        views = index.arrays["views"].shape[1:]
        if len(index) != n or views != (k, len(m["views"].get("fields", [])) or views[1]):
            problems.append(f"{record['name']}/{INDEX_DIR}: {len(index)} samples with views {views}, expected {n} "
                            f"samples with {k} views")
        indices = [int(i) for i in index.arrays["dataset_index"]]
    except (OSError, ValueError) as e:
        return problems + [f"{record['name']}/{INDEX_DIR}: unreadable ({e})"]
    if meta["start"] != record["start"] or meta["end"] != record["end"] or n > meta["end"] - meta["start"]:
        problems.append(f"{record['name']}: sample range [{meta['start']}, {meta['end']}) does not hold {n} samples")
    if meta.get("format", m["format"]) != m["format"]:
        return problems + [f"{record['name']}: {SHARD_META} says format {meta['format']!r}, {MANIFEST} says "
                           f"{m['format']!r}"]
    if m["format"] == "zarr":
        import zarr

        for role in m["roles"].values():
            for field, f in role["fields"].items():
                try:
                    a = zarr.open_array(str(root / record["name"] / field), mode="r")
                except Exception as e:  # noqa: BLE001 — any unreadable array is a finding, not a crash
                    problems.append(f"{record['name']}/{field}: unreadable ({type(e).__name__})")
                    continue
                want = (n, k, *f["shape"])
                if tuple(a.shape) != want or str(a.dtype) != f["dtype"]:
                    problems.append(f"{record['name']}/{field}: {a.dtype}{tuple(a.shape)}, expected {f['dtype']}{want}")
    else:
        import tarfile

        from .stores.wds_store import ENTRIES, member_name

        for view in range(k):
            try:
                with tarfile.open(root / record["name"] / f"v{view}.tar") as tar:
                    members = {t.name: t.offset_data for t in tar.getmembers()}
            except (OSError, tarfile.TarError) as e:  # a finding, not a crash
                why = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
                problems.append(f"{record['name']}/v{view}.tar: cannot be read as a tar ({why})")
                continue
            try:
                entries = np.load(root / record["name"] / ENTRIES, allow_pickle=False)
            except (OSError, ValueError) as e:
                problems.append(f"{record['name']}/{ENTRIES}: unreadable ({e})")
                break
            # one entry per role; caches written before: one per field
            fields = [f for role in m["roles"].values() for f in role["fields"]]
            units = list(m["roles"]) if entries.ndim == 4 and entries.shape[2] == len(m["roles"]) else fields
            for row, index_ in enumerate(indices):
                for j, unit in enumerate(units):
                    name = member_name(index_, unit)
                    if name not in members:
                        problems.append(f"{record['name']}/v{view}.tar: entry {name} missing")
                    elif entries.shape[:3] != (k, n, len(units)) or entries[view, row, j, 0] != members[name]:
                        problems.append(f"{record['name']}/{ENTRIES}: the offset of {name} in v{view}.tar is not "
                                        f"where the tar holds it")
    return problems


def recompute(root: str | Path, n: int = 4, device: str = "cpu") -> dict:
    """Re-run the teacher on n stored views, replaying their parameters; the largest differences."""
    import torch

    from scalekd.targets import teacher_precision

    from .datasets import SampleRef, load_image
    from .views import Replay, fingerprint
    from .weights import load_teacher

    reader = CacheReader(root)
    t = reader.manifest["teacher"]
    split, sha = load_teacher(t["name"], checkpoint=t.get("checkpoint"), pretrained=t.get("pretrained", False),
                              late_blocks=t.get("late_blocks") or 2, device=device, **t.get("kwargs", {}))
    if sha != t.get("checkpoint_sha256"):
        raise ValueError(f"teacher checkpoint {t.get('checkpoint')} has sha256 {sha}, the cache was made from "
                         f"{t.get('checkpoint_sha256')}")
    size = tuple(t["input_size"][1:])
    replay = Replay.from_manifest(reader.manifest["views"])
    worst = {r: 0.0 for r in reader.specs}
    rel = {r: 0.0 for r in reader.specs}
    mismatched = []
    checked = _view_indices(reader, n)
    for i, v in checked:
        s = reader[i]
        view = replay.view(s["views"][v])
        pixels = replay.pixels(load_image(SampleRef.from_sample(s)), view, size, t["interpolation"])
        if fingerprint(pixels, view) != s["fingerprints"][v]:
            mismatched.append(f"{s['key']} view {v}")
        with torch.inference_mode(), teacher_precision(device, t.get("precision", "fp32")):  # as it was cached
            x = replay.model_input(pixels, view, t["mean"], t["std"])
            live = split.targets(x[None].to(device))
        stored = reader.read(i, v)
        for r in reader.specs:
            a, b = live[r][0].float().cpu().numpy(), stored[r]
            worst[r] = max(worst[r], float(np.abs(a - b).max()))
            rel[r] = max(rel[r], float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return {"views_checked": len(checked), "max_abs_diff": worst, "max_rel_l2": rel,
            "fingerprint_mismatches": mismatched}


# relative L2 that storage rounding stays under (fp16 ~1e-3; int8 mid ~1e-2, up to 3e-2 after late);
# other late weights than the cache's give ~0.4 and more (tests/test_inspect.py)
LATE_TOLERANCE = 0.05


def check_late(root: str | Path, n: int = 4, checkpoint: str | Path | None = None, device: str = "cpu",
               tolerance: float = LATE_TOLERANCE) -> dict:
    """The trainer's ``late`` alone on n stored ``mid`` views, compared with the stored ``final`` (and
    logits): do the cache and these late weights agree? No early part, no images.

    checkpoint: the late weights to check (default: the checkpoint the manifest records; another
    file is loaded without the manifest's checksum check, which is what is being tested).
    Returns views checked, max |diff| and max relative L2 per role, and ok (every rel L2 ≤ tolerance)."""
    import torch

    from scalekd.targets import teacher_precision

    from .late import build_late

    reader = CacheReader(root)
    if "mid" not in reader.specs:
        raise ValueError(f"{Path(root) / MANIFEST}: the cache stores roles {list(reader.specs)}, no 'mid', so late "
                         f"cannot be re-run on it; --check-late needs a cache made with roles: {{mid: fp16, ...}}")
    teacher = dict(reader.manifest["teacher"])
    if checkpoint is not None:
        teacher |= {"checkpoint": str(checkpoint), "checkpoint_sha256": None}
    late = build_late(teacher, device=device)
    picked = _view_indices(reader, n)
    compared = [r for r in ("final", "logits") if r in reader.specs]
    worst = {r: 0.0 for r in compared}
    rel = {r: 0.0 for r in compared}
    for i, v in picked:
        stored = reader.read(i, v, ["mid", *compared])
        with torch.inference_mode(), teacher_precision(device, teacher.get("precision", "fp32")):  # as it was cached
            final, logits = late.forward_with_logits(torch.from_numpy(stored["mid"][None]).to(device))
        live = {"final": final, "logits": logits}
        for r in compared:
            a, b = stored[r], live[r][0].float().cpu().numpy()
            worst[r] = max(worst[r], float(np.abs(a - b).max()))
            rel[r] = max(rel[r], float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return {"views_checked": len(picked), "checkpoint": teacher.get("checkpoint"), "max_abs_diff": worst,
            "max_rel_l2": rel, "tolerance": tolerance, "ok": all(x <= tolerance for x in rel.values())}


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (n, n): X = D @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def spectrum(root: str | Path, views: int = 64) -> np.ndarray:
    """Mean |2-D DCT| of the cached final features over channels and views: (Hf, Wf), [0, 0] = DC."""
    reader = CacheReader(root)
    h, w = reader.manifest["teacher"]["final_hw"]
    dh, dw = dct_matrix(h), dct_matrix(w)
    acc, count = np.zeros((h, w)), 0
    for i, v in _view_indices(reader, views):
        f = reader.read(i, v, ["final"])["final"].astype(np.float64)  # (N, C)
        grid = f.T.reshape(-1, h, w)  # (C, H, W)
        coeffs = np.einsum("uh,chw,vw->cuv", dh, grid, dw)
        acc += np.abs(coeffs).mean(0)
        count += 1
    return acc / max(count, 1)


def plot_spectrum(root: str | Path, path: str | Path, views: int = 64) -> Path:
    """The poster's Figure 2 from the user's own cache: mean |2-D DCT| of the final features by
    frequency, DC first; the title names the teacher and how many views it averages."""
    from .plotting import pyplot

    plt = pyplot()

    spec = spectrum(root, views)
    reader = CacheReader(root)
    shown = len(_view_indices(reader, views))  # what spectrum() averaged: up to `views`, spread over the cache
    m = reader.manifest
    h, w = spec.shape
    u, v = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = np.lexsort((u.ravel(), (u + v).ravel()))  # by u + v (one anti-diagonal after another), then by u
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = a1.imshow(spec, cmap="viridis")
    a1.set(title="mean |DCT| by frequency (u, v); [0, 0] = DC", xlabel="horizontal frequency v",
           ylabel="vertical frequency u")
    fig.colorbar(im, ax=a1, label="mean |DCT coefficient| (over channels and views)")
    a2.bar(np.arange(h * w), spec.ravel()[order], color=["tab:red"] + ["tab:blue"] * (h * w - 1))
    a2.set(title="in order of u + v, then u (DC first, in red)", xlabel=f"frequency index (u + v from 0 to {h + w - 2})",
           ylabel="mean |DCT coefficient|")
    fig.suptitle(f"teacher {m['teacher']['name']}: final features ({h}x{w} tokens), {shown} views of "
                 f"{len(reader)} samples in {Path(root).name}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
