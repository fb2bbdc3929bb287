"""inspect-shards: describe (counts, compression ratio, DC energy), verify (corrupt / missing / extra
shards named), recompute (the teacher re-run on stored views), the spectrum and its plot; the CLI."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.fft import dctn
from typer.testing import CliRunner

from _cache_helpers import make_imagefolder, make_spec, manifest, run, save_checkpoint
from pipeline.cli import app
from pipeline.inspect_cache import check_late, dct_matrix, describe, plot_spectrum, recompute, spectrum, verify
from pipeline.reader import CacheReader


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEKD_WORK", str(tmp_path / "work"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """fp32 caches of a tiny ImageFolder (9 images + 1 corrupt, 3 views, 4 shards) in both formats,
    and an int8dc/fp16 zarr cache of the same job."""
    root = tmp_path_factory.mktemp("inspect")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEKD_WORK", str(root / "work"))
        data = make_imagefolder(root / "data")
        ckpt = save_checkpoint(root / "teacher.safetensors")
        out = {}
        for name, fmt, roles in (("zarr", "zarr", None), ("webdataset", "webdataset", None),
                                 ("lossy", "zarr", {"final": "int8dc", "mid": "int8", "logits": "fp16"})):
            run(make_spec(data, root / name, ckpt, fmt=fmt, roles=roles))
            out[name] = root / name
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, **out)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _views(root):
    reader = CacheReader(root)
    return reader, [(i, v) for i in range(len(reader)) for v in range(reader.num_views)]


def _inspect(*args):
    return CliRunner().invoke(app, ["inspect-shards", *map(str, args)])


# ---------------------------------------------------------------------------------------------- describe


@pytest.mark.parametrize("name", ["zarr", "webdataset", "lossy"])
def test_describe_counts_ratio_and_dc_energy(caches, name):
    root = getattr(caches, name)
    d = describe(root)
    m = manifest(root)
    assert d["format"] == m["format"] and d["complete"] is True
    assert d["samples"] == 9 and d["views_per_sample"] == 3 and d["views"] == 27 and (d["shards"], d["shards_expected"]) == (4, 4)
    assert d["skipped"] == 1 and sum(d["skipped_reasons"].values()) == 1
    assert d["checkpoint_sha256"] == m["teacher"]["checkpoint_sha256"] and d["split_point"] == "blocks.1"
    # the ratio, computed here: raw fp32 bytes of every stored view / the bytes of the shards' files on disk
    raw = 27 * sum(int(np.prod(r["shape"])) * 4 for r in m["roles"].values())
    on_disk = sum(p.stat().st_size for p in root.glob("shard-*/**/*") if p.is_file() and p.name != "shard.json")
    assert on_disk == sum(s["bytes"] for s in m["shards"]) == d["bytes_on_disk"]
    assert d["compression_ratio"] == round(raw / on_disk, 3)
    if name == "lossy":
        assert d["compression_ratio"] > 2.5  # int8 on the two token maps
    # the DC energy fraction of final, computed here on the same (all 27) views
    reader, views = _views(root)
    fractions = []
    for i, v in views:
        f = reader.read(i, v, ["final"])["final"].astype(np.float64)
        dc = np.sqrt(f.shape[0]) * f.mean(0)  # the orthonormal DCT's DC coefficient of each channel
        fractions.append((dc ** 2).sum() / (f ** 2).sum())
    e = d["final_dc_energy_fraction"]
    assert e["views"] == 27
    assert 0 <= e["min"] <= e["mean"] <= e["max"] <= 1
    assert e["mean"] == pytest.approx(np.mean(fractions), abs=1e-4)
    assert e["min"] == pytest.approx(np.min(fractions), abs=1e-4)
    assert e["max"] == pytest.approx(np.max(fractions), abs=1e-4)


# ---------------------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("name", ["zarr", "webdataset"])
def test_verify_ok_on_an_intact_cache(caches, name):
    report = verify(getattr(caches, name))
    assert report == {"cache": str(getattr(caches, name)), "shards": 4, "ok": True, "problems": []}


def _flip_byte(root: Path, fmt: str, where: str = "middle") -> str:
    """Flip one byte of final's data in shard-00001; returns the file's path inside the shard.

    zarr: 'middle' lands inside a compressed chunk (zstd has no checksum here: it may decode to wrong
    values without an error), 'start' hits the first chunk's zstd frame magic (decoding it fails)."""
    if fmt == "zarr":
        rel = "final/c/0/0/0/0"
        path = root / "shard-00001" / rel
        data = bytearray(path.read_bytes())
        assert where == "middle" or data[:4] == b"\x28\xb5\x2f\xfd"  # the zstd magic of chunk (0, 0)
        data[len(data) // 2 if where == "middle" else 0] ^= 0xFF
    else:
        rel = "v1.tar"
        path = root / "shard-00001" / rel
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".final.npy.zst"))
        data = bytearray(path.read_bytes())
        data[member.offset_data + member.size - 3] ^= 0xFF  # inside the entry's zstd frame, not a tar header
    path.write_bytes(bytes(data))
    return rel


