"""The two stores of one schema (``pipeline.schema``). A format difference lives only here.

Each store module provides
    write_shard(folder, specs, fields, samples, num_views, level)  — the store's files for one shard
    missing_entries(folder, specs, samples, num_views) → what a written shard lacks (checked before a commit)
    open_shard(folder, specs, meta) → object with read(row, view) → {field: array}
"""
from __future__ import annotations

from . import wds_store, zarr_store

STORES = {"zarr": zarr_store, "webdataset": wds_store}


def store_module(fmt: str):
    try:
        return STORES[fmt]
    except KeyError:
        raise ValueError(f"unknown cache format {fmt!r}; expected one of {sorted(STORES)}") from None
