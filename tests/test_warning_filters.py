"""pytest's warning filters (pyproject.toml) silence only the known third-party noise."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from _pytest.config import parse_warning_filter

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PEFT_ON_TRANSFORMERS_5 = (
    "`is_gradient_checkpointing` is deprecated and will be removed in v6. "
    "Use `is_activation_checkpointing` instead."
)


def _shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning from ``module`` gets through the configured filters."""
    lines = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for line in lines["filterwarnings"]:  # later lines take precedence, as in pytest
            action, msg, cat, mod, lineno = parse_warning_filter(line, escape=False)
            if action != "error":
                warnings.filterwarnings(action, msg, cat, mod, lineno)
        warnings.warn_explicit(message, category, f"{module}.py", 1, module=module)
    return len(caught) == 1


def test_peft_on_transformers_5_deprecation_is_filtered() -> None:
    assert not _shown(PEFT_ON_TRANSFORMERS_5, FutureWarning, "transformers.modeling_utils")


@pytest.mark.parametrize(
    ("message", "category", "module"),
    [
        ("some other deprecation", FutureWarning, "transformers.modeling_utils"),
        (PEFT_ON_TRANSFORMERS_5, FutureWarning, "graff.blocks"),
        (PEFT_ON_TRANSFORMERS_5, UserWarning, "transformers.modeling_utils"),
        ("lr went non-finite", UserWarning, "graff.schedulers.graff"),
    ],
)
def test_other_warnings_still_show(message: str, category: type[Warning], module: str) -> None:
    assert _shown(message, category, module)
