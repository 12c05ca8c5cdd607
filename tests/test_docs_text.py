"""The user-facing text carries no control characters and its display math is well formed.

A LaTeX command written inside a string that processes backslash escapes loses its first letters to
a control character (``\\frac`` -> form feed + ``rac``, ``\\text`` -> tab + ``ext``, ``\\right`` ->
carriage return + ``ight``); MathJax then renders garbage and ``mkdocs build --strict`` does not
notice. These checks do.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import graff

REPO = Path(__file__).resolve().parents[1]
# Every C0 control character and DEL, except the newline that ends a line.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
TEXT_FILES = sorted(
    {
        REPO / "README.md",
        *(REPO / "docs").rglob("*.md"),
        *(REPO / "examples").rglob("*.md"),
        *(REPO / "benchmarks").rglob("*.md"),
    }
)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _controls(text: str) -> list[str]:
    """``line:repr`` of every control character in ``text`` (lines split on ``\\n`` only)."""
    return [
        f"{text.count(chr(10), 0, m.start()) + 1}:{m.group()!r}" for m in CONTROL.finditer(text)
    ]


def _notebook_text(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells)


def _graff_docstrings() -> dict[str, str]:
    """``qualified name -> docstring`` for graff's modules and what they define."""
    docs: dict[str, str] = {}
    names = [graff.__name__] + [
        m.name for m in pkgutil.walk_packages(graff.__path__, prefix="graff.")
    ]
    for module_name in names:
        module = importlib.import_module(module_name)
        docs[module_name] = module.__doc__ or ""
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs[f"{module_name}.{name}"] = obj.__doc__ or ""
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    member = getattr(member, "__func__", getattr(member, "fget", member))
                    if isinstance(getattr(member, "__doc__", None), str) and callable(member):
                        docs[f"{module_name}.{name}.{attr}"] = member.__doc__
    return docs


def test_the_text_files_are_found() -> None:
    assert REPO / "README.md" in TEXT_FILES
    assert REPO / "docs" / "concepts" / "graff.md" in TEXT_FILES


@pytest.mark.parametrize("path", TEXT_FILES, ids=_rel)
def test_markdown_has_no_control_characters(path: Path) -> None:
    # bytes, not read_text: universal newlines would turn a carriage return into a newline
    text = path.read_bytes().decode("utf-8")
    assert _controls(text) == []


def test_notebook_has_no_control_characters() -> None:
    assert _controls(_notebook_text(REPO / "examples" / "quickstart.ipynb")) == []


def test_graff_docstrings_have_no_control_characters() -> None:
    docs = _graff_docstrings()
    assert "graff.guard" in docs
    assert "graff.schedulers.graff.GraffScheduler.step" in docs
    bad = {name: _controls(doc) for name, doc in docs.items() if CONTROL.search(doc)}
    assert bad == {}


def _display_math(text: str) -> list[tuple[int, str]]:
    """``(line, body)`` of every ``$$ ... $$`` block outside fenced code."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"\$\$(.*?)\$\$", text, re.S)
    ]


def _math_problems(body: str) -> list[str]:
    problems = []
    if len(re.findall(r"\\left\b", body)) != len(re.findall(r"\\right\b", body)):
        problems.append("\\left/\\right unpaired")
    plain = re.sub(r"\\[{}]", "", body)
    if plain.count("{") != plain.count("}"):
        problems.append("braces unbalanced")
    if re.search(r"(?m)^\s*(ight|rac|ext|ceil|floor|angle)\b", body):
        problems.append("a line starts with the rest of an eaten LaTeX command")
    return problems


@pytest.mark.parametrize("path", TEXT_FILES, ids=_rel)
def test_display_math_is_well_formed(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    bad = [
        f"line {line}: {problems}"
        for line, body in _display_math(text)
        if (problems := _math_problems(body))
    ]
    assert bad == []


def test_math_check_sees_an_eaten_right() -> None:
    ok = r"n = \left\lceil \frac{a}{b} \right\rceil"
    assert _math_problems(ok) == []
    assert _math_problems(ok.replace("\\r", "\n")) != []
    assert _controls(ok.replace("\\f", "\f")) == ["1:'\\x0c'"]
