"""The quickstart notebook executes top to bottom (nbclient, kernel ``python3``)."""

from __future__ import annotations

import inspect
import json
import re
import time
from pathlib import Path

import pytest

from graff import GraffScheduler

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _kernel_available(name: str) -> bool:
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return False
    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return False
    return True


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel that inherits MPLBACKEND=Agg draws nothing inline; use the notebook default.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read the notebook")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to run the notebook")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    if not _kernel_available("python3"):
        pytest.skip(
            "no Jupyter kernel 'python3': pip install ipykernel && python -m ipykernel install --user"
        )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    tic = time.perf_counter()
    client.execute()
    assert time.perf_counter() - tic < 180, "the notebook must stay well inside two minutes"
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "guard activations" in outputs
    assert "lambda_max_safe" in outputs
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2


def test_notebook_names_the_default_prior() -> None:
    """The notebook's account of the plan names GraffScheduler's default budget prior."""
    default = inspect.signature(GraffScheduler).parameters["prior"].default
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    named = re.findall(r'by default "?(\w+)', text)
    assert named, "the notebook does not say which budget prior is the default"
    assert {n.lower() for n in named} == {default}
