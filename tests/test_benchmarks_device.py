"""The GPU benchmark's path to a lent GPU machine (``benchmarks/device/``), which CI never runs
on a GPU: provenance without git, results written method by method, and the device script end
to end in a copy of the tree without ``.git`` (``--tiny``, on the CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import benchmarks.gpu as gpu
import benchmarks.meta as meta
from benchmarks.tasks import DEFAULT_GSM8K, REPO


def _no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meta, "_git", lambda *args: "unknown")


def test_without_git_the_commit_comes_from_the_environment(monkeypatch) -> None:
    _no_git(monkeypatch)
    monkeypatch.setenv("GRAFF_GIT_COMMIT", "abc123")
    monkeypatch.setenv("GRAFF_GIT_DIRTY", "0")
    assert meta.git_state() == ("abc123", False)
    monkeypatch.setenv("GRAFF_GIT_DIRTY", "1")
    assert meta.git_state() == ("abc123", True)
    monkeypatch.delenv("GRAFF_GIT_DIRTY")
    assert meta.git_state() == ("abc123", True)  # unknown cleanliness counts as dirty


def test_without_git_or_environment_the_code_counts_as_dirty(monkeypatch) -> None:
    _no_git(monkeypatch)
    monkeypatch.delenv("GRAFF_GIT_COMMIT", raising=False)
    assert meta.git_state() == ("unknown", True)
    prov = meta.provenance()
    assert (prov["git_commit"], prov["git_dirty"]) == ("unknown", True)


def test_git_wins_over_the_environment(monkeypatch) -> None:
    if meta._git("rev-parse", "HEAD") == "unknown":
        pytest.skip("not a git checkout")
    monkeypatch.setenv("GRAFF_GIT_COMMIT", "abc123")
    assert meta.git_state()[0] == meta._git("rev-parse", "HEAD")


def test_results_are_written_after_every_method(monkeypatch, tmp_path: Path) -> None:
    """A run cut short by a lent machine's time limit keeps the methods it finished."""
    monkeypatch.setattr(
        gpu, "load_tokens", lambda cfg, d: SimpleNamespace(vocab_size=512, tokenizer_seconds=0.1)
    )
    monkeypatch.setattr(gpu, "warm_up", lambda env: (0.01, 123_456))
    seen = []

    def fake_run(env, name):
        if seen:  # the first method's results are on disk before the second starts
            payload = json.loads((tmp_path / "results.json").read_text())
            assert [r["method"] for r in payload["runs"]] == seen
            text = (tmp_path / "results.md").read_text()
            assert f"**Partial:** {len(seen)} of 2 methods" in text
            assert name in text
        seen.append(name)
        return {"method": name, "status": "ok", "val_loss": 1.0, "steps": 3,
                "tokens_per_second": 10.0, "peak_memory_bytes": None}  # fmt: skip

    monkeypatch.setattr(gpu, "run_method", fake_run)
    args = SimpleNamespace(
        tiny=True, seconds=None, methods="graff,wsd", seed=0, data_dir=None, out=str(tmp_path)
    )
    payload = gpu.main(args)
    assert seen == ["graff", "wsd"]
    assert [r["method"] for r in payload["runs"]] == ["graff", "wsd"]
    assert "Partial" not in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_the_device_script_runs_in_a_copy_of_the_tree_without_git(tmp_path: Path) -> None:
    """What the device tool sends (tracked and untracked-not-ignored files, the carried
    ``.device`` paths; no ``.git``), run as the device runs it, in ``--tiny`` mode."""
    data = Path(os.environ.get("GRAFF_GSM8K_DIR", DEFAULT_GSM8K))
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found in {data}; set GRAFF_GSM8K_DIR")
    if shutil.which("git") is None or meta._git("rev-parse", "HEAD") == "unknown":
        pytest.skip("needs a git checkout to list the files the device would get")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    tree = tmp_path / "tree"
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name)
    device = tree / ".device"
    (device / "gsm8k").mkdir(parents=True)
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy2(data / name, device / "gsm8k" / name)
    (device / "wheels").mkdir()  # schedulefree is installed here: the script needs no wheel
    (device / "env").write_text("GRAFF_GIT_COMMIT=0123456789abcdef\nGRAFF_GIT_DIRTY=0\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", "benchmarks/device/run_gpu.sh", "--tiny", "--seconds", "0.5", "--methods", "graff,wsd"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((out / "gpu" / "results.json").read_text())
    assert payload["meta"]["git_commit"] == "0123456789abcdef"
    assert payload["meta"]["git_dirty"] is False
    assert [r["status"] for r in payload["runs"]] == ["ok", "ok"]
    assert "graff" in proc.stdout
    assert "wsd" in proc.stdout
