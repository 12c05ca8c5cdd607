"""Tests of graff's front door: ``__all__``, ``__version__`` and the doctests of every module."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

import graff

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
# PEP 440 public version (https://peps.python.org/pep-0440/#appendix-b-parsing-version-strings).
PEP440 = re.compile(
    r"^([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
    r"((a|b|rc)(0|[1-9][0-9]*))?(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?$"
)


def _graff_module_names() -> list[str]:
    names = [graff.__name__]
    names += [m.name for m in pkgutil.walk_packages(graff.__path__, prefix="graff.")]
    return sorted(names)


MODULE_NAMES = _graff_module_names()


def test_every_public_name_exists() -> None:
    missing = [name for name in graff.__all__ if not hasattr(graff, name)]
    assert missing == []


def test_all_is_sorted_and_unique() -> None:
    assert list(graff.__all__) == sorted(set(graff.__all__))


def test_public_names_are_not_private() -> None:
    assert [n for n in graff.__all__ if n.startswith("_") and n != "__version__"] == []


FRONT_DOOR = {
    "BudgetClock",
    "BudgetPrior",
    "BudgetScheduler",
    "CurvatureProbe",
    "EntropyProbe",
    "GraffConfig",
    "GraffError",
    "GraffScheduler",
    "ReactorConfig",
    "ReactorScheduler",
    "__version__",
    "load_checkpoint",
    "load_planner",
    "save_checkpoint",
    "save_planner",
}


def test_the_front_door_is_small_and_pinned() -> None:
    """What a run is built from; everything else lives in its namespace (a change is deliberate)."""
    assert set(graff.__all__) == FRONT_DOOR


def test_the_namespaces_hold_the_rest() -> None:
    from graff.checkpoint import read_checkpoint
    from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
    from graff.guard import clamp_lr, project_to_halfspace, stability_threshold
    from graff.probes import CurvatureStats, EntropyStats
    from graff.schedulers import PlanRecord
    from graff.tokens import weighted_causal_lm_loss

    assert issubclass(CheckpointError, graff.GraffError)
    assert all(issubclass(e, graff.GraffError) for e in (GraffConfigError, GraffTypeError))
    assert issubclass(ProbeError, graff.GraffError)
    assert all(
        callable(f) for f in (read_checkpoint, clamp_lr, project_to_halfspace, stability_threshold)
    )
    assert callable(weighted_causal_lm_loss)
    assert {CurvatureStats.__name__, EntropyStats.__name__, PlanRecord.__name__} == {
        "CurvatureStats",
        "EntropyStats",
        "PlanRecord",
    }


def test_version_is_a_pep440_string() -> None:
    assert isinstance(graff.__version__, str)
    assert PEP440.match(graff.__version__), graff.__version__


def test_version_matches_pyproject_dynamic_version() -> None:
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    assert "version" in config["project"]["dynamic"]
    attr = config["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module_name, _, name = attr.rpartition(".")
    assert getattr(importlib.import_module(module_name), name) == graff.__version__


def test_module_list_covers_the_package() -> None:
    assert {"graff.clock", "graff.guard", "graff.priors", "graff.blocks"} <= set(MODULE_NAMES)


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_module_doctests_pass(module_name: str) -> None:
    module: ModuleType = importlib.import_module(module_name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, module_name):
        runner.run(test, out=report.append)
    failed, attempted = runner.failures, runner.tries
    assert failed == 0, f"{failed} of {attempted} doctests failed:\n" + "".join(report)


def test_core_modules_have_doctests() -> None:
    finder = doctest.DocTestFinder()
    for name in ("graff.clock", "graff.guard", "graff.priors"):
        tests = finder.find(importlib.import_module(name))
        assert sum(len(t.examples) for t in tests) > 0, name


# The distribution name on the package index. ``graff`` there is an unrelated project (a graph
# database), so ``pip install graff`` would install the wrong thing; the import name stays ``graff``.
DIST_NAME = "graff-lr"
INSTALL_DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").rglob("*.md")),
    *sorted((REPO / "examples").rglob("*.md")),
    *sorted((REPO / "examples").rglob("*.py")),
    *sorted((REPO / "examples").rglob("*.ipynb")),
]


def _installed_names(text: str) -> list[str]:
    """The requirement names after every ``pip install`` in ``text`` (extras and quotes dropped)."""
    names = []
    for match in re.finditer(r"pip install\s+([^\n#&;|`]*)", text):
        for token in match.group(1).split():
            token = token.strip("\"'\\,")
            if token and not token.startswith("-"):
                names.append(re.split(r"[\[<>=!~ ]", token, maxsplit=1)[0])
    return names


def test_pyproject_distribution_name_is_the_free_one() -> None:
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    assert config["project"]["name"] == DIST_NAME


def test_install_lines_name_the_distribution_not_the_unrelated_graff() -> None:
    wrong = []
    for path in INSTALL_DOCS:
        for name in _installed_names(path.read_text(encoding="utf-8")):
            if name.lower().startswith("graff") and name.lower() != DIST_NAME:
                wrong.append(f"{path.relative_to(REPO)}: pip install {name}")
    assert wrong == []


def test_install_line_parser_sees_the_names() -> None:
    text = 'pip install "graff[hf]"  # x\npip install -e ".[hf]" && pip install graff-lr==0.1 torch'
    assert _installed_names(text) == ["graff", ".", "graff-lr", "torch"]
