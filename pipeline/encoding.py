"""Encoding a shard in several threads: the fp32 → fp16/int8 casts, the per-view zstd frames, the
files' sha256. Each of these is independent per view (or per file) and releases the GIL (numpy's
casts, numcodecs' Zstd, hashlib on large buffers), so threads share one process's memory and need
no copies; results come back in input order, so a shard's bytes are the same at any thread count.

One pool per process and size, made on first use and reused by every shard (a pool a shard would
start and join threads 1000s of times a job)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

__all__ = ["map_ordered", "slices"]

T, R = TypeVar("T"), TypeVar("R")
_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="encode")
        return _pools[workers]


def slices(n: int, workers: int) -> list[slice]:
    """[0, n) cut into contiguous parts, a few per worker (a per-view task costs tens of µs of pool
    overhead, as much as encoding a logits vector; a few parts a worker still even out a shared machine)."""
    parts = max(1, min(n, workers * 4)) if workers > 1 else 1
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [slice(0, 0)]


def map_ordered(fn: Callable[[T], R], items: Sequence[T], workers: int = 1) -> list[R]:
    """[fn(x) for x in items], in ``workers`` threads when workers > 1; the results in items' order.
    Must not be called from inside fn (the pool's threads would wait on themselves)."""
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    return list(_pool(workers).map(fn, items))
