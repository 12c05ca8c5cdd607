"""``python -m benchmarks butterfly``: λ̂ on vs off re-read against each cell's butterfly spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.butterfly import butterfly, counts


def _row(family: str, lam: bool, final: float, jitter: float | None = None) -> dict:
    row = {"family": family, "arch": "mlp", "optimizer": "adamw", "factor": 1.0, "seed": 1,
           "lam": lam, "graff_kwargs": {}, "final": final, "status": "ok"}  # fmt: skip
    if jitter is not None:
        row["lr_jitter"] = jitter
    return row


# (λ̂ on, λ̂ off) final losses per cell in the default sweep and in the nudged one
CELLS = {
    "chaos": ((1.10, 1.00), (0.99, 1.00)),  # worse by 9.5 %; the nudge alone moves it 10.5 %
    "worse": ((1.20, 1.00), (1.21, 1.00)),  # worse by 18 %, the nudge moves it 0.8 %
    "better": ((0.90, 1.00), (0.90, 1.00)),
    "level": ((1.00, 1.00), (1.005, 1.00)),
}


def _sweeps() -> tuple[list[dict], list[dict]]:
    base, nudged = [], []
    for family, ((on, off), (on_n, off_n)) in CELLS.items():
        base += [_row(family, True, on), _row(family, False, off)]
        nudged += [_row(family, True, on_n, 1.01), _row(family, False, off_n, 1.01)]
    return base, nudged


def test_counts_closed_form() -> None:
    cells = {c["family"]: c for c in butterfly(*_sweeps())}
    assert cells["chaos"]["spread"] == pytest.approx(math.log(1.1 / 0.99))
    assert cells["worse"]["spread"] == pytest.approx(math.log(1.21 / 1.20))
    assert counts(list(cells.values())) == {
        "cells": 4,
        "spread_above_1pct": 1,
        "better_1pct": 1,
        "worse_1pct": 2,
        "better_beyond_spread": 1,
        "worse_beyond_spread": 1,  # "chaos" is worse at 1 % but not beyond its own spread
        "worse_in_both_sweeps": 1,
    }


def test_the_command_writes_the_cells_worse_beyond_their_spread(tmp_path: Path) -> None:
    base, nudged = _sweeps()
    paths = {}
    for name, rows in (("base", base), ("nudged", nudged)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["butterfly", "--base", str(paths["base"]), "--nudged", str(paths["nudged"]),
          "--out", str(out)])  # fmt: skip
    result = json.loads((out / "butterfly.json").read_text())
    assert result["jitter"] == 1.01
    assert [c["family"] for c in result["worse_beyond_spread"]] == ["worse"]
    text = (out / "butterfly.md").read_text()
    assert "| adamw | 4 | 1 | 1 / 2 | 1 / 1 | 1 |" in text
    assert "adamw worse/mlp ×1 seed 1: +0.182" in text
    with pytest.raises(SystemExit):  # the nudged sweep must be a --lr-jitter one
        main(["butterfly", "--base", str(paths["base"]), "--nudged", str(paths["base"]),
              "--out", str(out)])  # fmt: skip
