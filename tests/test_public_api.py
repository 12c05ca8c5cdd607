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

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
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
