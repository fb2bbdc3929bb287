"""Storage: the webdataset store compresses its entries like zarr (the difference is tar's framing
only), plain webdataset streams a cache with the documented one handler (docs/cache-format.md), and mid is opt-in."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from _cache_helpers import make_imagefolder, make_spec, run, save_checkpoint
from pipeline.job_spec import CacheSpec
from pipeline.reader import CacheReader
from pipeline.schema import RoleSpec, encode
from pipeline.stores import STORES

README = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"  # where the snippet lives


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEKD_WORK", str(tmp_path / "work"))


def _readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "wds.WebDataset" in b]
    return block


def test_the_readme_webdataset_snippet_streams_a_cache_as_the_reader_reads_it(tmp_path):
    data = make_imagefolder(tmp_path / "data", corrupt=False)  # 9 images
    ckpt = save_checkpoint(tmp_path / "teacher.safetensors")
    root = tmp_path / "cache"
    run(make_spec(data, root, ckpt, fmt="webdataset", roles={"final": "fp16", "logits": "fp16"}))
    code = _readme_snippet()
    assert '"cache/shard-{00000..00003}/v0.tar"' in code
    head = code[: code.index("for sample in views")]  # the loop body is the user's; we check what it gets
    ns: dict = {}
    exec(head.replace('"cache/shard-{00000..00003}/v0.tar"', repr(f"{root}/shard-{{00000..00002}}/v0.tar")), ns)
    reader = CacheReader(root)
    got = list(ns["views"])
    assert len(got) == len(reader) == 9
    for i, sample in enumerate(got):
        stored = reader.read(i, 0)
        assert sample["json"]["key"] == reader[i]["key"] and sample["json"]["view_index"] == 0
        assert sample["final.npy.zst"].dtype == np.float16
        np.testing.assert_array_equal(sample["final.npy.zst"].astype(np.float32), stored["final"])
        np.testing.assert_array_equal(sample["logits.npy.zst"].astype(np.float32), stored["logits"])


def _shard(tmp_path, fmt: str, codec: str, n: int = 6, k: int = 2):
    rng = np.random.default_rng(0)
    specs = {"final": RoleSpec("final", (16, 24), codec), "logits": RoleSpec("logits", (10,), codec)}
    x = {"final": np.maximum(rng.normal(size=(n, k, 16, 24)), 0).astype(np.float32),  # sparse, like post-ReLU maps
         "logits": rng.normal(size=(n, k, 10)).astype(np.float32)}
    fields = {f: a for r, s in specs.items() for f, a in encode(s, x[r]).items()}
    samples = [{"key": f"c/{i}", "label": i % 3, "index": i, "views": [[0.0, 0.0, 1.0, 1.0, 0.0]] * k,
                "fingerprints": ["0" * 16] * k} for i in range(n)]
    folder = tmp_path / fmt / codec
    STORES[fmt].write_shard(folder, specs, fields, samples, k, 3)
    return folder, specs, n, k


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "int8dc"])
def test_webdataset_is_zarr_plus_tar_framing_only(tmp_path, codec):
    """The same zstd payloads in both stores: the webdataset shard exceeds the zarr one by at most
    tar's framing (a 512-byte header and < 512 bytes of padding per entry, the .json entries, the
    end-of-archive blocks), each entry's ~130-byte .npy header, and its entries table."""
    import tarfile

    sizes = {}
    for fmt in STORES:
        folder, specs, n, k = _shard(tmp_path, fmt, codec)
        sizes[fmt] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    entries = n * k * len(specs)  # one per role: an int8 role's fields share it
    headers = n * k * sum(len(s.fields()) for s in specs.values())
    json_bytes = 0
    for tar_path in (tmp_path / "webdataset" / codec).glob("v*.tar"):
        with tarfile.open(tar_path) as tar:
            json_bytes += sum(1024 + m.size for m in tar.getmembers() if m.name.endswith(".json"))
    allowance = (entries * 1024 + headers * 140 + json_bytes + k * 10240
                 + (tmp_path / "webdataset" / codec / "entries.npy").stat().st_size)
    assert sizes["zarr"] < sizes["webdataset"] <= sizes["zarr"] + allowance, sizes


