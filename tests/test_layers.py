"""The package's layers: dependencies point one way, and no module imports itself in a circle.

Every module of ``graff`` belongs to one layer (``LAYERS``, lowest first). A module may import
modules of its own layer or of lower ones, never of a higher one, and the import graph has no
cycle. Imports inside functions and under ``if TYPE_CHECKING:`` count too: a lazy import hides a
cycle, it does not remove it. A new module must be placed in a layer here, or this test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import graff

ROOT = Path(graff.__file__).resolve().parent

# lowest first; a name matches a module and everything below it (``graff.probes`` matches
# ``graff.probes.curvature``); the longest match wins
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("graff.errors", "graff._version")),
    ("checks", ("graff._checks", "graff._warn", "graff._seeding")),
    (
        "leaves",
        (
            "graff._hooks",
            "graff.clock",
            "graff.energy",
            "graff.priors",
            "graff.guard",
            "graff.blocks",
            "graff.distributed",
            "graff.tokens",
            "graff.checkpoint",
        ),
    ),
    ("probes", ("graff.probes",)),
    ("planner", ("graff.planner",)),
    ("schedulers", ("graff.schedulers",)),
    ("tools", ("graff.pretrain",)),
    ("front door", ("graff.__init__",)),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != ("graff",):
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The graff modules ``module`` imports (at any depth of its code)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from graff import x``: x may be a submodule or a name of ``graff``
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | {"graff"}
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    # ``import graff.x`` also runs graff/__init__: only the front door may depend on it
    for module, deps in graph.items():
        deps.discard("graff")
        assert module == "graff.__init__" or "graff.__init__" not in deps
    return graph


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)


def test_no_module_imports_a_higher_layer() -> None:
    wrong = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
        for module, deps in _graph().items()
        for dep in sorted(deps)
        if _layer(dep) > _layer(module)
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    """The test above can fail: an import inside a function is found and placed."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from graff.probes.entropy import EntropyProbe\n"
        "def f():\n    from graff.schedulers.reactor import ReactorScheduler\n"
    )
    known = {"graff.probes.entropy", "graff.schedulers.reactor", "graff.probes", "graff"}
    found = _imports("graff.distributed", src, known)
    assert found == {"graff.probes.entropy", "graff.schedulers.reactor"}
    assert _layer("graff.schedulers.reactor") > _layer("graff.distributed")