@pytest.mark.parametrize("fmt,where", [("zarr", "middle"), ("zarr", "start"), ("webdataset", "middle")])
def test_verify_names_the_shard_and_file_with_a_flipped_byte(caches, tmp_path, fmt, where):
    root = _copy(getattr(caches, fmt), tmp_path)
    rel = _flip_byte(root, fmt, where)
    report = verify(root)
    assert report["ok"] is False
    assert report["problems"] == [f"shard-00001/{rel}: checksum mismatch"]


def test_verify_names_a_missing_shard(caches, tmp_path):
    root = _copy(caches.zarr, tmp_path)
    shutil.rmtree(root / "shard-00002")
    report = verify(root)
    assert report["ok"] is False
    assert report["problems"] == ["shard-00002: missing (no shard.json)"]


def test_verify_names_an_extra_shard_folder(caches, tmp_path):
    root = _copy(caches.zarr, tmp_path)
    shutil.copytree(root / "shard-00001", root / "shard-00009")
    report = verify(root)
    assert report["ok"] is False
    assert report["problems"] == ["shard-00009: extra shard folder, not in manifest.json"]


def test_verify_names_an_unexpected_file_and_a_truncated_file(caches, tmp_path):
    root = _copy(caches.webdataset, tmp_path)
    (root / "shard-00000" / "v0.tar.bak").write_bytes(b"x")
    path = root / "shard-00002" / "v2.tar"
    path.write_bytes(path.read_bytes()[:-512])
    problems = verify(root)["problems"]
    assert "shard-00000/v0.tar.bak: unexpected file" in problems
    assert any(p.startswith("shard-00002/v2.tar: ") and "bytes, expected" in p for p in problems)


def test_verify_names_shards_never_committed(caches, tmp_path):
    out = tmp_path / "partial"
    run(make_spec(caches.data, out, caches.ckpt), max_shards=2)
    report = verify(out)
    assert report["ok"] is False and report["shards"] == 2
    assert report["problems"] == [f"shard-0000{i}: never committed (the run did not finish; run the job again to resume)"
                                  for i in (2, 3)]


def test_reader_names_the_shard_of_an_undecodable_view(caches, tmp_path):
    """numcodecs' RuntimeError on a corrupt zstd frame becomes a ManifestError naming the shard."""
    from pipeline.schema import ManifestError

    root = _copy(caches.zarr, tmp_path)
    _flip_byte(root, "zarr", "start")
    reader = CacheReader(root)
    i = next(i for i in range(len(reader)) if reader[i]["shard"] == "shard-00001" and reader[i]["row"] == 0)
    with pytest.raises(ManifestError, match="shard-00001") as e:
        reader.read(i, 0)
    assert repr(reader[i]["key"]) in str(e.value) and "view 0" in str(e.value)


def test_reader_never_serves_corrupted_features_silently(caches, tmp_path):
    root = _copy(caches.zarr, tmp_path)
    _flip_byte(root, "zarr", "middle")
    good, bad = CacheReader(caches.zarr), CacheReader(root)
    for i in range(len(bad)):
        if bad[i]["shard"] != "shard-00001":
            continue
        for v in range(3):
            try:
                got = bad.read(i, v, ["final"])["final"]
            except Exception:  # noqa: BLE001 - refusing to serve a corrupt view is fine
                continue
            np.testing.assert_array_equal(got, good.read(i, v, ["final"])["final"])


# ---------------------------------------------------------------------------------------------- recompute


