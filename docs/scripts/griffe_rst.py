"""Griffe extension: render graff's reStructuredText bits inside Google-style docstrings.

graff's docstrings are Google style (parsed by mkdocstrings) but use a few reStructuredText
constructs that Markdown does not know. Before mkdocstrings parses a docstring this extension
rewrites, in the docstring text only (the source files are untouched):

- ``.. math::`` blocks into ``$$ ... $$`` blocks (rendered by ``pymdownx.arithmatex``);
- ``:math:`x``` into ``\\(x\\)``;
- ``:func:`x```, ``:class:`~a.b.C```, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``,
  ``:exc:`` and ``:obj:`` roles into inline code (the ``~`` form keeps the last component);
- simple reStructuredText tables (``====  ====`` borders) into Markdown tables;
- list items continued with a 2-space indent (fine in reST) to the 4-space indent that
  Python-Markdown needs to keep a nested block, such as a math block, inside the item.

Used from ``mkdocs.yml``::

    extensions:
      - docs/scripts/griffe_rst.py:RstToMarkdown
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`(?P<target>[^`]+)`")
_TABLE_BORDER = re.compile(r"^(?P<indent>[ \t]*)=+(?:[ \t]+=+)+[ \t]*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert_math_blocks(text: str) -> str:
    """Turn every ``.. math::`` directive and its indented body into a ``$$`` block."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        base = len(indent)
        body, i = [], i + 1
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # trailing blank lines belong to the text after
            body.pop()
            i -= 1
        content = [ln for ln in body if ln.strip()]
        cut = min((_indent_of(ln) for ln in content), default=0)
        out.extend(["", f"{indent}$$"])
        out.extend(f"{indent}{ln[cut:]}" if ln.strip() else "" for ln in body if ln.strip())
        out.extend([f"{indent}$$", ""])
    return "\n".join(out)


_BULLET = re.compile(r"^(?P<indent>[ \t]*)(?:[*+-]|\d+\.)[ \t]+\S")


def widen_list_indents(text: str) -> str:
    """Shift the continuation lines of list items to four spaces past the bullet's indent.

    A new item that follows an item holding a blank line (a nested block) gets a blank line
    before it, or Python-Markdown would read it as a lazy continuation of the paragraph.
    """
    out: list[str] = []
    bullet, shift, loose = None, 0, False
    for line in text.split("\n"):
        match = _BULLET.match(line)
        if match is not None:
            if bullet is not None and loose and out and out[-1].strip():
                out.append("")
            bullet = len(match.group("indent"))
            marker = len(line) - len(line[bullet:].lstrip("*+-0123456789.").lstrip()) - bullet
            shift, loose = max(0, 4 - marker), False
            out.append(line)
        elif bullet is not None and not line.strip():
            loose = True
            out.append(line)
        elif bullet is not None and _indent_of(line) > bullet:
            out.append(" " * shift + line)
        else:
            bullet = None
            out.append(line)
    return "\n".join(out)


def _split_row(line: str, starts: list[int], ncols: int) -> list[str]:
    cells = re.split(r"\s{2,}", line.strip())
    if len(cells) == ncols:
        return cells
    bounds = [*starts[1:], None]
    return [line[s:e].strip() for s, e in zip(starts, bounds, strict=True)]


def convert_simple_tables(text: str) -> str:
    """Turn reStructuredText simple tables (header between two borders) into Markdown."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        top = _TABLE_BORDER.match(lines[i])
        if top is None or i + 2 >= len(lines) or not _TABLE_BORDER.match(lines[i + 2]):
            out.append(lines[i])
            i += 1
            continue
        indent = top.group("indent")
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        ncols = len(starts)
        header = _split_row(lines[i + 1], starts, ncols)
        rows, j = [], i + 3
        while j < len(lines) and not _TABLE_BORDER.match(lines[j]):
            if lines[j].strip():
                rows.append(_split_row(lines[j], starts, ncols))
            j += 1
        out.append("")
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * ncols)
        out.extend(indent + "| " + " | ".join(r) + " |" for r in rows)
        out.append("")
        i = j + 1
    return "\n".join(out)


def _xref(match: re.Match[str]) -> str:
    target = match.group("target")
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def rst_to_markdown(text: str) -> str:
    """Apply all conversions to one docstring."""
    text = convert_simple_tables(text)
    text = widen_list_indents(text)
    text = convert_math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group('tex')}\\)", text)
    return _XREF_ROLE.sub(_xref, text)


class RstToMarkdown(griffe.Extension):
    """Rewrite the reStructuredText parts of every loaded docstring into Markdown."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Convert ``obj``'s docstring in place once the tree is loaded."""
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
