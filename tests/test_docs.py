"""The docs cannot drift: the job-spec reference is the spec's own definitions rendered, every key has a
meaning, and every relative link of the README and docs/ leads to a file of this repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import datasets
from pipeline.job_spec import DATASET_KEYS, CacheSpec, TrainSpec, field_descriptions, reference_markdown
from pipeline.views import ViewConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_job_spec_md_is_the_generated_reference():
    assert (ROOT / "docs" / "job-spec.md").read_text() == reference_markdown(), (
        "docs/job-spec.md is out of date: run `python -m pipeline.job_spec`")


@pytest.mark.parametrize("cls", [CacheSpec, TrainSpec, ViewConfig])
def test_every_spec_field_has_a_description(cls):
    missing = [name for name, f in cls.__pydantic_fields__.items() if not (f.description or "").strip()]
    assert not missing


def test_every_key_in_the_reference_has_a_meaning_and_every_field_is_in_it():
    described = field_descriptions()
    assert not [k for k, text in described.items() if not text.strip()]
    sections = {"cache": CacheSpec, "cache.views": ViewConfig, "distill": TrainSpec}
    for section, cls in sections.items():
        assert {k.split(".")[-1] for k in described if k.rsplit(".", 1)[0] == section} == set(cls.__pydantic_fields__)
    assert {k.split(".")[-1] for k in described if k.startswith("cache.teacher.")} == {
        "name", "checkpoint", "pretrained", "late_blocks", "kwargs", "seed", "precision"}


def test_the_documented_dataset_keys_are_the_keys_the_dataset_reader_accepts():
    assert set(DATASET_KEYS) == set().union(*datasets._SPEC_KEYS.values())


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_to_files_of_the_repository(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files (or outside the repository): {broken}"


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    assert "make test" in readme and "make cache-teacher" in readme
    linked = {(ROOT / t.split("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    assert not [p.name for p in PAGES[1:] if p.resolve() not in linked]
