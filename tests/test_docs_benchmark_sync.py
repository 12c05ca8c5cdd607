"""docs/benchmark.md and README's result block are generated from the committed results and
from benchmarks/README.md's issue-18 section: they must be what the generator writes today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sync():
    spec = importlib.util.spec_from_file_location(
        "sync_benchmark", ROOT / "docs" / "scripts" / "sync_benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_in_sync_with_their_sources(sync) -> None:
    assert sync.stale() == [], "run python docs/scripts/sync_benchmark.py and commit the result"


def test_the_check_notices_an_edited_source(sync, monkeypatch, tmp_path: Path) -> None:
    """A control: an edit to the benchmark README's generated section makes the page stale."""
    fake_root = tmp_path
    (fake_root / "benchmarks").mkdir()
    (fake_root / "docs").mkdir()
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    edited = readme.replace("<!-- issue18:end -->", "one more line\n<!-- issue18:end -->")
    assert edited != readme
    (fake_root / "benchmarks" / "README.md").write_text(edited)
    (fake_root / "docs" / "benchmark.md").write_text((ROOT / "docs" / "benchmark.md").read_text())
    (fake_root / "README.md").write_text((ROOT / "README.md").read_text())
    monkeypatch.setattr(sync, "ROOT", fake_root)
    monkeypatch.setattr(sync, "DOCS", fake_root / "docs")
    assert sync.stale() == ["docs/benchmark.md"]
    assert sync.main(["--check"]) == 1