@pytest.mark.parametrize("name", ["zarr", "webdataset"])
def test_recompute_matches_an_fp32_cache(caches, name):
    r = recompute(getattr(caches, name), 5)
    assert r["views_checked"] == 5 and r["fingerprint_mismatches"] == []
    assert set(r["max_abs_diff"]) == {"final", "mid", "logits"}
    assert all(v < 1e-5 for v in r["max_abs_diff"].values()), r
    assert all(v < 1e-5 for v in r["max_rel_l2"].values()), r


def test_recompute_reports_the_lossy_codecs_error(caches):
    r = recompute(caches.lossy, 4)
    assert r["fingerprint_mismatches"] == []
    assert 0 < r["max_rel_l2"]["final"] < 0.02 and 0 < r["max_rel_l2"]["mid"] < 0.02
    assert r["max_rel_l2"]["logits"] < 1e-3


def test_recompute_refuses_a_changed_checkpoint(caches, tmp_path):
    root = _copy(caches.zarr, tmp_path)
    other = save_checkpoint(tmp_path / "other.safetensors", seed=1)
    m = manifest(root)
    m["teacher"]["checkpoint"] = str(other)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="the cache was made from"):
        recompute(root, 1)


# ---------------------------------------------------------------------------------------------- check-late


@pytest.mark.parametrize("name", ["zarr", "webdataset"])
def test_check_late_on_stored_mid_matches_stored_final(caches, name):
    r = check_late(getattr(caches, name), 5)
    assert r["views_checked"] == 5 and r["ok"] is True and set(r["max_rel_l2"]) == {"final", "logits"}
    assert all(v < 1e-5 for v in r["max_rel_l2"].values()), r  # fp32 cache: late's own arithmetic only


def test_check_late_passes_a_lossy_cache_within_storage_precision(caches):
    r = check_late(caches.lossy, 4)  # mid int8, final int8dc
    assert r["ok"] is True and 0 < r["max_rel_l2"]["final"] < 0.02 and r["max_rel_l2"]["logits"] < 0.05, r


def test_check_late_with_other_late_weights_shows_a_clear_difference(caches, tmp_path):
    other = save_checkpoint(tmp_path / "other.safetensors", seed=1)
    r = check_late(caches.zarr, 3, checkpoint=other)
    assert r["ok"] is False and r["checkpoint"] == str(other)
    assert r["max_rel_l2"]["final"] > 0.3, r  # vs < 1e-5 with the cache's own weights
    result = _inspect(caches.zarr, "--check-late", 3, "--late-checkpoint", other)
    assert result.exit_code == 1, result.output
    assert "check-late: MISMATCH" in result.output


def test_check_late_without_mid_says_so(caches, tmp_path):
    out = tmp_path / "nomid"
    run(make_spec(caches.data, out, caches.ckpt, roles={"final": "fp16", "logits": "fp16"}), max_shards=1)
    with pytest.raises(ValueError) as e:
        check_late(out, 2)
    assert str(e.value) == (f"{out}/manifest.json: the cache stores roles ['final', 'logits'], no 'mid', so late "
                            f"cannot be re-run on it; --check-late needs a cache made with roles: {{mid: fp16, ...}}")
    result = _inspect(out, "--check-late", 2)
    assert result.exit_code == 1 and "no 'mid'" in result.output


def test_check_late_cli_reports_ok(caches):
    result = _inspect(caches.webdataset, "--check-late", 2)
    assert result.exit_code == 0, result.output
    assert "check-late: OK" in result.output


# ---------------------------------------------------------------------------------------------- spectrum


def test_spectrum_dc_entry_is_the_mean_absolute_dc_coefficient(caches):
    spec = spectrum(caches.zarr)
    assert spec.shape == (4, 4)
    reader, views = _views(caches.zarr)
    acc = np.zeros((4, 4))
    dc = []
    for i, v in views:
        f = reader.read(i, v, ["final"])["final"].astype(np.float64)  # (16, C) row-major on 4×4
        coeffs = dctn(f.T.reshape(-1, 4, 4), axes=(1, 2), norm="ortho")
        acc += np.abs(coeffs).mean(0)
        dc.append(np.abs(coeffs[:, 0, 0]).mean())
    assert spec[0, 0] == pytest.approx(np.mean(dc), rel=1e-9)
    np.testing.assert_allclose(spec, acc / len(views), rtol=1e-9, atol=1e-12)
    # the poster's Figure 2: the DC is the largest coefficient of a feature map
    assert spec[0, 0] == spec.max()


