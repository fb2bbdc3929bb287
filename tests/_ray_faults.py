"""Kill Ray workers in the middle of a caching job, each fault exactly once (tests only).

``install`` is a Ray ``worker_process_setup_hook``: every worker of a job started with
``runtime_env={"worker_process_setup_hook": "_ray_faults.install", "env_vars": {FAULTS_ENV: folder}}``
wraps the job's stages so that the process SIGKILLs itself at a chosen moment. A fault fires once in
the whole cluster: the first process to create ``<folder>/<fault>`` (O_EXCL) owns it, writes its pid
and shard there, and dies; the retry finds the file and runs normally. The files are the kill count.

Faults (shard indexes in FAULT_SHARDS):
- render:       the process running render_views, before it renders its shard (a teacher actor: Ray
                Data fuses render_views into the actor stage)
- teacher:      a teacher actor, on the second shard it is given (the first may still be running: an
                actor takes several shards at once)
- write-commit: the process running write_shard (a teacher actor), after its shard is committed and
                before it returns
- write-mid:    the process running write_shard, with its shard's files in .tmp-shard-* and not yet
                renamed
"""
from __future__ import annotations

import os
import signal

FAULTS_ENV = "SCALEKD_TEST_FAULTS"
FAULT_SHARDS = {"render": 1, "write-commit": 2, "write-mid": 3}


def _claim(fault: str, shard: int) -> bool:
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return False
    try:
        fd = os.open(os.path.join(folder, fault), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()} {shard}".encode())
    os.fsync(fd)
    os.close(fd)
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    if not os.environ.get(FAULTS_ENV):
        return
    from pipeline import cache_job, shards
    from pipeline.stores import STORES

    render, call, write = cache_job.render_views, cache_job.TeacherForward.__call__, cache_job.write_shard

    def render_views(task, *a, **k):
        if int(task["shard"]) == FAULT_SHARDS["render"] and _claim("render", int(task["shard"])):
            _die()
        return render(task, *a, **k)

    def teacher_call(self, row):
        self._shards_done = getattr(self, "_shards_done", 0)
        if self._shards_done >= 1 and _claim("teacher", int(row["shard"])):
            _die()
        self._shards_done += 1
        return call(self, row)

    def write_shard(row, root, fmt, *a, **k):
        shard = int(row["shard"])
        if shard == FAULT_SHARDS["write-mid"]:
            store = STORES[fmt]
            original = store.write_shard

            def write_then_die(*sa, **sk):
                original(*sa, **sk)  # the shard's files are in its .tmp-shard-* folder now
                if _claim("write-mid", shard):
                    _die()

            store.write_shard = write_then_die
            try:
                return write(row, root, fmt, *a, **k)
            finally:
                store.write_shard = original
        out = write(row, root, fmt, *a, **k)
        if shard == FAULT_SHARDS["write-commit"] and _claim("write-commit", shard):
            _die()
        return out

    # write_shard lives in pipeline.shards and reaches a worker by that name (a function is pickled by
    # reference): both bindings are wrapped, the one a worker unpickles and the local engine's.
    cache_job.render_views, cache_job.write_shard, shards.write_shard = render_views, write_shard, write_shard
    cache_job.TeacherForward.__call__ = teacher_call
