"""The benchmark scripts still run against the library (an API change must not break them silently:
`make bench` and the device scripts call them). Their numbers are not checked: a smoke run is not a
measurement."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_loader_benchmark_runs_and_reports_every_stage_of_each_variant(tmp_path):
    out = tmp_path / "loader.json"
    _run("loader.py", "--samples", "8", "--repeats", "1", "--json", str(out), timeout=300)
    ms = json.loads(out.read_text())["ms_per_sample"]
    assert set(ms) == {f"{v} {k}" for v in ("plain", "S") for k in ("before", "float", "now")}
    for name, stages in ms.items():
        assert all(stages[k] > 0 for k in ("decode", "render", "to_input", "cache_read", "collate")), name
        assert ("on_device" in stages) == ("getitem+collate" in stages) == name.endswith("now")


def test_the_tar_listing_benchmark_lists_the_same_samples_both_ways(tmp_path):
    out = tmp_path / "tars.json"
    _run("tar_listing.py", "--tars", "2", "--rounds", "1", "--work", str(tmp_path), "--json", str(out), timeout=300)
    result = json.loads(out.read_text())
    assert (result["samples"], result["members"], result["headers"]) == (2000, 6000, 12000)
    assert set(result["median_s"]) == {"tarfile", "scan"} and result["same_listing"] is True


def test_the_cuda_checks_run_and_pass_on_the_cpu_against_itself(tmp_path):
    out = tmp_path / "checks.json"
    _run("cuda_checks.py", "--json", str(out), timeout=300)
    result = json.loads(out.read_text())
    assert result["all_ok"] is True and len(result["rows"]) == 8
    assert {r["erasing"] for r in result["rows"] if "erasing" in r} == {"pixel", "rand", "const"}


@pytest.mark.slow
def test_the_step_benchmark_runs(tmp_path):
    out = tmp_path / "step.json"
    _run("step.py", "--quick", "--json", str(out), timeout=900)
    assert json.loads(out.read_text())["results"][0]["cached_back_to_back_s"] > 0
