"""The caching job: read → render views → teacher forward → encode and commit shards.

    tasks = pending shards (a shard = a fixed range of the sorted dataset listing)
    ray.data.from_items(tasks)
        .map(render_views)                                   # decode, K views, fingerprints (Ray Data fuses
                                                             # it into CPU teacher actors; a GPU actor's
                                                             # resources differ, so there it runs apart)
        .map(TeacherWriter, compute=ActorPoolStrategy(n, …)) # the teacher, loaded once per actor, then
                                                             # write_shard: encode, write under a temporary
                                                             # name, rename; several shards at once, in
                                                             # threads (_teacher_pool)
The driver streams the committed records back and keeps manifest.json current. ``engine="local"``
runs the very same three functions in this process (one machine, no Ray): views are rendered
ahead in threads and shards written in a writer thread while the teacher runs (measured on an
H100 with Swin-L: 2.6–2.7× the stages in series; bench/results-throughput-cuda*.json); the writer
encodes each shard in several threads and commits in order (bench/writer.py).

Exactly once: a shard's contents depend only on its range (views are seeded by key, the teacher
sees the shard's views in a fixed order and batch split), commits are atomic renames, a re-run
skips committed shards, and a retried task finds its shard committed and discards its copy.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from scalekd.targets import teacher_precision
from scalekd.teacher import TeacherInfo

from .datasets import BadImage, Listing, SampleRef, dataset_root, list_dataset, listing_sha256, load_image, relative_spec
from .job_spec import CacheSpec, work_dir
from .ledger import LAYOUT, Ledger, package_versions
from .output_guard import (CacheConfigError, OutputLock, check_placement, refuse_foreign, refuse_foreign_in_shards,
                           remove_cache)
from .sample_index import COLUMNS_DOC
from .schema import MANIFEST, SCHEMA_VERSION, RoleSpec, shard_name
from .shards import (CacheWriteError, committed_shards, damaged_shards, discard_shard, remove_temporaries,
                     write_shard)
from .views import fingerprint, render_view, sample_views, view_fields
from .weights import export_demo_teacher, file_sha256, load_teacher

__all__ = ["run_cache_job", "CacheConfigError", "resolve_checkpoint", "teacher_info_for", "render_views",
           "TeacherForward", "write_shard"]

BUILTIN_DEMO_TEACHER = "builtin:efficientnet-lite0"


def resolve_checkpoint(teacher: dict) -> str | None:
    """The checkpoint file path (exporting the built-in demo weights when asked for). For pretrained: true,
    None once timm's download is known to be possible: weights out of reach are refused here, before
    any output exists, instead of after a minute of retries (pipeline/pitfalls.py)."""
    ckpt = teacher.get("checkpoint")
    if teacher.get("pretrained") and ckpt is None:
        from .pitfalls import check_pretrained_reachable

        check_pretrained_reachable(teacher["name"])
    if ckpt == BUILTIN_DEMO_TEACHER:
        if teacher["name"] != "tf_efficientnet_lite0":
            raise ValueError(f"{BUILTIN_DEMO_TEACHER} holds tf_efficientnet_lite0 weights, not {teacher['name']}")
        return str(export_demo_teacher(work_dir() / "weights" / "tf_efficientnet_lite0.safetensors"))
    if ckpt is not None and Path(ckpt).is_dir():
        raise FileNotFoundError(f"teacher checkpoint {ckpt} is a folder; expected a file (.safetensors or a torch "
                                f"state dict)")
    if ckpt is not None and not Path(ckpt).is_file():
        raise FileNotFoundError(f"teacher checkpoint {ckpt} does not exist")
    return str(Path(ckpt).resolve()) if ckpt else None  # absolute: the trainer may run elsewhere


def teacher_info_for(teacher: dict) -> TeacherInfo:
    """The split's shapes without loading any weights (the model is built on the meta device); a teacher
    with no head is refused here (pipeline/pitfalls.py), before any output exists."""
    from .pitfalls import check_teacher_head
    from .teacher_report import meta_split

    info = meta_split(teacher["name"], late_blocks=teacher.get("late_blocks", 2), **teacher.get("kwargs", {})).info
    check_teacher_head(teacher["name"], info.num_classes)
    return info


def _role_specs(spec: CacheSpec, info: TeacherInfo) -> dict[str, RoleSpec]:
    shapes = {"final": (info.final_tokens, info.final_channels), "mid": (info.mid_tokens, info.mid_channels),
              "logits": (info.num_classes,)}
    return {role: RoleSpec(role, shapes[role], codec) for role, codec in spec.roles.items()}


# --------------------------------------------------------------------------- the three stages


def render_views(task: dict, views, input_size: tuple[int, int], interpolation: str, data_root: str,
                 listing=None) -> dict:
    """Decode the shard's images and render K views each at the teacher's input size.

    task: {shard, start, end} and either refs (JSON list of SampleRef dicts) or, from ``listing``
    (a datasets.Listing, or a Ray object reference to one), its samples [start, end) → adds pixels
    (n·K, H, W, 3) uint8, samples and skipped (JSON). A sample's source is recorded relative to
    data_root (the dataset's root), so a copied cache replays from wherever the dataset is copied to.
    """
    samples, skipped, pixels, erase = [], [], [], []
    fields = view_fields(views)
    for ref in _task_refs(task, listing):
        try:
            image = load_image(ref)
        except BadImage as e:
            where = {"member": ref.member} if ref.member is not None else {}  # which entry of a tar
            skipped.append({"key": ref.key, "source": ref.source, **where, "reason": str(e)})
            continue
        params = sample_views(ref.key, image.size, views, input_size)
        rendered = [render_view(image, v, input_size, interpolation, views.rand_augment) for v in params]
        pixels.extend(rendered)
        erase.extend([v.erase_seed, [list(b) for b in v.erase]] for v in params)
        samples.append({"index": ref.index, "key": ref.key, "label": ref.label, "member": ref.member, "span": ref.span,
                        "source": Path(os.path.relpath(ref.source, data_root)).as_posix(),
                        "views": [v.as_array(fields).tolist() for v in params],
                        "fingerprints": [fingerprint(p, v) for p, v in zip(rendered, params)]})
    h, w = input_size
    row = {"shard": task["shard"], "start": task["start"], "end": task["end"],
           "pixels": np.stack(pixels) if pixels else np.zeros((0, h, w, 3), np.uint8),
           "samples": json.dumps(samples), "skipped": json.dumps(skipped)}
    if views.erasing:  # applied by the teacher's forward after normalisation: (seed, boxes) per pixel row
        row["erase"] = json.dumps({"mode": views.erasing_mode, "views": erase})
    return row


_LISTINGS: dict = {}  # a Ray worker's copy of the driver's listing, fetched once
_LISTINGS_LOCK = threading.Lock()  # a teacher actor renders several shards at once, in threads


def _task_refs(task: dict, listing) -> list[SampleRef]:
    if "refs" in task:
        return [SampleRef(**d) for d in json.loads(task["refs"])]
    if listing is None:
        raise ValueError(f"task of shard {task['shard']} carries no refs and no listing was given")
    if not isinstance(listing, Listing):  # a Ray ObjectRef: the listing lives once in the object store
        import ray

        with _LISTINGS_LOCK:
            if listing not in _LISTINGS:
                _LISTINGS.clear()
                _LISTINGS[listing] = ray.get(listing)
            listing = _LISTINGS[listing]
    return listing[int(task["start"]) : int(task["end"])]


class TeacherForward:
    """The frozen teacher, loaded once per actor; maps a rendered shard to its teacher outputs.

    The teacher runs at ``teacher['precision']`` (fp32 | bf16 | fp16, autocast: scalekd.targets.
    teacher_precision); its outputs are cast to float32 before they are checked and encoded.

    Safe to call from several threads: in a Ray job one actor renders shards in some threads while
    another runs the teacher; the forwards themselves take turns (one shard's batches at a time on the
    device, so its memory holds one batch as in series)."""

    def __init__(self, teacher: dict, checkpoint: str | None, roles: list[str], batch_size: int, device: str = "auto",
                 threads: int | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.precision = teacher.get("precision", "fp32")
        teacher_precision(self.device, self.precision)  # fp16 on a CPU is refused before the teacher loads
        if threads and self.device.type == "cpu":
            # Ray starts workers with one intra-op thread (OMP_NUM_THREADS=1); a CPU teacher actor
            # should use its share of the node's cores instead (measured: 0.48 → see docs/benchmarks.md).
            torch.set_num_threads(threads)
        if not checkpoint and not teacher.get("pretrained"):
            torch.manual_seed(teacher.get("seed", 0))  # random weights: the same in every actor and run
        self.split, _ = load_teacher(teacher["name"], checkpoint=checkpoint, pretrained=teacher.get("pretrained", False),
                                     late_blocks=teacher.get("late_blocks", 2), device=self.device,
                                     **teacher.get("kwargs", {}))
        self.roles, self.batch_size = roles, batch_size
        info = self.split.info
        self.mean, self.std = info.mean, info.std
        self.node = _node_id()
        self._turn = threading.Lock()

    def __call__(self, row: dict) -> dict:
        with self._turn, torch.inference_mode():
            return self._forward(row)

    def _forward(self, row: dict) -> dict:
        from .views import Erasing, to_model_input

        pixels = row.pop("pixels")
        erase = json.loads(row.pop("erase")) if "erase" in row else None
        outs: dict[str, list[np.ndarray]] = {r: [] for r in self.roles}
        for i in range(0, len(pixels), self.batch_size):
            chunk = pixels[i : i + self.batch_size]
            # random erasing after normalisation, each view's boxes filled from its seed; the uint8 pixels are
            # normalised and erased on the teacher's device
            erasing = (Erasing.of_views(erase["views"][i : i + len(chunk)], tuple(chunk.shape[1:3]), erase["mode"])
                       if erase else None)
            x = to_model_input(chunk, erasing, self.mean, self.std, self.device)
            with teacher_precision(self.device, self.precision):
                out = self.split.targets(x)
            for r in self.roles:
                t = out[r].float()
                if not torch.isfinite(t).all():
                    raise FloatingPointError(f"teacher {self.split.info.name} produced NaN/Inf in {r!r} for "
                                             f"{shard_name(int(row['shard']))} (views {i}..{i + len(x) - 1} of the "
                                             f"shard); refusing to cache it")
                outs[r].append(t.cpu().numpy())
        n = len(json.loads(row["samples"]))
        for r in self.roles:
            arr = np.concatenate(outs[r]) if outs[r] else np.zeros((0,), np.float32)
            row[r] = arr.reshape(n, -1, *arr.shape[1:]) if n else arr
        row["node"] = self.node  # not stored in the shard: the run's summary counts shards per teacher node
        return row


class TeacherWriter(TeacherForward):
    """A Ray teacher actor that also encodes and commits the shards it computes (write_shard), so their
    outputs never cross the object store (Swin-L: 77 MB a shard in float32) and no separate write
    processes compete for the node's cores. Called from several threads at once: one thread's forward
    runs while another's shard is written (and, on CPU nodes, others render), as in the local engine."""

    def __init__(self, write: dict, **teacher_kw):
        super().__init__(**teacher_kw)
        self.write = write

    def __call__(self, row: dict) -> dict:
        return write_shard(super().__call__(row), **self.write)


def _node_id() -> str:
    """The Ray node this process runs on ('local' outside Ray)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    return "local"


# --------------------------------------------------------------------------- the driver


def local_pipeline(tasks: list[dict], render_kw: dict, teacher_kw: dict, write_kw: dict, threads: int | None = None,
                   render: str | None = None, encoders: int | None = None):
    """The three stages on this machine, overlapped: shards are rendered ahead by `threads` workers
    and encoded and committed in a writer thread while the teacher runs on the next shard. Shards
    reach the teacher and the disk in task order, so the cache is the same as in series (threads=0);
    yields write_shard's rows in order.

    render: 'threads' (default; PIL decodes and resizes without the GIL) or 'processes' (spawned).
    Measured on an H100 with Swin-L (bench/results-throughput-cuda*.json), steady state over the bare
    forward: series 0.24, 4 threads 0.66–0.75, 8 or 14 threads 0.64–0.67, 4/8/14 processes
    0.56/0.61/0.65: rendering no longer bounds it there. The one writer thread does: encoding and
    committing a Swin-L shard (256 views, 116 MB in fp16) takes 1.3 s (zarr) / 0.5 s (webdataset)
    on a 2-core Xeon, against the H100's 0.53 s forward of it.

    encoders: threads that encode each shard inside the writer (casts, zstd per view, sha256 per
    file: pipeline.encoding), default min(4, cores). Commits stay in the one writer thread, in order,
    and the bytes are the same at any count; at most 2 shards wait for the writer (memory stays flat).
    The writer's capacity by encoder count: bench/writer.py, bench/results-writer.json."""
    render = render or "threads"
    if render not in ("threads", "processes"):
        raise ValueError(f"render must be 'threads' or 'processes', got {render!r}")
    if not tasks:
        return
    forward = TeacherForward(**teacher_kw)
    threads = min(4, os.cpu_count() or 1) if threads is None else threads
    write_kw = write_kw | {"encoders": min(4, os.cpu_count() or 1) if encoders is None else encoders}
    if threads == 0:
        for t in tasks:
            yield write_shard(forward(render_views(t, **render_kw)), **write_kw)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    render_pool = (ThreadPoolExecutor(threads, "render") if render == "threads" else
                   ProcessPoolExecutor(threads, mp_context=multiprocessing.get_context("spawn")))
    writer = ThreadPoolExecutor(1, "write")
    failed: list[BaseException] = []

    def write(row):  # in series, in order; after a failed write (disk full) nothing more is written
        if failed:
            raise RuntimeError("an earlier shard's write failed") from failed[0]
        try:
            return write_shard(row, **write_kw)
        except BaseException as e:
            failed.append(e)
            raise

    rendering, writing, upcoming = deque(), deque(), iter(tasks)
    try:
        for t in upcoming:  # render up to 2 shards per worker ahead
            rendering.append(render_pool.submit(render_views, t, **render_kw))
            if len(rendering) >= 2 * threads:
                break
        while rendering:
            row = rendering.popleft().result()
            nxt = next(upcoming, None)
            if nxt is not None:
                rendering.append(render_pool.submit(render_views, nxt, **render_kw))
            row = forward(row)
            while writing and writing[0].done():
                yield writing.popleft().result()
            if len(writing) >= 2:  # bound the encoded shards held in memory
                yield writing.popleft().result()
            writing.append(writer.submit(write, row))
        while writing:
            yield writing.popleft().result()
    finally:
        render_pool.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


def shard_tasks(refs, per_shard: int, done=(), with_refs: bool = False) -> list[dict]:
    """One task per shard not in ``done``: {shard, start, end}; with_refs: and refs (JSON of its
    SampleRefs), for workers that do not share the driver's listing (spawned render processes)."""
    tasks = []
    for i in range(-(-len(refs) // per_shard)):
        if i in done:
            continue
        start, end = i * per_shard, min(len(refs), (i + 1) * per_shard)
        task = {"shard": i, "start": start, "end": end}
        if with_refs:
            task["refs"] = json.dumps([asdict(r) for r in refs[start:end]])
        tasks.append(task)
    return tasks


def _config(spec: CacheSpec, sha: str | None, refs: list[SampleRef]) -> dict:
    """What makes two runs write the same cache; a mismatch with an existing cache is refused."""
    listing = listing_sha256(refs)
    # Through JSON and back, so that it compares equal to the copy read from manifest.json (tuples → lists).
    return json.loads(json.dumps({"schema_version": SCHEMA_VERSION, "format": spec.format, "teacher": spec.teacher["name"],
            "checkpoint_sha256": sha,
            "late_blocks": spec.teacher.get("late_blocks", 2), "teacher_kwargs": spec.teacher.get("kwargs", {}),
            "views": {k: v for k, v in spec.views.to_dict().items() if k != "convention"}, "roles": dict(spec.roles), "samples_per_shard": spec.samples_per_shard,
            "compression_level": spec.compression_level, "batch_size": spec.batch_size,
            "random_init_seed": None if sha or spec.teacher.get("pretrained") else spec.teacher.get("seed", 0),
            "dataset_listing_sha256": listing}
            # Only when not fp32: caches made before precision existed (fp32) keep their configuration.
            | ({"teacher_precision": p} if (p := spec.teacher.get("precision", "fp32")) != "fp32" else {})))


def config_sha256(config: dict) -> str:
    """The digest of a run's config, stored in each shard.json."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _read_config(manifest: Path) -> tuple[dict | None, str]:
    """(the config a manifest records, '') or (None, why it cannot be read)."""
    try:
        data = manifest.read_bytes()
    except OSError as e:
        return None, os.strerror(e.errno) if e.errno else str(e)
    if not data.strip():
        return None, "zero bytes" if not data else "blank"
    try:
        m = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "not valid JSON"
    if not isinstance(m, dict) or not isinstance(m.get("config"), dict):
        return None, f"a JSON {type(m).__name__}, not a manifest" if not isinstance(m, dict) else "without a config"
    return m["config"], ""


def _shard_disagreement(meta: dict, config: dict) -> str:
    """'' when a committed shard may belong to this run's configuration, else the first difference."""
    sps = config["samples_per_shard"]
    if meta.get("config_sha256") not in (None, config_sha256(config)):
        return "made by another configuration (its config_sha256 differs)"
    for key, mine in (("format", config["format"]), ("num_views", config["views"]["per_image"]),
                      ("start", meta["index"] * sps)):
        if meta.get(key) != mine:
            return f"{key}: shard has {meta.get(key)!r}, this run {mine!r}"
    return ""


def _prepare_output(root: Path, config: dict, overwrite: bool, held: contextlib.ExitStack, log) -> None:
    """Check the output folder, take its lock for the rest of the job (held), and keep, rebuild or
    (with overwrite) clear the cache in it. Nothing but a cache's own entries is ever removed."""
    if root.exists() and not root.is_dir():
        raise CacheConfigError(f"output {root} exists and is not a folder")
    refuse_foreign(root)  # whatever the flags
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CacheWriteError(f"cannot write to output {root}: {os.strerror(e.errno) if e.errno else e}") from None
    held.enter_context(OutputLock(root, "cache job"))  # until the job ends; a second job is refused here
    refuse_foreign(root)  # again, under the lock
    manifest = root / MANIFEST
    old, unreadable = _read_config(manifest) if manifest.exists() else (None, "missing")
    if old is not None and old != config:
        if not overwrite:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            detail = "; ".join(f"{k}: cache has {old.get(k)!r}, this run {config.get(k)!r}" for k in diff[:4])
            raise CacheConfigError(f"output {root} holds a cache of another configuration ({detail}); "
                                   f"choose another output or pass --overwrite to replace it")
        log(f"--overwrite: removed the cache of another configuration from {root} ({len(remove_cache(root))} entries)")
    elif old is None:
        shards = committed_shards(root)
        if not shards:
            return
        bad = {meta["name"]: why for meta in shards.values() if (why := _shard_disagreement(meta, config))}
        if bad and not overwrite:
            name = sorted(bad)[0]
            raise CacheConfigError(f"output {root} has no readable {MANIFEST} ({unreadable}), and its {name} does not "
                                   f"belong to this run ({bad[name]}); choose another output or pass --overwrite "
                                   f"to replace it")
        if bad:
            log(f"--overwrite: removed the cache of another configuration from {root} ({len(remove_cache(root))} "
                f"entries)")
        else:
            log(f"{MANIFEST} of {root} is {unreadable}: rebuilding it from the {len(shards)} committed shard(s)' own "
                f"shard.json (format, views and ranges match this run)")


def _manifest_header(spec, info, ckpt, sha, specs, config, listed, classes, data_root) -> dict:
    """The manifest's fixed part (the Ledger adds shards, counts, index and skipped inputs)."""
    return {
        "format": spec.format,
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "config": config,
        "teacher": info.to_dict() | {"checkpoint": ckpt, "checkpoint_sha256": sha,
                                     "pretrained": bool(spec.teacher.get("pretrained", False)),
                                     "seed": config["random_init_seed"],
                                     "precision": spec.teacher.get("precision", "fp32"),
                                     "kwargs": spec.teacher.get("kwargs", {})},
        "views": spec.views.to_dict() | {"fields": list(view_fields(spec.views))},
        "dataset": {"spec": spec.dataset, "root": str(data_root), "relative_spec": relative_spec(spec.dataset, data_root),
                    "listed": listed, "classes": classes},
        "roles": {name: s.to_dict() | {"compressor": f"zstd(level={spec.compression_level}, checksum)"
                                       + ("" if spec.format == "zarr" else " over each of the role's .npy files, a frame each, back "
                                                                          "to back (.npy.zst), crc32 of the stored bytes in "
                                                                          "entries.npy")}
                  for name, s in specs.items()},
        "layout": LAYOUT[spec.format] | LAYOUT["roles"] | {"index": COLUMNS_DOC},
        "samples_per_shard": spec.samples_per_shard,
        "num_views": spec.views.per_image,
        "versions": package_versions(),
    }


def _init_ray(address: str | None):
    import ray

    started = not ray.is_initialized()  # a caller's own ray.init (with its runtime_env) is used as it is
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if started and address:
        ray.init(address=address, log_to_driver=False)
    elif started:
        # A local Ray of our own; its temp files stay in the work folder, not in /tmp or $HOME.
        temp = work_dir() / "ray"
        temp.mkdir(parents=True, exist_ok=True)
        ray.init(_temp_dir=str(temp), include_dashboard=False, log_to_driver=False,
                 num_cpus=os.cpu_count(), configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # our CacheWriteError, not Ray's wrapper, reaches the caller
    return started


def _teacher_pool(actors: int, calls: int, log=print):
    """Ray Data's pool of teacher actors, each working on ``calls`` shards at once in threads (the
    fused render_views and write_shard run in parallel, TeacherForward's forwards take turns). A Ray
    without ``max_concurrent_calls_per_actor`` (2.60 has it; a cluster's Ray is what it is) runs one
    shard at a time per actor, rendered, forwarded and written in series: correct, slower, said."""
    import inspect

    import ray
    from ray.data import ActorPoolStrategy

    if calls <= 1:
        return ActorPoolStrategy(size=actors)
    if "max_concurrent_calls_per_actor" not in inspect.signature(ActorPoolStrategy).parameters:
        log(f"Ray {ray.__version__} has no ActorPoolStrategy(max_concurrent_calls_per_actor=...): each teacher actor "
            f"renders, runs and writes one shard at a time (slower; Ray 2.60 is what this project is tested with)")
        return ActorPoolStrategy(size=actors)
    return ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True)


def run_cache_job(spec: CacheSpec, overwrite: bool = False, engine: str = "ray", progress: bool = True,
                  max_shards: int | None = None, log=print, local_threads: int | None = None,
                  local_render: str | None = None, local_encoders: int | None = None,
                  ray_calls: int | None = None) -> dict:
    """Cache the teacher's outputs for every view of every image in ``spec.dataset``; returns the summary.

    engine: 'ray' (a local Ray started here, or the cluster at spec.address / $RAY_ADDRESS) or
    'local' (the same stages in this process). max_shards: stop after that many new shards (tests).
    local_threads, local_render: the local engine's render workers (0 = the stages in series) and their
    kind, 'threads' or 'processes'; local_encoders: the threads encoding each shard (see local_pipeline for the
    defaults); ray_calls: the shards each Ray teacher actor works on at once, in threads (default: 2,
    one forwarded while another is written, plus min(4, its share of the CPUs) rendered on CPU nodes;
    1: render, forward and write one shard at a time).

    The output folder is locked for the whole job (a second job on it is refused) and holds nothing
    but a cache (anything else in it is refused, whatever the flags).
    """
    if engine not in ("ray", "local"):
        raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    check_placement(spec.output, spec.dataset)  # before anything is read
    with contextlib.ExitStack() as held:  # the output's lock, once taken, until the job ends
        return _run_cache_job(spec, overwrite, engine, progress, max_shards, log, local_threads, local_render,
                              local_encoders, ray_calls, held)


def _run_cache_job(spec, overwrite, engine, progress, max_shards, log, local_threads, local_render, local_encoders,
                   ray_calls, held: contextlib.ExitStack) -> dict:
    t0 = time.perf_counter()
    info = teacher_info_for(spec.teacher)  # an unknown teacher fails here, before any work
    remote = engine == "ray" and (spec.address or os.environ.get("RAY_ADDRESS"))
    if not remote or spec.device == "cpu":  # the teacher runs on this machine's devices: check before any output
        here = "cuda" if torch.cuda.is_available() else "cpu"
        _check_precision(spec, spec.device if spec.device != "auto" else here)
    ckpt = resolve_checkpoint(spec.teacher)
    sha = file_sha256(ckpt) if ckpt else None
    refs, classes, listing_skipped = list_dataset(spec.dataset)
    _check_labels(refs, info, spec.dataset)
    specs = _role_specs(spec, info)
    config = _config(spec, sha, refs)
    root = Path(spec.output).resolve()
    _prepare_output(root, config, overwrite, held, log)
    removed = remove_temporaries(root)
    if removed:
        log(f"removed {len(removed)} half-written shard(s) from an interrupted run: {', '.join(removed[:5])}")
    metas = committed_shards(root)
    damaged = damaged_shards(root, metas)
    refuse_foreign_in_shards(root, list(damaged), "the damaged shards would be removed to be cached again")
    for name, problem in damaged.items():  # resume only from intact shards
        log(f"{name} is damaged ({problem}): removing it, it will be cached again")
        discard_shard(root, name)
        metas = {i: m for i, m in metas.items() if m["name"] != name}
    data_root = dataset_root(spec.dataset, refs)
    n_shards = -(-len(refs) // spec.samples_per_shard)
    ledger = Ledger(root, _manifest_header(spec, info, ckpt, sha, specs, config, len(refs), classes, data_root),
                    n_shards, listing_skipped, metas)
    # The tasks are ranges of the listing; render threads read it in place, a Ray job from its object
    # store (one copy per node), spawned render processes from refs carried in the task.
    by_process = engine == "local" and local_render == "processes"
    tasks = shard_tasks(refs, spec.samples_per_shard, done=ledger, with_refs=by_process)
    if max_shards is not None:
        tasks = tasks[:max_shards]
    ledger.save()  # first: from here on the folder is a cache
    if spec.format == "zarr":
        from .stores.zarr_store import write_root

        write_root(root)
    if len(ledger):
        log(f"resuming: {len(ledger)} of {n_shards} shards already committed in {root}")

    render_kw = dict(views=spec.views, input_size=tuple(info.input_size[1:]), interpolation=info.interpolation,
                     data_root=str(data_root), listing=None if by_process else refs)
    teacher_kw = dict(teacher=spec.teacher, checkpoint=ckpt, roles=list(specs), batch_size=spec.batch_size,
                      device=spec.device)
    write_kw = dict(root=str(root), fmt=spec.format, specs={k: v.to_dict() for k, v in specs.items()},
                    num_views=spec.views.per_image, level=spec.compression_level, config_sha256=config_sha256(config),
                    view_width=len(view_fields(spec.views)))

    from tqdm import tqdm

    bar = tqdm(total=n_shards, initial=len(ledger), unit="shard", desc=f"caching {spec.name}",
               disable=not progress, file=sys.stderr)
    started_ray, new_samples, per_node, results = False, 0, {}, None
    try:
        if engine == "local":
            results = local_pipeline(tasks, render_kw, teacher_kw, write_kw, local_threads, local_render,
                                     local_encoders)
        else:
            import ray

            started_ray = _init_ray(spec.address)
            render_kw["listing"] = ray.put(refs)
            gpus = 1 if spec.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
            # The cluster's actors' device (an actor's own refusal would be retried by Ray, without end).
            _check_precision(spec, "cuda" if gpus else "cpu")
            # Nodes that offer CPUs (a head started with --num-cpus=0 runs no work and does not count).
            nodes = max(1, len([n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]))
            cpus_per_node = int(ray.cluster_resources().get("CPU", 1)) // nodes
            share = max(1, cpus_per_node * nodes // spec.actors)  # an actor's share of the cluster's CPUs
            threads = None if gpus else max(1, min(cpus_per_node, share))
            # One stage: TeacherWriter actors, each rendering (on CPU nodes Ray Data fuses render_views
            # into the actor; a GPU actor's resources differ, so there it runs in tasks apart), running
            # the teacher and writing its shards. In series an actor would idle its teacher while it
            # renders and writes; it works on `calls` shards at once instead, in threads: one forwarded
            # (the forwards take turns), one written, and on CPU nodes more rendered, as the local
            # engine's threads do (docs/benchmarks.md).
            if ray_calls is not None:
                calls = ray_calls
            else:
                calls = 2 + (0 if gpus else min(4, share))
            # Failures: Ray Data (2.60) restarts a dead teacher actor and retries its shards
            # (max_restarts=-1, max_task_retries=-1) and retries a dead render task (max_retries=-1)
            # by default; a retry recomputes the same bytes and write_shard keeps the first commit. Its
            # actors are placed with the SPREAD strategy by default: teachers go to different nodes first.
            # One block per shard: shards go to whichever teacher has room (at most 2 × calls a
            # teacher: Ray Data's in-flight limit), and a killed actor redoes the shards it held (Ray's
            # default, about max(200, 2 × CPUs) blocks, puts tens of shards of an ImageNet-sized job in
            # one block, for one actor).
            ray_write = write_kw | {"encoders": 1 if not gpus else min(4, share)}  # CPU nodes: cores are busy
            ds = (ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
                  .map(render_views, fn_kwargs=render_kw)
                  .map(TeacherWriter, fn_constructor_kwargs=teacher_kw | {"threads": threads, "write": ray_write},
                       compute=_teacher_pool(spec.actors, calls, log), num_gpus=gpus))
            results = ds.iter_rows() if tasks else iter(())
        for row in results:
            record = json.loads(row["record"])
            index = int(record["name"].split("-")[1])
            if index in ledger:  # the same shard reported twice: count it once
                continue
            meta = root / record["name"] / "shard.json"
            if not meta.is_file():
                raise CacheWriteError(f"{record['name']} was committed by a Ray worker but {meta} does not exist on "
                                      f"the driver's node: the output must be on a filesystem every node mounts at "
                                      f"the same path")
            ledger.add(index, record, json.loads(meta.read_text()).get("skipped", []))
            new_samples += record["samples"]
            per_node[row["node"]] = per_node.get(row["node"], 0) + 1
            bar.update(1)
        # A worker killed while writing leaves its .tmp-shard-*; the retry committed the shard and
        # every attempt has ended now, so what is left is garbage (inspect --verify would flag it).
        removed = remove_temporaries(root)
        if removed:
            log(f"removed {len(removed)} copy(ies) left by killed shard writers: {', '.join(removed[:5])}")
        ledger.finish()
    except Exception as e:
        ledger.save()
        cause = _root_cause(e)
        if isinstance(cause, (CacheWriteError, FloatingPointError)):
            raise cause from None
        raise
    finally:
        bar.close()
        if engine == "local" and results is not None:
            results.close()  # a failed driver stops the render pool and the writer, nothing more is committed
        if started_ray:
            import ray

            ray.shutdown()
    return summarize(root, time.perf_counter() - t0, new_samples) | {"shards_per_teacher_node": per_node}


def _check_precision(spec: CacheSpec, device: str) -> None:
    """teacher.precision on the device the teacher will run on (fp16 needs CUDA), as a job-spec error."""
    try:
        teacher_precision(device, spec.teacher.get("precision", "fp32"))
    except ValueError as e:
        raise ValueError(f"cache.teacher.precision: {e}") from None


def _check_labels(refs: list[SampleRef], info: TeacherInfo, dataset: dict) -> None:
    """A label the teacher's classifier has no class for would fail training deep in the loss: refuse it here."""
    if not refs or not info.num_classes:
        return
    top = refs[int(np.argmax(refs.labels))] if isinstance(refs, Listing) else max(refs, key=lambda r: r.label)
    if top.label >= info.num_classes:
        raise ValueError(f"dataset {dataset.get('root') or dataset.get('urls')} has label {top.label} (sample "
                         f"{top.key!r}), but teacher {info.name} has {info.num_classes} classes (labels 0.."
                         f"{info.num_classes - 1}); use a teacher with a head for this dataset's classes, or pin "
                         f"labels with class_index.json")


def _root_cause(e: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (RayTaskError chains keep it as a cause)."""
    seen = e
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None or inner is seen:
            return seen
        seen = inner


def summarize(root: Path, seconds: float | None = None, new_samples: int = 0) -> dict:
    """The numbers a user wants after a run (and inspect-shards shows)."""
    m = json.loads((Path(root) / MANIFEST).read_text())
    views = m["num_samples"] * m["num_views"]
    stored = sum(s["bytes"] for s in m["shards"])
    raw = views * sum(int(np.prod(r["shape"])) * 4 for r in m["roles"].values())
    out = {"cache": str(root), "format": m["format"], "complete": m["complete"], "samples": m["num_samples"],
           "views": views, "shards": len(m["shards"]), "shards_expected": m.get("num_shards_expected"),
           "skipped": len(m["skipped"]), "bytes_on_disk": stored, "raw_fp32_bytes": raw,
           "compression_ratio": round(raw / stored, 3) if stored else None}  # the name inspect-shards uses too
    if seconds is not None:
        out |= {"seconds": round(seconds, 2), "new_samples": new_samples,
                "samples_per_s": round(new_samples / seconds, 2) if new_samples else None}
    return out