def test_dct_matrix_is_scipys_orthonormal_dct():
    from scipy.fft import dct

    for n in (1, 4, 7):
        np.testing.assert_allclose(dct_matrix(n), dct(np.eye(n), axis=0, norm="ortho"), atol=1e-12)


def test_plot_spectrum_writes_a_png(caches, tmp_path):
    path = plot_spectrum(caches.zarr, tmp_path / "spec.png", views=8)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ---------------------------------------------------------------------------------------------- CLI

MODES = ["text", "json"]


def _exits(result, code: int) -> None:
    """Exit `code` through typer.Exit / a clean return, not through an uncaught exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output


def _verify_cli(root, mode):
    """(result, problems as printed) of `inspect-shards ROOT --verify [--json]`."""
    result = _inspect(root, "--verify", *(["--json"] if mode == "json" else []))
    if mode == "json":
        try:
            return result, "\n".join(json.loads(result.stdout)["verify"]["problems"])
        except (ValueError, KeyError):
            pass
    return result, result.output


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["zarr", "webdataset"])
def test_cli_verify_exits_0_on_an_intact_cache(caches, name, mode):
    result, problems = _verify_cli(getattr(caches, name), mode)
    _exits(result, 0)
    assert problems == "" if mode == "json" else "verify: OK (4 shards)" in " ".join(result.output.split())


def test_cli_text_report_without_verify(caches):
    result = _inspect(caches.zarr)
    _exits(result, 0)
    out = " ".join(result.output.split())
    assert "samples: 9" in out and "compression_ratio:" in out and "final shape [16, 192] codec fp32" in out


def test_cli_json_prints_valid_json(caches):
    result = _inspect(caches.webdataset, "--json")
    _exits(result, 0)
    report = json.loads(result.stdout)
    assert report["format"] == "webdataset" and report["samples"] == 9 and report["views"] == 27
    [(reason, count)] = report["skipped_reasons"].items()
    assert count == 1 and reason.startswith("cannot decode image")


def test_cli_recompute_and_plot(caches, tmp_path):
    png = tmp_path / "out.png"
    result = _inspect(caches.zarr, "--recompute", 3, "--plot", png, "--json")
    _exits(result, 0)
    report = json.loads(result.stdout)
    r = report["recompute"]
    assert r["views_checked"] == 3 and r["fingerprint_mismatches"] == []
    assert max(r["max_abs_diff"].values()) < 1e-5
    assert report["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_text_report_shows_recompute_and_plot(caches, tmp_path):
    result = _inspect(caches.zarr, "--recompute", 2, "--plot", tmp_path / "p.png")
    _exits(result, 0)
    assert "fingerprint mismatches 0" in result.output and "spectrum plot" in result.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_cli_exits_1_naming_a_flipped_byte(caches, tmp_path, mode, fmt):
    root = _copy(getattr(caches, fmt), tmp_path)
    rel = _flip_byte(root, fmt, "middle")
    result, problems = _verify_cli(root, mode)
    _exits(result, 1)
    assert f"shard-00001/{rel}: checksum mismatch" in problems


@pytest.mark.parametrize("mode", MODES)
def test_cli_exits_1_naming_an_extra_shard(caches, tmp_path, mode):
    root = _copy(caches.zarr, tmp_path)
    shutil.copytree(root / "shard-00000", root / "shard-00004")
    result, problems = _verify_cli(root, mode)
    _exits(result, 1)
    assert "shard-00004: extra shard folder, not in manifest.json" in problems




@pytest.mark.parametrize("mode", ["text", "json"])
def test_cli_exits_1_naming_an_undecodable_zarr_chunk(caches, tmp_path, mode):
    root = _copy(caches.zarr, tmp_path)
    rel = _flip_byte(root, "zarr", "start")
    result, problems = _verify_cli(root, mode)
    _exits(result, 1)
    assert f"shard-00001/{rel}: checksum mismatch" in problems




@pytest.mark.parametrize("mode", ["text", "json"])
def test_cli_exits_1_naming_a_missing_shard(caches, tmp_path, mode):
    root = _copy(caches.zarr, tmp_path)
    shutil.rmtree(root / "shard-00002")
    result, problems = _verify_cli(root, mode)
    _exits(result, 1)
    assert "shard-00002: missing" in problems


def test_cli_exits_2_on_a_folder_that_is_not_a_cache(tmp_path):
    result = _inspect(tmp_path, "--verify")
    _exits(result, 2)
    assert "manifest.json is missing" in result.output and str(tmp_path) in result.output