@pytest.mark.parametrize("codec", ["int8", "int8dc"])
def test_a_roles_fields_are_one_entry_which_the_plain_handler_gives_back_in_order(tmp_path, codec):
    import tarfile

    from pipeline.stores.wds_store import npy_zst, open_shard

    folder, specs, n, k = _shard(tmp_path, "webdataset", codec)
    with tarfile.open(folder / "v1.tar") as tar:
        names = tar.getnames()
        got = npy_zst(tar.extractfile("s00000003.final.npy.zst").read())
    assert names[:3] == ["s00000000.json", "s00000000.final.npy.zst", "s00000000.logits.npy.zst"]
    assert len(names) == 3 * n
    stored = open_shard(folder, specs).read(3, 1)
    assert isinstance(got, tuple) and len(got) == len(specs["final"].fields())
    for field, array in zip(specs["final"].fields(), got):
        np.testing.assert_array_equal(array, stored[field])


def _assert_reads(shard, expected):
    """Every row and view of the shard reads back as ``expected[row][view]``, field by field."""
    for i, views in enumerate(expected):
        for v, want in enumerate(views):
            got = shard.read(i, v)
            assert got.keys() == want.keys()
            for field in got:
                np.testing.assert_array_equal(got[field], want[field])


def test_a_shard_written_with_an_entry_per_field_still_reads(tmp_path):
    """Caches made when every field had its own entry (entries.npy with a column per field)."""
    import json
    import tarfile
    import zlib

    from numcodecs import Zstd

    from pipeline.stores.wds_store import _add, _npy, field_order, open_shard

    folder, specs, n, k = _shard(tmp_path, "webdataset", "int8dc")
    new = open_shard(folder, specs)
    expected = [[new.read(i, v) for v in range(k)] for i in range(n)]
    old = tmp_path / "old"
    old.mkdir()
    order = field_order(specs)
    entries = np.zeros((k, n, len(order), 3), np.int64)
    for v in range(k):
        with tarfile.open(old / f"v{v}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(n):
                _add(tar, f"s{i:08d}.json", json.dumps({"key": f"c/{i}"}).encode())
                for j, (field, _, _) in enumerate(order):
                    payload = bytes(Zstd(level=3, checksum=True).encode(_npy(expected[i][v][field])))
                    entries[v, i, j] = (_add(tar, f"s{i:08d}.{field}.npy.zst", payload), len(payload), zlib.crc32(payload))
    np.save(old / "entries.npy", entries)
    shard = open_shard(old, specs)
    assert not shard.per_role
    _assert_reads(shard, expected)


@pytest.mark.parametrize("codec", ["fp16", "int8dc"])
def test_each_field_is_its_own_zstd_frame_and_one_frame_entries_still_read(tmp_path, codec):
    """A role's entry is its fields' zstd frames back to back (each field compressed on its own, as
    zarr's chunks are); entries written as one frame over all fields read the same."""
    import tarfile
    import zlib

    from numcodecs import Zstd

    from pipeline.stores.wds_store import _add, _npy, open_shard

    folder, specs, n, k = _shard(tmp_path, "webdataset", codec)
    new = open_shard(folder, specs)
    expected = [[new.read(i, v) for v in range(k)] for i in range(n)]
    zstd = Zstd(level=3, checksum=True)
    with tarfile.open(folder / "v1.tar") as tar:
        entry = tar.extractfile("s00000002.final.npy.zst").read()
    assert entry == b"".join(bytes(zstd.encode(_npy(expected[2][1][f]))) for f in specs["final"].fields())
    old = tmp_path / "one-frame"
    old.mkdir()
    entries = np.zeros((k, n, len(specs), 3), np.int64)
    for v in range(k):
        with tarfile.open(old / f"v{v}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(n):
                for j, (role, spec) in enumerate(specs.items()):
                    payload = bytes(zstd.encode(b"".join(_npy(expected[i][v][f]) for f in spec.fields())))
                    entries[v, i, j] = (_add(tar, f"s{i:08d}.{role}.npy.zst", payload), len(payload), zlib.crc32(payload))
    np.save(old / "entries.npy", entries)
    shard = open_shard(old, specs)
    assert shard.per_role
    _assert_reads(shard, expected)


def test_webdataset_entries_are_compressed(tmp_path):
    folder, specs, n, k = _shard(tmp_path, "webdataset", "fp32")
    entries = np.load(folder / "entries.npy")
    raw_final = 16 * 24 * 4
    assert entries[:, :, 0, 1].max() < raw_final * 0.75  # half the sparse map is zeros


def test_mid_is_opt_in():
    spec = CacheSpec(name="t", dataset={"kind": "demo"}, teacher={"name": "resnet18"}, output="out")
    assert spec.roles == {"final": "fp16", "logits": "fp16"}
    for job in ("demo", "swinl-imagenet", "eva-imagenet"):
        text = (Path(__file__).resolve().parents[1] / "jobs" / f"{job}.yaml").read_text()
        assert "mid:" not in re.search(r"^\s*roles:.*$", text, flags=re.M).group(0), job
