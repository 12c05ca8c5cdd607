"""graff.probes is a layer below the schedulers and the planner: it imports only leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import graff.probes

ALLOWED = {
    "graff.errors",
    "graff._validation",
    "graff._hooks",
    "graff.blocks",
    "graff.distributed",
    "graff.guard",
    "graff.tokens",
}


def _graff_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graff"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("graff"))
    return names


def test_probes_import_only_leaf_modules() -> None:
    root = Path(graff.probes.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) > 5
    upward = {
        f"{f.name}: {name}"
        for f in files
        for name in _graff_imports(f)
        if name not in ALLOWED and not name.startswith("graff.probes")
    }
    assert not upward


def test_front_door_names_the_probes() -> None:
    from graff.probes import CurvatureProbe, CurvatureStats, EntropyProbe, EntropyStats
    from graff.probes.curvature import CurvatureProbe as Curvature
    from graff.probes.entropy import EntropyProbe as Entropy

    assert (CurvatureProbe, EntropyProbe) == (Curvature, Entropy)
    assert {"CurvatureProbe", "CurvatureStats", "EntropyProbe", "EntropyStats"} == set(
        graff.probes.__all__
    )
    assert CurvatureStats.__name__ == "CurvatureStats"
    assert EntropyStats.__name__ == "EntropyStats"
