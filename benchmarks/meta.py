"""Provenance recorded with every result (command, git commit, date, machine), and the runs of
a `runs.jsonl` that a resumed sweep keeps (those of the same commit of clean code)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.tasks import REPO


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows): with torch's CPU
    kernels (``torch.backends.cpu.get_cpu_capability()``) it decides a run's floating-point bits,
    so results from two machines differ slightly even under a step budget."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> tuple[str, bool]:
    """The commit of the code that runs and whether ``graff/`` or ``benchmarks/`` (results
    excepted) differ from it. Without git or a ``.git`` (a copy of the tree, as a lent GPU
    machine gets: ``benchmarks/device/``), ``GRAFF_GIT_COMMIT`` and ``GRAFF_GIT_DIRTY`` (``0``:
    clean), written where the copy was made, say it; else the commit is ``"unknown"`` and the
    code counts as dirty (a sweep then resumes nothing)."""
    commit = _git("rev-parse", "HEAD")
    if commit == "unknown":
        copied = os.environ.get("GRAFF_GIT_COMMIT", "").strip()
        if copied:
            return copied, os.environ.get("GRAFF_GIT_DIRTY", "1").strip() != "0"
        return commit, True
    status = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "graff",
        "benchmarks",
        ":(exclude)benchmarks/results",
    )
    return commit, bool(status)


def provenance() -> dict[str, Any]:
    import torch

    commit, dirty = git_state()
    return {
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }


def runs_of_commit(log: Path, resume_key: str | None, statuses: tuple[str, ...]) -> Iterator[dict]:
    """The runs of a ``runs.jsonl`` written under ``resume_key`` whose status is in ``statuses``.

    ``resume_key`` is the git commit of clean code (None: ``--fresh`` or uncommitted changes,
    and nothing is kept), so a resumed sweep never mixes results of two versions of the code.
    A torn line (a run killed while writing) is skipped.
    """
    if resume_key is None or not log.is_file():
        return
    for line in log.read_text().splitlines():
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(run, dict)
            and run.get("resume_key") == resume_key
            and run.get("status") in statuses
        ):
            yield run
